"""Deterministic workflow code: the journey interpreter. No I/O, no heavy imports."""
