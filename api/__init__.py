"""The thin HTTP front: it validates, stores durably, and reads. Journeys run in the worker."""
