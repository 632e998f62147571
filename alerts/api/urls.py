from rest_framework.routers import SimpleRouter

from . import views

app_name = "alerts-api"

# SimpleRouter: the API root view belongs to detection.api.urls, mounted at the same prefix.
router = SimpleRouter()
router.register("alerts", views.AlertViewSet, basename="alert")
router.register("alert-rules", views.AlertRuleViewSet, basename="alert-rule")
router.register("drift-reports", views.DriftReportViewSet, basename="drift-report")

urlpatterns = router.urls
