"""The detection API (/api/v1/): health, online scoring, and fleets, devices, runs, anomaly results,
model versions and baseline versions. Views parse input, call one service or selector, render."""
from __future__ import annotations

from datetime import timezone as dt_timezone

import django_filters
from django import forms
from django.conf import settings
from django.db import transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from baselines.models import BaselineVersion
from detection import serving, services
from detection.choices import Label, ModelStatus, RunStatus, Severity, Trigger
from detection.choices import Verdict
from detection.models import AnomalyFeedback, AnomalyResult, Device, Fleet, ModelVersion, PipelineRun

from . import health, ingest
from .errors import Conflict, Unavailable, field_error
from .permissions import HasRole
from .serializers import (
    AnomalyFeedbackBulkSerializer, AnomalyFeedbackCreateSerializer, AnomalyFeedbackSerializer,
    AnomalyResultSerializer, BaselineVersionSerializer,
    DetectionBatchSerializer, DetectionSerializer,
    DeviceSerializer, FleetSerializer, ModelVersionRollbackSerializer, ModelVersionSerializer,
    ObservationBatchSerializer, ObservationSerializer, PipelineRunCreateSerializer, PipelineRunSerializer,
    TelemetryIngestResultSerializer, TelemetryIngestSerializer,
)
from .authentication import CachedTokenAuthentication
from .throttling import API_THROTTLES, ThrottledViewMixin

# Clients use tokens, the web app its session; Token first so that an anonymous request gets a 401.
API_AUTHENTICATION = [CachedTokenAuthentication, SessionAuthentication]

# --- health ------------------------------------------------------------------------------------

HealthSerializer = inline_serializer("Health", {
    "status": serializers.ChoiceField(choices=["ok", "down"]), "version": serializers.CharField(),
    "checks": serializers.DictField(), "model_health": serializers.DictField()})


