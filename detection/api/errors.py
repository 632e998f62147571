"""The API's error shape: every error is JSON, and a bad input names its field.

Validation errors keep DRF's shape, {field: [messages]} (nested for nested fields, e.g.
{"observations": [{}, {"metrics": [...]}]} for a batch); other errors are {"detail", "code"}. A body
that is not JSON at all is reported against the field "body". Django's own ValidationError and
Http404 become 400 and 404 instead of 500s. An unexpected exception still answers a JSON 500
(and is logged), never an HTML page.
"""
from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from detection.errors import InputError

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    """409: the request is valid but the resource's state does not allow it (no production model)."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflict"
    default_code = "conflict"


class Unavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "temporarily unavailable"
    default_code = "unavailable"


def field_error(exc: InputError) -> exceptions.ValidationError:
    """The 400 for a service error that names its field (detection.errors.InputError: FeedbackError,
    ModelVersionError, AlertActionError): {field: [message]}. Raise it ``from None``."""
    return exceptions.ValidationError({exc.field: [exc.message]})


def exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else
                                         {"non_field_errors": exc.messages})
    if isinstance(exc, exceptions.ParseError):
        exc = exceptions.ValidationError({"body": [str(exc.detail)]})
    response = drf_exception_handler(exc, context)
    if response is None:
        logger.exception("unhandled error in %s", context.get("view").__class__.__name__, exc_info=exc)
        return Response({"detail": "internal error; it was logged", "code": "error"},
                        status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    if isinstance(response.data, dict) and set(response.data) == {"detail"}:
        response.data["code"] = getattr(exc, "get_codes", lambda: "error")()
        if not isinstance(response.data["code"], str):
            response.data["code"] = "error"
    elif isinstance(response.data, list):  # a bare ValidationError("...") names no field
        response.data = {"non_field_errors": response.data}
    return response
