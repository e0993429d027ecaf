"""Shared types: SQL tables, the Segment envelope, journey definitions, runtime payloads.

Modules imported by workflow code (`journey`, `conditions`, `runtime`, `durations`) are pure:
pydantic only, no I/O.
"""
