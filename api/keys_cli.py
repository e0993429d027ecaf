"""API keys from the command line, straight to the database (DATABASE_URL).

    python -m api.keys_cli create --name ci-deploy --scope manage --scope read
    python -m api.keys_cli list [--all]
    python -m api.keys_cli revoke <key id>

`create` prints the token once (only its hash is stored). Changes are audited as `cli:<user>`
and reach running API processes at once (NOTIFY). For the first keys of a deployment, or when
the API is down; otherwise `POST/GET/DELETE /v1/keys` with an admin key does the same.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys

from api.scopes import SCOPES
from core.settings import get_settings
from store.api_keys import InvalidKeyRequest, create_key, list_keys, revoke_key
from store.db import create_pool


def _actor() -> str:
    return f"cli:{getpass.getuser()}"[:64]


async def _main(args: argparse.Namespace) -> int:
    url = get_settings().database_url
    if not url:
        print("DATABASE_URL is not set", file=sys.stderr)
        return 2
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        if args.command == "create":
            try:
                key = await create_key(pool, name=args.name, scopes=args.scope, created_by=_actor())
            except InvalidKeyRequest as err:
                print(str(err), file=sys.stderr)
                return 2
            print(key.token)
            print(
                f"key {key.id} ({', '.join(key.scopes)}): the token above is shown only once",
                file=sys.stderr,
            )
        elif args.command == "list":
            for k in await list_keys(pool, include_revoked=args.all):
                print(json.dumps(k.model_dump(mode="json")))
        else:
            revoked = await revoke_key(pool, args.key_id, revoked_by=_actor())
            if revoked is None:
                print(f"no key {args.key_id!r}", file=sys.stderr)
                return 1
            print(json.dumps(revoked.model_dump(mode="json")))
    finally:
        await pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.keys_cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="a new key; prints its token once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--scope", action="append", required=True, choices=SCOPES)
    listing = sub.add_parser("list", help="keys as JSON lines (never their tokens)")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    revoke = sub.add_parser("revoke", help="the key stops working at once")
    revoke.add_argument("key_id")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
