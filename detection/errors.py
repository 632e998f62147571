"""The error a service raises for an input it refuses. Django-free."""
from __future__ import annotations


class InputError(Exception):
    """An action refused because of one input: field names it, message says why, and str() is
    "<field>: <message>", what the pages show. The API answers {field: [message]}
    (detection.api.errors.field_error). Nothing was saved."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")
