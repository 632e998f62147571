from django.urls import include, path

from . import views
from .api.urls import router

app_name = "explanations"

urlpatterns = [
    path("anomalies/<int:pk>/explanation/", views.explanation_panel, name="panel"),
    path("anomalies/<int:pk>/explanation/generate/", views.explanation_create, name="create"),
    path("api/", include(router.urls)),
]
