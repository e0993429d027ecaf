"""Connecting to Temporal the same way everywhere, and the search attributes we register."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter

CUSTOMER_ID = SearchAttributeKey.for_keyword("CustomerId")
JOURNEY_ID = SearchAttributeKey.for_keyword("JourneyId")
JOURNEY_VERSION = SearchAttributeKey.for_int("JourneyVersion")
JOURNEY_STEP = SearchAttributeKey.for_keyword("JourneyStep")
# running | held | completed | completed_with_failures | exited | failed
JOURNEY_STATUS = SearchAttributeKey.for_keyword("JourneyStatus")
# The customer as operators know them: userIds, anonymousIds and emails (CustomerId is ours).
CUSTOMER_REFS = SearchAttributeKey.for_keyword_list("CustomerRefs")

SEARCH_ATTRIBUTES = [
    CUSTOMER_ID,
    JOURNEY_ID,
    JOURNEY_VERSION,
    JOURNEY_STEP,
    JOURNEY_STATUS,
    CUSTOMER_REFS,
]


def search_attribute_flags() -> list[str]:
    """`--search-attribute Name=Type` flags for `temporal server start-dev`."""
    kinds = {"KEYWORD": "Keyword", "INT": "Int", "KEYWORD_LIST": "KeywordList"}
    return [
        f"{k.name}={kinds[k.indexed_value_type.name.removeprefix('INDEXED_VALUE_TYPE_')]}"
        for k in SEARCH_ATTRIBUTES
    ]


async def connect(address: str, namespace: str = "default") -> Client:
    return await Client.connect(
        address, namespace=namespace, data_converter=pydantic_data_converter
    )


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """Register our keys on a server that was not started with them (test server, external).

    Registering keys that already exist with the same type is accepted.
    """
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    req = AddSearchAttributesRequest(namespace=namespace)
    for key in SEARCH_ATTRIBUTES:
        req.search_attributes[key.name] = int(key.indexed_value_type)
    await client.operator_service.add_search_attributes(req)
