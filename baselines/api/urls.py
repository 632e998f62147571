"""The feedback loop's API, mounted under /api/v1/ next to detection.api: proposals, audit events and the
rollback of a baseline version (the other baseline-version endpoints are detection.api's)."""

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from . import views

app_name = "baselines-api"

router = SimpleRouter()
router.register("proposals", views.BaselineProposalViewSet, basename="proposal")
router.register("audit-events", views.AuditEventViewSet, basename="audit-event")
router.register("baseline-versions", views.BaselineVersionRollbackViewSet, basename="baseline-version")

urlpatterns = [path("", include(router.urls))]
