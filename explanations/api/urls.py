from rest_framework.routers import DefaultRouter

from .views import ExplanationViewSet

router = DefaultRouter()
router.include_root_view = False
router.register("explanations", ExplanationViewSet, basename="explanation")
