"""Vigil's Django-free numerical core: features, detectors, scoring, evaluation.

Nothing in this package imports Django, so workers, the API, the CLI, benchmarks and tests all
call the same code.
"""
