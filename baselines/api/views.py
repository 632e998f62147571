"""The feedback loop's API (/api/v1/): the proposal queue with its domain verbs (approve, reject, preview,
suggest), the audit log (read-only), and rolling a baseline back to an earlier version.

Views parse input, call one service (baselines.services) or selector, render. Reads need the viewer role;
preview needs reviewer; approve, reject, suggest and rollback need approver (the services check again).
A service error names its field: {field: [message]}, 400, or 409 when the proposal's status forbids it.
"""

from __future__ import annotations

import django_filters
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response

from detection.api.authentication import CachedTokenAuthentication
from detection.api.errors import Conflict
from detection.api.permissions import HasRole
from detection.api.serializers import BaselineVersionSerializer
from detection.api.views import UtcIsoDateTimeFromToRangeFilter
from detection.models import AuditEvent

from .. import selectors, services
from ..filters import BaselineProposalFilterSet
from ..models import BaselineVersion
from .serializers import (
    AuditEventSerializer,
    BaselineProposalSerializer,
    BaselineRollbackSerializer,
    ProposalDecisionSerializer,
    ProposalImpactSerializer,
    ProposalsDecideSerializer,
    ProposalSuggestSerializer,
)

# As in detection.api: tokens for clients, the session for the web app; Token first so anonymous gets a 401.
API_AUTHENTICATION = [CachedTokenAuthentication, SessionAuthentication]

ERRORS = {
    400: OpenApiResponse(description="a field is invalid; the body names it, {field: [message]}"),
    403: OpenApiResponse(description="the user lacks the role, or the same-approver rule forbids it"),
    409: OpenApiResponse(description="the proposal is not pending; {status: [message]}"),
}


def _service_error(exc: Exception):
    """Raise the API error for a service error: ProposalError -> 400 naming its field, 409 for "status"
    (not pending), 403 for "user" (role, same-approver rule); Django's PermissionDenied -> 403; an
    unreadable baseline artifact (OSError) -> 400 naming baseline_version."""
    if isinstance(exc, DjangoPermissionDenied):
        raise PermissionDenied(str(exc) or None) from None
    if isinstance(exc, OSError):  # a baseline version's artifact file is missing or unreadable
        raise ValidationError({"baseline_version": [f"its statistics file cannot be read: {exc}"]}) from None
    field = getattr(exc, "field", None) or "non_field_errors"
    message = str(exc)
    if message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    if field == "status":
        raise Conflict({field: [message]}) from None
    if field == "user":  # the role or the same-approver rule
        raise PermissionDenied({field: [message]}) from None
    raise ValidationError({field: [message]}) from None


class _RoleMixin:
    authentication_classes = API_AUTHENTICATION
    permission_classes = [HasRole]
    read_role = "viewer"
    write_role = "approver"