class _Open(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []


class HealthView(_Open):
    """Every dependency: database, Celery broker, channel layer, production models. 503 if one is down."""

    @extend_schema(responses={200: HealthSerializer, 503: HealthSerializer})
    def get(self, request):
        checks = {"database": health.check_database(), "broker": health.check_broker(),
                  "channel_layer": health.check_channel_layer()}
        checks["models"] = health.check_models() if checks["database"]["status"] == "ok" else \
            {"status": "down", "error": "database is down"}
        ok = all(c["status"] == "ok" for c in checks.values())
        from alerts.health import model_health_summary  # per fleet: drift, precision, model age, triggers

        model_health = model_health_summary() if checks["database"]["status"] == "ok" else {}
        return Response({"status": "ok" if ok else "down", "version": health.app_version(), "checks": checks,
                         "model_health": model_health},
                        status=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE)


class LivenessView(_Open):
    """The process answers (no dependency is checked)."""

    @extend_schema(responses={200: inline_serializer("Liveness", {"status": serializers.CharField()})})
    def get(self, request):
        return Response({"status": "ok"})


ReadinessSerializer = inline_serializer("Readiness", {
    "status": serializers.ChoiceField(choices=["ok", "down"]), "version": serializers.CharField(),
    "checks": serializers.DictField()})


class ReadinessView(_Open):
    """Ready to serve: the database answers and every migration is applied (503 otherwise)."""

    @extend_schema(responses={200: ReadinessSerializer, 503: ReadinessSerializer})
    def get(self, request):
        database = health.check_database()
        checks = {"database": database}
        if database["status"] == "ok":
            try:
                pending = health.migrations_pending()
                checks["migrations"] = {"status": "ok" if pending == 0 else "down", "pending": pending}
            except Exception as exc:
                checks["migrations"] = {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
        ok = all(c["status"] == "ok" for c in checks.values())
        return Response({"status": "ok" if ok else "down", "version": health.app_version(), "checks": checks},
                        status=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE)


# --- detect --------------------------------------------------------------------------------------

def _detect(observations: list[dict], *, batch: bool) -> list[dict]:
    """Score validated observations (grouped by fleet), mapping serving errors to the request's fields."""
    names = {o["fleet"] for o in observations}
    fleets = serving.fleets_by_name(names)
    for i, o in enumerate(observations):
        if o["fleet"] not in fleets:
            _raise(serving.ServingError(f"unknown fleet {o['fleet']!r}", field="fleet", index=i), batch=batch)
    results: list[dict | None] = [None] * len(observations)
    for name, fleet in fleets.items():
        idx = [i for i, o in enumerate(observations) if o["fleet"] == name]
        try:
            scored = serving.detect_observations(fleet=fleet, observations=[observations[i] for i in idx])
        except serving.ServingError as exc:
            if exc.index is not None:
                exc.index = idx[exc.index]
            _raise(exc, batch=batch)
        for i, r in zip(idx, scored):
            results[i] = r
    return results


def _raise(exc: serving.ServingError, *, batch: bool):
    detail = {exc.field: [str(exc)]}
    if batch and exc.index is not None:
        detail = {"observations": {str(exc.index): detail}}
    if exc.status == 409:
        raise Conflict(detail)
    if exc.status == 503:
        raise Unavailable(detail)
    raise ValidationError(detail)


class _ScoringView(ThrottledViewMixin, APIView):
    """Scoring reads no more than a viewer may see: POSTs need the viewer role only."""

    authentication_classes = API_AUTHENTICATION
    permission_classes = [HasRole]
    throttle_classes = API_THROTTLES
    throttle_scope = "detect"
    read_role = write_role = "viewer"


class DetectView(_ScoringView):
    """Score one observation with the fleet's production model. Nothing is persisted."""

    @extend_schema(request=ObservationSerializer, responses={
        200: DetectionSerializer, 400: OpenApiResponse(description="a field is invalid; the body names it"),
        409: OpenApiResponse(description="the fleet has no production model version")})
    def post(self, request):
        params = ObservationSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        return Response(_detect([params.validated_data], batch=False)[0])


class DetectBatchView(_ScoringView):
    """Score up to MAX_BATCH_SIZE observations: {"observations": [...]} or a bare list. Nothing is persisted."""

    @extend_schema(request=ObservationBatchSerializer, responses={
        200: DetectionBatchSerializer, 400: OpenApiResponse(description="a field is invalid; the body names it"),
        409: OpenApiResponse(description="a fleet has no production model version")})
    def post(self, request):
        data = {"observations": request.data} if isinstance(request.data, list) else request.data
        items = data.get("observations") if hasattr(data, "get") else None
        if isinstance(items, list) and len(items) > settings.MAX_BATCH_SIZE:  # before validating every item
            raise ValidationError({"observations": [f"at most {settings.MAX_BATCH_SIZE} observations per batch "
                                                    f"(MAX_BATCH_SIZE), got {len(items)}"]})
        params = ObservationBatchSerializer(data=data)
        params.is_valid(raise_exception=True)
        results = _detect(params.validated_data["observations"], batch=True)
        return Response({"results": results, "total_processed": len(results)})


# --- resources -----------------------------------------------------------------------------------

class IdFilter(django_filters.NumberFilter):
    """A primary key: a whole number the database can hold (a larger one is a 400, not an overflow)."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", 2 ** 63 - 1)
        super().__init__(*args, **kwargs)


class UtcIsoDateTimeField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 bound, converted to UTC: Python accepts UTC offsets up to 24 h, PostgreSQL only
    up to 15:59, so an unconverted "-18:58" would be a database error (a 500) instead of a bound."""

    def to_python(self, value):
        value = super().to_python(value)
        return value.astimezone(dt_timezone.utc) if value is not None and value.tzinfo is not None else value


class UtcIsoDateTimeRangeField(django_filters.fields.RangeField):
    widget = django_filters.widgets.DateRangeWidget

    def __init__(self, *args, **kwargs):
        super().__init__((UtcIsoDateTimeField(), UtcIsoDateTimeField()), *args, **kwargs)


class UtcIsoDateTimeFromToRangeFilter(django_filters.IsoDateTimeFromToRangeFilter):
    field_class = UtcIsoDateTimeRangeField


class RoleViewSetMixin(ThrottledViewMixin):
    authentication_classes = API_AUTHENTICATION
    permission_classes = [HasRole]
    throttle_classes = API_THROTTLES
    read_role = "viewer"
    write_role = "approver"


# --- detectors -----------------------------------------------------------------------------------

DetectorSerializer = inline_serializer("Detector", {
    "name": serializers.CharField(), "family": serializers.CharField(), "multivariate": serializers.BooleanField(),
    "needs_training": serializers.BooleanField(), "streaming": serializers.BooleanField(),
    "experimental": serializers.BooleanField(),
    "hyperparameters": serializers.DictField(help_text="{name: {default, min, max} or {default, choices}}"),
    "summary": serializers.CharField()}, many=True)


class DetectorListView(RoleViewSetMixin, APIView):
    """The registered detectors a fleet's config may name (`algorithm`, `ensemble_members`), with their
    metadata (detection.ml.detectors.detector_metadata), sorted by name. experimental ones are left
    out of `evaluate --detector all` and of automatic selection."""

    @extend_schema(responses={200: DetectorSerializer})
    def get(self, request):
        from detection.ml import suite  # noqa: F401  (importing it registers every detector)
        from detection.ml.detectors import DETECTORS, detector_metadata

        return Response([detector_metadata(name) for name in sorted(DETECTORS)])


class FleetViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Fleets, by name. Approvers add telemetry with POST /fleets/{name}/telemetry/."""

    serializer_class = FleetSerializer
    queryset = Fleet.objects.all()
    lookup_field = "name"
    filterset_fields: list[str] = []

    def get_throttles(self):
        if self.action == "telemetry":
            self.throttle_scope = "ingest"
        return super().get_throttles()

    @extend_schema(request={"application/json": TelemetryIngestSerializer,
                            "multipart/form-data": TelemetryIngestSerializer},
                   responses={201: TelemetryIngestResultSerializer,
                              400: OpenApiResponse(description="a row or column is invalid; the body names "
                                                               "each (nothing was saved)")})
    @action(detail=True, methods=["post"], parser_classes=[JSONParser, MultiPartParser])
    def telemetry(self, request, name=None):
        """Add telemetry to the fleet: JSON {"rows": [...]} or a CSV upload in `file`; all-or-nothing,
        with the same checks as `manage.py ingest` (each problem names its row and column)."""
        fleet = self.get_object()
        params = TelemetryIngestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            if "file" in data:
                result = ingest.telemetry_ingest_csv(fleet=fleet, upload=data["file"],
                                                     create_devices=data["create_devices"], user=request.user)
            else:
                result = ingest.telemetry_ingest_rows(fleet=fleet, rows=data["rows"],
                                                      create_devices=data["create_devices"], user=request.user)
        except ingest.TelemetryIngestError as exc:
            raise ValidationError({exc.field: exc.messages}) from None
        return Response(TelemetryIngestResultSerializer(result).data, status=status.HTTP_201_CREATED)


class DeviceFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    external_id = django_filters.CharFilter()
    manufacturer = django_filters.CharFilter()
    model = django_filters.CharFilter()
    os_version = django_filters.CharFilter()
    store = django_filters.CharFilter()
    customer = django_filters.CharFilter()

    class Meta:
        model = Device
        fields: list[str] = []


class DeviceViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = DeviceSerializer
    queryset = Device.objects.select_related("fleet").order_by("fleet__name", "external_id")
    filterset_class = DeviceFilterSet


class PipelineRunFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    status = django_filters.ChoiceFilter(choices=RunStatus.choices)
    trigger = django_filters.ChoiceFilter(choices=Trigger.choices)

    class Meta:
        model = PipelineRun
        fields: list[str] = []


class PipelineRunViewSet(RoleViewSetMixin, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Pipeline runs. POST starts one (approver: a run makes a new production model); poll GET /runs/{id}/."""

    serializer_class = PipelineRunSerializer
    queryset = PipelineRun.objects.select_related("fleet", "model_version", "baseline_version")
    filterset_class = PipelineRunFilterSet

    @extend_schema(request=PipelineRunCreateSerializer, responses={202: PipelineRunSerializer})
    def create(self, request, *args, **kwargs):
        params = PipelineRunCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            with transaction.atomic():
                run = services.pipeline_run_create(fleet=params.validated_data["fleet"], trigger=Trigger.API,
                                                   user=request.user, params=params.validated_data["params"])
                services.pipeline_run_enqueue(run=run)
        except services.PipelineRunError as exc:
            raise ValidationError({"params": [str(exc)]}) from None
        run.refresh_from_db()
        return Response(PipelineRunSerializer(run).data, status=status.HTTP_202_ACCEPTED)


class AnomalyResultFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    run = IdFilter(field_name="run_id")
    device = django_filters.CharFilter(field_name="device__external_id")
    severity = django_filters.ChoiceFilter(choices=Severity.choices)
    label = django_filters.TypedChoiceFilter(choices=Label.choices, coerce=int)
    timestamp = UtcIsoDateTimeFromToRangeFilter()
    min_score = django_filters.NumberFilter(field_name="anomaly_score", lookup_expr="gte")
    min_agreement = django_filters.NumberFilter(field_name="agreement", lookup_expr="gte")
    max_agreement = django_filters.NumberFilter(field_name="agreement", lookup_expr="lte")

    class Meta:
        model = AnomalyResult
        fields: list[str] = []


class AnomalyResultViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Scored results, newest first. Filters: fleet, run, device, severity, label (-1 anomaly, 1 normal),
    timestamp_after / timestamp_before (ISO 8601), min_score, min_agreement / max_agreement (an
    ensemble's share of detectors that flag the anomaly, 0..1; results without votes never match)."""

    serializer_class = AnomalyResultSerializer
    queryset = AnomalyResult.objects.select_related("fleet", "device", "model_version", "baseline_version")
    filterset_class = AnomalyResultFilterSet


class ModelVersionFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    status = django_filters.ChoiceFilter(choices=ModelStatus.choices)

    class Meta:
        model = ModelVersion
        fields: list[str] = []


class ModelVersionViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Model versions; approvers promote a candidate or roll a fleet back (both audited)."""

    serializer_class = ModelVersionSerializer
    queryset = ModelVersion.objects.select_related("fleet", "baseline_version")
    filterset_class = ModelVersionFilterSet

    @extend_schema(request=None, responses={200: ModelVersionSerializer})
    @action(detail=True, methods=["post"])
    def promote(self, request, pk=None):
        version = self.get_object()
        try:
            version = services.model_version_promote(version=version, user=request.user)
        except services.ModelVersionError as exc:
            raise field_error(exc) from None
        return Response(ModelVersionSerializer(version).data)

    @extend_schema(request=ModelVersionRollbackSerializer, responses={200: ModelVersionSerializer})
    @action(detail=False, methods=["post"])
    def rollback(self, request):
        params = ModelVersionRollbackSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            version = services.model_version_rollback(fleet=params.validated_data["fleet"], user=request.user)
        except services.ModelVersionError as exc:
            raise field_error(exc) from None
        return Response(ModelVersionSerializer(version).data)


class BaselineVersionFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="fleet__name")
    is_active = django_filters.BooleanFilter()

    class Meta:
        model = BaselineVersion
        fields: list[str] = []


class BaselineVersionViewSet(RoleViewSetMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = BaselineVersionSerializer
    queryset = BaselineVersion.objects.select_related("fleet").order_by("fleet__name", "-number")
    filterset_class = BaselineVersionFilterSet


class AnomalyFeedbackFilterSet(django_filters.FilterSet):
    fleet = django_filters.CharFilter(field_name="anomaly__fleet__name")
    anomaly = IdFilter(field_name="anomaly_id")
    verdict = django_filters.ChoiceFilter(choices=Verdict.choices)
    user = django_filters.CharFilter(field_name="user__username")

    class Meta:
        model = AnomalyFeedback
        fields: list[str] = []


class AnomalyFeedbackViewSet(RoleViewSetMixin, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Review verdicts on anomalies, newest first. Reviewers POST one (one per anomaly and user: a
    re-submit updates it); filters fleet, anomaly, verdict, user."""

    serializer_class = AnomalyFeedbackSerializer
    queryset = AnomalyFeedback.objects.select_related("anomaly__fleet", "user")
    filterset_class = AnomalyFeedbackFilterSet
    write_role = "reviewer"

    @extend_schema(request=AnomalyFeedbackCreateSerializer, responses={201: AnomalyFeedbackSerializer})
    def create(self, request, *args, **kwargs):
        params = AnomalyFeedbackCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            feedback = services.feedback_give(anomaly=data["anomaly"], user=request.user, verdict=data["verdict"],
                                              comment=data["comment"], client_id=data["client_id"])
        except services.FeedbackError as exc:
            raise field_error(exc) from None
        return Response(AnomalyFeedbackSerializer(feedback).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=AnomalyFeedbackBulkSerializer,
                   responses={201: AnomalyFeedbackSerializer(many=True)})
    @action(detail=False, methods=["post"], url_path="bulk")
    def bulk(self, request):
        """One verdict on up to 500 anomalies at once, all or none (services.feedback_give_many); answers
        the feedback rows in the order of the ids. 400 names the ids that are no result or no anomaly."""
        params = AnomalyFeedbackBulkSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            done = services.feedback_give_many_by_id(ids=data["anomalies"], user=request.user,
                                                     verdict=data["verdict"], comment=data["comment"])
        except services.FeedbackError as exc:
            raise field_error(exc) from None
        return Response(AnomalyFeedbackSerializer(done, many=True).data, status=status.HTTP_201_CREATED)
