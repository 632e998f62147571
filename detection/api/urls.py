from django.urls import include, path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "api"

router = DefaultRouter()
router.register("fleets", views.FleetViewSet, basename="fleet")
router.register("devices", views.DeviceViewSet, basename="device")
router.register("runs", views.PipelineRunViewSet, basename="run")
router.register("anomalies", views.AnomalyResultViewSet, basename="anomaly")
router.register("model-versions", views.ModelVersionViewSet, basename="model-version")
router.register("baseline-versions", views.BaselineVersionViewSet, basename="baseline-version")
router.register("feedback", views.AnomalyFeedbackViewSet, basename="feedback")

urlpatterns = [
    path("health", views.HealthView.as_view(), name="health"),
    path("health/live", views.LivenessView.as_view(), name="health-live"),
    path("health/ready", views.ReadinessView.as_view(), name="health-ready"),
    path("detectors", views.DetectorListView.as_view(), name="detectors"),
    path("detect", views.DetectView.as_view(), name="detect"),
    path("detect/batch", views.DetectBatchView.as_view(), name="detect-batch"),
    path("", include(router.urls)),
]
