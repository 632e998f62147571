from django.urls import path

from . import views

app_name = "alerts"

urlpatterns = [
    path("alerts/", views.alert_list, name="alert_list"),
    path("alerts/<int:pk>/", views.alert_detail, name="alert_detail"),
    path("alerts/<int:pk>/acknowledge/", views.alert_acknowledge, name="alert_acknowledge"),
    path("alerts/<int:pk>/resolve/", views.alert_resolve, name="alert_resolve"),
    path("alerts/<int:pk>/review/", views.alert_review, name="alert_review"),
    path("alerts/<int:pk>/snooze/", views.alert_snooze, name="alert_snooze"),
    path("alerts/rules/", views.rule_list, name="rule_list"),
    path("alerts/rules/new/", views.rule_create, name="rule_create"),
    path("alerts/rules/<int:pk>/", views.rule_edit, name="rule_edit"),
    path("alerts/rules/<int:pk>/delete/", views.rule_delete, name="rule_delete"),
    path("fleets/<slug:name>/health/", views.model_health, name="model_health"),
]
