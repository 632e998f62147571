from django.urls import path

from . import views

app_name = "baselines"

urlpatterns = [
    path("baselines/", views.baseline_index, name="baseline_index"),
    path("fleets/<slug:name>/baselines/", views.baseline_detail, name="baseline_detail"),
    path("fleets/<slug:name>/baselines/diff/", views.baseline_diff, name="baseline_diff"),
    path(
        "fleets/<slug:name>/baselines/<int:number>/rollback/",
        views.baseline_rollback,
        name="baseline_rollback",
    ),
    path("proposals/", views.proposal_list, name="proposal_list"),
    path("proposals/suggest/", views.proposals_suggest, name="proposals_suggest"),
    path("proposals/decide/", views.proposals_decide, name="proposals_decide"),
    path("proposals/<int:pk>/", views.proposal_detail, name="proposal_detail"),
    path("proposals/<int:pk>/status/", views.proposal_status, name="proposal_status"),
    path("proposals/<int:pk>/preview/", views.proposal_preview, name="proposal_preview"),
    path("proposals/<int:pk>/approve/", views.proposal_approve, name="proposal_approve"),
    path("proposals/<int:pk>/reject/", views.proposal_reject, name="proposal_reject"),
    path("audit/", views.audit_list, name="audit_list"),
    path("audit/export.csv", views.audit_export, name="audit_export"),
]
