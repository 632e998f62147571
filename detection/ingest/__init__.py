"""Telemetry sources. Readers are Django-free and return an IngestBatch; loader.py writes it."""
from .base import IngestBatch, IngestError, IngestProblem

__all__ = ["IngestBatch", "IngestError", "IngestProblem"]