@extend_schema_view(
    list=extend_schema(description="Proposals, newest first. Filters: fleet (name), status, kind."),
    retrieve=extend_schema(description="One proposal with its evidence, stored impact preview and result."),
)
class BaselineProposalViewSet(_RoleMixin, viewsets.ReadOnlyModelViewSet):
    """Proposed baseline adjustments made from reviewers' false positives."""

    serializer_class = BaselineProposalSerializer
    queryset = selectors.proposal_list()
    filterset_class = BaselineProposalFilterSet
    action_roles = {"preview": "reviewer", "approve": "approver", "reject": "approver", "suggest": "approver",
                    "decide": "approver"}

    def _decide(self, request, decide) -> Response:
        proposal = self.get_object()
        params = ProposalDecisionSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            decide(proposal=proposal, user=request.user, comment=params.validated_data["comment"])
        except (services.ProposalError, DjangoPermissionDenied) as exc:
            _service_error(exc)
        return Response(BaselineProposalSerializer(selectors.proposal_get(pk=proposal.pk)).data)

    @extend_schema(request=ProposalsDecideSerializer,
                   responses={200: BaselineProposalSerializer(many=True), **ERRORS})
    @action(detail=False, methods=["post"])
    def decide(self, request):
        """Approve or reject up to 100 pending proposals of one fleet at once, all or none (audited each);
        approved ones are applied together: one baseline version, one retrain, one re-score."""
        params = ProposalsDecideSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            done = services.proposals_decide(ids=data["proposals"], user=request.user,
                                             approve=data["decision"] == "approve", comment=data["comment"])
        except (services.ProposalError, DjangoPermissionDenied) as exc:
            _service_error(exc)
        fresh = {p.pk: p for p in selectors.proposal_list().filter(pk__in=[p.pk for p in done])}
        return Response(BaselineProposalSerializer([fresh[p.pk] for p in done], many=True).data)

    @extend_schema(request=ProposalDecisionSerializer, responses={200: BaselineProposalSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        """Approve a pending proposal: a new baseline version is made, the model retrained, data re-scored
        (asynchronously; poll the proposal until its status is applied or failed)."""
        return self._decide(request, services.proposal_approve)

    @extend_schema(request=ProposalDecisionSerializer, responses={200: BaselineProposalSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        """Reject a pending proposal."""
        return self._decide(request, services.proposal_reject)

    @extend_schema(request=None, responses={200: ProposalImpactSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def preview(self, request, pk=None):
        """Re-score the affected data with the adjusted baseline; nothing is persisted but the preview."""
        proposal = self.get_object()
        try:
            impact = services.proposal_preview_impact(proposal=proposal)
        except (services.ProposalError, DjangoPermissionDenied, OSError) as exc:
            _service_error(exc)
        return Response(ProposalImpactSerializer(impact).data)

    @extend_schema(
        request=ProposalSuggestSerializer,
        responses={201: BaselineProposalSerializer(many=True), 400: ERRORS[400], 403: ERRORS[403]},
    )
    @action(detail=False, methods=["post"])
    def suggest(self, request):
        """Ask the engine for adjustments of one fleet now; answers the proposals it created (maybe none)."""
        params = ProposalSuggestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            created = services.proposals_suggest(
                fleet=params.validated_data["fleet"],
                user=request.user,
                actor_label=request.user.get_username(),
            )
        except (services.ProposalError, DjangoPermissionDenied, OSError) as exc:
            _service_error(exc)
        proposals = selectors.proposal_list().filter(pk__in=[p.pk for p in created])
        return Response(BaselineProposalSerializer(proposals, many=True).data, status=status.HTTP_201_CREATED)


class AuditEventApiFilterSet(django_filters.FilterSet):
    """fleet (name, exact), action (exact), actor (contains, case-insensitive), target_type, target_id,
    created_after / created_before (ISO 8601)."""

    fleet = django_filters.CharFilter(field_name="fleet_name")
    action = django_filters.CharFilter()
    actor = django_filters.CharFilter(field_name="actor_label", lookup_expr="icontains")
    target_type = django_filters.CharFilter()
    target_id = django_filters.CharFilter()
    created = UtcIsoDateTimeFromToRangeFilter(field_name="created_at")

    class Meta:
        model = AuditEvent
        fields: list[str] = []


class AuditEventViewSet(_RoleMixin, viewsets.ReadOnlyModelViewSet):
    """The audit log of every app, newest first (read-only: events are written by the services only)."""

    serializer_class = AuditEventSerializer
    queryset = selectors.audit_event_list()
    filterset_class = AuditEventApiFilterSet


class BaselineVersionRollbackViewSet(_RoleMixin, viewsets.GenericViewSet):
    """Rollback of a baseline version (listing and reading versions is detection.api's baseline-versions)."""

    serializer_class = BaselineVersionSerializer
    queryset = BaselineVersion.objects.select_related("fleet")

    @extend_schema(request=BaselineRollbackSerializer, responses={201: BaselineVersionSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def rollback(self, request, pk=None):
        """Make a new active version of the fleet carrying this version's statistics (history is never
        rewritten); answers the new version."""
        version = self.get_object()
        params = BaselineRollbackSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            new = services.baseline_version_rollback(
                fleet=version.fleet,
                to_version=version,
                user=request.user,
                reason=params.validated_data["reason"],
            )
        except (services.ProposalError, DjangoPermissionDenied, ValueError, OSError) as exc:
            _service_error(exc)
        return Response(BaselineVersionSerializer(new).data, status=status.HTTP_201_CREATED)
