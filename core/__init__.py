"""Cross-cutting pieces: settings, logging, the Temporal client, the embedded dev stack."""
