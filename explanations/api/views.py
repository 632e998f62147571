"""The explanations API: read explanations, ask for one anomaly's, ask for a whole run's."""
from __future__ import annotations

from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response

from detection.models import PipelineRun
from explanations import selectors, services
from explanations.models import Explanation

from .serializers import ExplanationGenerateSerializer, ExplanationSerializer, RunExplainSerializer


def _id_param(request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: "must be a positive integer"}) from None
    if not 0 < value < 2**63:
        raise ValidationError({name: "must be a positive integer"})
    return value


class ExplanationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Explanations, newest first; filter with ?anomaly=ID or ?run=ID."""

    serializer_class = ExplanationSerializer
    queryset = Explanation.objects.none()

    def get_queryset(self):
        return selectors.explanation_list(anomaly_id=_id_param(self.request, "anomaly"),
                                          run_id=_id_param(self.request, "run"))

    @extend_schema(parameters=[OpenApiParameter("anomaly", int), OpenApiParameter("run", int)])
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(request=ExplanationGenerateSerializer, responses={200: ExplanationSerializer,
                                                                    201: ExplanationSerializer,
                                                                    202: ExplanationSerializer})
    @action(detail=False, methods=["post"])
    def generate(self, request):
        """Explain one anomaly. 200: the cached explanation; 201: generated now (tasks run in-process);
        202: queued (poll GET /api/explanations/{id}/). 400: not an anomaly, unknown provider."""
        params = ExplanationGenerateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        anomaly = selectors.anomaly_get(pk=params.validated_data["anomaly"])
        if anomaly is None:
            raise NotFound(f"no scored result {params.validated_data['anomaly']}")
        try:
            with transaction.atomic():
                explanation, created = services.explanation_request(
                    anomaly=anomaly, provider=params.validated_data.get("provider"),
                    regenerate=params.validated_data["regenerate"], user=request.user)
        except services.ExplanationError as exc:
            raise ValidationError({"anomaly": str(exc)}) from None
        explanation.refresh_from_db()
        code = (status.HTTP_200_OK if not created else
                status.HTTP_202_ACCEPTED if explanation.is_open else status.HTTP_201_CREATED)
        return Response(ExplanationSerializer(explanation).data, status=code)

    @extend_schema(request=RunExplainSerializer, responses={202: None})
    @action(detail=False, methods=["post"], url_path="explain-run")
    def explain_run(self, request):
        """Explain every anomaly of a run in the background (the task skips cached ones unless regenerate).
        Answers 202 with {"run", "explained", "total"}; GET .../progress/?run=ID follows it."""
        params = RunExplainSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        run = get_object_or_404(PipelineRun, pk=params.validated_data["run"])
        try:
            provider = services.provider_resolve(params.validated_data.get("provider"))
        except services.ExplanationError as exc:
            raise ValidationError({"provider": str(exc)}) from None
        from explanations.tasks import explain_run_task

        transaction.on_commit(lambda: explain_run_task.delay(run.pk, provider, params.validated_data["regenerate"]))
        return Response({"run": run.pk, **selectors.run_explanation_progress(run_id=run.pk)},
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(parameters=[OpenApiParameter("run", int, required=True)])
    @action(detail=False, methods=["get"])
    def progress(self, request):
        """{"run", "explained", "total"} for ?run=ID."""
        run_id = _id_param(request, "run")
        if run_id is None:
            raise ValidationError({"run": "this query parameter is required"})
        get_object_or_404(PipelineRun, pk=run_id)
        return Response({"run": run_id, **selectors.run_explanation_progress(run_id=run_id)})
