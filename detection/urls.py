from django.urls import path

from . import views

app_name = "detection"

urlpatterns = [
    path("", views.home, name="home"),
    path("runs/", views.run_list, name="run_list"),
    path("runs/<int:pk>/progress/", views.run_progress, name="run_progress"),
    path("fleets/<slug:name>/runs/", views.run_list, name="fleet_run_list"),
    path("fleets/<slug:name>/anomalies/", views.anomaly_list, name="anomaly_list"),
    path("anomalies/<int:pk>/", views.anomaly_detail, name="anomaly_detail"),
]
