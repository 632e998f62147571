from django.urls import path

from . import views

app_name = "detection"

urlpatterns = [
    path("", views.home, name="home"),
    path("sw.js", views.service_worker, name="service_worker"),
    path("manifest.webmanifest", views.web_manifest, name="web_manifest"),
    path("offline/", views.offline, name="offline"),
    path("runs/", views.run_list, name="run_list"),
    path("runs/<int:pk>/progress/", views.run_progress, name="run_progress"),
    path("fleets/<slug:name>/", views.fleet_overview, name="fleet_overview"),
    path("fleets/<slug:name>/runs/", views.run_list, name="fleet_run_list"),
    path("fleets/<slug:name>/runs/start/", views.run_start, name="run_start"),
    path("fleets/<slug:name>/anomalies/", views.anomaly_list, name="anomaly_list"),
    path("fleets/<slug:name>/anomalies/review/", views.anomaly_feedback_bulk, name="anomaly_feedback_bulk"),
    path("fleets/<slug:name>/devices/", views.device_list, name="device_list"),
    path("fleets/<slug:name>/models/", views.model_version_list, name="model_versions"),
    path("fleets/<slug:name>/models/rollback/", views.model_version_rollback, name="model_version_rollback"),
    path("fleets/<slug:name>/models/<int:version>/promote/", views.model_version_promote,
         name="model_version_promote"),
    path("devices/<int:pk>/", views.device_detail, name="device_detail"),
    path("anomalies/<int:pk>/", views.anomaly_detail, name="anomaly_detail"),
    path("anomalies/<int:pk>/feedback/", views.anomaly_feedback, name="anomaly_feedback"),
]
