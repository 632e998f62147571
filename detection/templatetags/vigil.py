"""Template filters for the detection pages."""
from __future__ import annotations

from django import template

from detection.choices import RunStage
from detection.ml.scoring import split_votes
from detection.models import PipelineRun

register = template.Library()

_STAGE_ORDER = {stage: i for i, stage in enumerate(RunStage.values)}


@register.filter
def seconds(value: float | None) -> str:
    """A duration in seconds as "0.42 s", "12.3 s", "4m 05s" or "2h 03m"; "–" when unknown."""
    if value is None or value == "":
        return "–"
    value = float(value)
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.filter
def stage_breakdown(run: PipelineRun) -> list[dict]:
    """[{stage, label, seconds, rows}] from run.stage_timings and run.row_counts, in pipeline order."""
    timings, rows = run.stage_timings or {}, run.row_counts or {}
    stages = sorted({*timings, *rows}, key=lambda s: (_STAGE_ORDER.get(s, len(_STAGE_ORDER)), s))
    labels = dict(RunStage.choices)
    return [{"stage": s, "label": labels.get(s, s), "seconds": timings.get(s), "rows": rows.get(s)}
            for s in stages]


@register.filter
def has_role(user, role: str) -> bool:
    """{% if user|has_role:"reviewer" %}: whether user holds role (cumulative, superusers hold all)."""
    from detection.permissions import user_has_role

    return user_has_role(user, role)


@register.filter
def percent(value) -> str:
    """A fraction as a percentage with two decimals ("0.42 %"); "–" when unknown."""
    try:
        return f"{float(value) * 100:.2f} %"
    except (TypeError, ValueError):
        return "–"


@register.filter
def model_members(params: dict | None) -> list[str]:
    """An ensemble (or auto) model version's members from its params, in order; [] for one detector."""
    return [m for m in str((params or {}).get("members") or "").split(",") if m]


@register.filter
def grows_trees(params: dict | None, algorithm: str = "") -> bool:
    """Whether the model (`algorithm`, the model version's own field, or params' "algorithm") or one
    of its ensemble members is an Isolation Forest, so that its tree count (n_estimators) means
    something: {{ model.params|grows_trees:model.algorithm }}."""
    params = params or {}
    return bool({"isolation_forest", "hybrid"} & {algorithm, params.get("algorithm"), *model_members(params)})


@register.filter
def detector_settings(params: dict | None) -> list[str]:
    """The hyperparameters a model version's fleet set through detector_params, for the detector it
    ran and (an ensemble) its members: ["lof: n_neighbors 100", ...]; [] when none were set."""
    params = params or {}
    ran = {params.get("algorithm"), *model_members(params)}
    out = []
    for entry in params.get("detector_params") or []:
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in ran:
            out.append(f"{entry[0]}: " + ", ".join(f"{k} {v}" for k, v in entry[1]))
    return out


@register.filter
def member_weights(params: dict | None) -> dict | None:
    """An ensemble model version's member weights from its params: {"weights": [(member, weight)],
    "source": "priors" | "precision on N reviewed anomalies"}; None for a model that is not an ensemble,
    or one with a single member (auto on one metric), whose weight changes nothing."""
    params = params or {}
    weights = [(key.removeprefix("weight_"), value) for key, value in params.items()
               if key.startswith("weight_") and isinstance(value, (int, float))]
    if len(weights) < 2:
        return None
    return {"weights": weights, "source": params.get("weights_source", "priors")}


@register.filter
def detector_votes(anomaly) -> dict | None:
    """An ensemble-scored anomaly's members' votes for the page: {"flagged": [member, ...], "not":
    [member, ...], "total": members, "agreement": the weighted share as "67 %", "" when it is the plain
    share (equal weights) or unknown}; None for a single detector's result (or a result persisted
    before votes were kept, 2026-11-22)."""
    votes = getattr(anomaly, "votes", None)
    if not isinstance(votes, dict) or not votes:
        return None
    flagged, others = split_votes(votes)
    share = getattr(anomaly, "agreement", None)
    weighted = share is not None and abs(float(share) - len(flagged) / len(votes)) > 5e-4
    return {"flagged": flagged, "not": others, "total": len(votes),
            "agreement": f"{float(share) * 100:.0f} %" if weighted else ""}
