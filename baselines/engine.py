"""Robust baselines (median and MAD) per level, and robust z-scores against them. Django-free.

Levels and their group columns:
    global   -> (none)
    cohort   -> the fleet's cohort columns (manufacturer, model, os_version)
    store    -> store
    customer -> customer
    device   -> external_id
A group with fewer than ``min_rows`` non-missing values of a feature takes its parent's statistics
(device -> cohort -> global, store -> customer -> global), and so does a group whose MAD is 0
(a constant feature within the group).

The MAD is floored at the MAD-equivalent of the mean absolute deviation (1.2533/1.4826 times it).
Both estimate the same sigma on normal data, so the floor changes nothing there; on zero-inflated
telemetry (network traffic that is near 0 all night), the plain MAD collapses to the night-time
noise and turns every daytime value into a "20-sigma" outlier, while the floored one does not.

A device's MAD is also at least DEVICE_MAD_FLOOR (0.1) times its cohort's. A metric that trends
slowly by nature (storage filling up, an odometer) is nearly noise-free within one device, so its
device MAD over the training window is tiny and the device's next days sit many "sigmas" from its
training median. On the synthetic fleet (100 devices trained on 7 days, then scored on the next 5),
the share of rows flagged went from 17 % on the first day after training to 94 % on the fifth, driven
by storage_free's device-level z (the hybrid detector's temporal score); with the floor it stays at
4-6 %. In-sample detection of the injected windows (benchmarks/synthetic_quality.py), SKAB and
C-MAPSS are unchanged. A device-level change that matters (a step of a tenth of the cohort's spread
or more) still scores high. Other levels keep their own MAD: a cohort, store or customer spans many
devices over the whole window, so its spread already holds the devices' drift. A fleet sets its own
floor with the detection setting `device_mad_floor` (PipelineConfig.device_mad_floor); SKAB's
benchmark config raises it to 0.5 (detection.evaluation.SKAB_FLEET_CONFIG says why).

The robust z-score is (x - median) / (1.4826 * MAD)
(Iglewicz & Hoaglin, "How to Detect and Handle Outliers", 1993; Rousseeuw & Croux, 1993).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MAD_TO_SIGMA = 1.4826
# Mean absolute deviation -> MAD for normal data: sigma = 1.2533 * meanAD = 1.4826 * MAD.
MEAN_AD_TO_MAD = 1.2533 / MAD_TO_SIGMA
# A device's MAD is at least this share of its cohort's (see the module docstring).
DEVICE_MAD_FLOOR = 0.1
LEVELS = ("global", "cohort", "store", "customer", "device")
PARENT = {"global": None, "cohort": "global", "customer": "global", "store": "customer", "device": "cohort"}
STAT_COLUMNS = ["level", "group_key", "feature", "median", "mad", "count", "fallback_level"]


class BaselineError(ValueError):
    """The baselines cannot be computed or applied (missing columns, no rows, unknown level)."""


@dataclass
class BaselineSet:
    """A complete set of statistics.

    stats: one row per (level, group_key, feature), columns STAT_COLUMNS. group_key is a JSON
        object of the level's group columns (``{}`` for global). median and mad are the resolved
        values (after fall-back); fallback_level names the level they came from when it is not
        the row's own, and count is the group's own number of non-missing values.
    group_columns: {level: [columns]}.
    overrides: detector settings that reviewers' feedback changed along with the statistics (see
        apply_feedback): {"contamination": float, "domain_weights": {domain: weight}}; empty for a set
        computed from data. Read it with model_overrides(), which also copes with sets pickled before
        the field existed.
    """

    levels: tuple[str, ...]
    features: list[str]
    min_rows: int
    group_columns: dict[str, list[str]]
    stats: pd.DataFrame = field(repr=False)
    overrides: dict = field(default_factory=dict)

    def table(self, level: str, what: str) -> pd.DataFrame:
        """Wide table for one level: index = group columns, columns = features, values = median or mad."""
        rows = self.stats[self.stats["level"] == level]
        wide = rows.pivot(index="group_key", columns="feature", values=what).reindex(columns=self.features)
        wide = wide.reindex(rows["group_key"].drop_duplicates())
        cols = self.group_columns[level]
        if cols:
            keys = pd.DataFrame([json.loads(k) for k in wide.index], columns=cols)
            wide.index = pd.MultiIndex.from_frame(keys) if len(cols) > 1 else pd.Index(keys[cols[0]], name=cols[0])
        return wide


def level_columns(cohort_columns: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    return {"global": [], "cohort": list(cohort_columns), "store": ["store"], "customer": ["customer"],
            "device": ["external_id"]}


def compute_baselines(
    df: pd.DataFrame,
    feature_cols: list[str],
    levels: tuple[str, ...] | list[str] = LEVELS,
    *,
    min_rows: int = 25,
    cohort_columns: tuple[str, ...] | list[str] = ("manufacturer", "model", "os_version"),
    max_rows_per_group: int = 500,
    seed: int = 0,
    device_mad_floor: float = DEVICE_MAD_FLOOR,
) -> BaselineSet:
    """Median and MAD of every feature for every group of every level.

    df: rows x (group columns of the requested levels + feature_cols); NaNs are ignored.
    max_rows_per_group / seed: median and MAD come from a seeded random sample of at most this
        many rows per group (see _group_median_mad); counts are over every row.
    device_mad_floor: each device's MAD is at least this share of its cohort's (0: no floor).
    Parents of requested levels are computed too, since fall-back needs them.
    Raises BaselineError for an unknown level, missing columns or an empty frame.
    """
    unknown = [lv for lv in levels if lv not in PARENT]
    if unknown:
        raise BaselineError(f"unknown baseline level(s) {unknown}; known: {list(LEVELS)}")
    if df.empty:
        raise BaselineError("no rows to compute baselines from")
    group_columns = level_columns(cohort_columns)
    needed = _with_parents(levels)
    missing = sorted({c for lv in needed for c in group_columns[lv]} - set(df.columns)
                     | (set(feature_cols) - set(df.columns)))
    if missing:
        raise BaselineError(f"baseline input lacks column(s): {', '.join(missing)}")

    values = df[feature_cols].astype("float64")
    resolved: dict[str, pd.DataFrame] = {}
    frames = []
    for level in needed:  # parents first
        cols = group_columns[level]
        own_median, own_mad, count = _group_median_mad(df, values, cols, max_rows_per_group, seed)
        median, mad, fallback = own_median.copy(), own_mad.copy(), pd.DataFrame("", index=own_median.index,
                                                                              columns=feature_cols)
        parent = PARENT[level]
        if parent is not None:
            weak = (count < min_rows) | ~(own_mad > 0)
            floored = level == "device" and device_mad_floor > 0
            if floored or weak.to_numpy().any():
                p_median, p_mad = _parent_stats_for(df, cols, group_columns[parent], resolved[parent], own_median.index)
                median = median.mask(weak, p_median)
                mad = mad.mask(weak, p_mad)
                fallback = fallback.mask(weak, parent)
                if floored:
                    mad = np.fmax(mad, device_mad_floor * p_mad)
        else:
            fallback_scale = _mean_abs_dev_scale(values).to_numpy()
            fallback_scale = np.where(fallback_scale > 0, fallback_scale, 1.0)
            mad = mad.where(mad > 0, pd.DataFrame([fallback_scale], index=mad.index, columns=mad.columns))
        resolved[level] = pd.concat({"median": median, "mad": mad}, axis=1)
        frames.append(_long(level, cols, median, mad, count, fallback))
    stats = pd.concat(frames, ignore_index=True)[STAT_COLUMNS]
    return BaselineSet(tuple(needed), list(feature_cols), min_rows, group_columns, stats)


def apply_baselines(
    df: pd.DataFrame, baselines: BaselineSet, levels: tuple[str, ...] | list[str] = ("cohort",),
    *, features: list[str] | None = None, join: bool = True,
) -> pd.DataFrame:
    """Robust z-score columns ``{feature}_z_{level}`` for each requested level.

    df: rows x (group columns + features). Rows whose group was not seen when the baselines were
    computed take the parent level's statistics (a new device gets its cohort's). Returns a new
    frame: df with the z columns added (join=True), or the z columns alone on df's index
    (join=False, which spares copying a wide input). Raises BaselineError for a level not in the set.
    """
    features = features or baselines.features
    x = df[features].to_numpy(dtype="float64")
    blocks, names = [], []
    for level in levels:
        median, mad, _ = lookup(df, baselines, level, features)
        blocks.append((x - median) / (MAD_TO_SIGMA * mad))
        names += [f"{f}_z_{level}" for f in features]
    z = pd.DataFrame(np.hstack(blocks), index=df.index, columns=names)
    return pd.concat([df, z], axis=1) if join else z


def lookup(
    df: pd.DataFrame, baselines: BaselineSet, level: str, features: list[str], *, with_levels: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-row median and MAD of `features` at `level`.

    Returns (median rows x features, mad rows x features, level_used): level_used is, when
    with_levels is set, a rows x features array naming the level each value came from after
    fall-back (a new group the set has not seen takes its parent level's statistics), else None.
    Raises BaselineError for a level not in the set.
    """
    if level not in baselines.levels:
        raise BaselineError(f"level {level!r} is not in this baseline set ({list(baselines.levels)})")
    cols = baselines.group_columns[level]
    med_t, mad_t = baselines.table(level, "median")[features], baselines.table(level, "mad")[features]
    fb_t = baselines.table(level, "fallback_level")[features].replace("", level).to_numpy() if with_levels else None
    if not cols:
        n = len(df)
        return (np.tile(med_t.to_numpy()[0], (n, 1)), np.tile(mad_t.to_numpy()[0], (n, 1)),
                np.tile(fb_t[0], (n, 1)) if with_levels else None)
    idx = med_t.index.get_indexer(pd.MultiIndex.from_frame(df[cols]) if len(cols) > 1 else df[cols[0]])
    median, mad = med_t.to_numpy()[idx], mad_t.to_numpy()[idx]
    level_used = fb_t[idx] if with_levels else None
    unseen = idx < 0
    if unseen.any():
        p_median, p_mad, p_level = lookup(df[unseen], baselines, PARENT[level], features, with_levels=with_levels)
        median[unseen], mad[unseen] = p_median, p_mad
        if with_levels:
            level_used[unseen] = p_level
    return median, mad, level_used


def _with_parents(levels) -> list[str]:
    order: list[str] = []
    for level in LEVELS:
        chain, lv = [], level
        if level not in levels:
            continue
        while lv is not None:
            chain.append(lv)
            lv = PARENT[lv]
        for c in reversed(chain):
            if c not in order:
                order.append(c)
    return order


def _group_median_mad(df, values, cols, max_rows_per_group, seed):
    """Per-group median, MAD and non-missing count; each is a frame indexed by the group keys.

    Median and MAD are estimated on at most `max_rows_per_group` rows of each group, drawn at
    random with a fixed seed (the count is over all rows). With 500 rows the standard error of a
    median is about 0.06 standard deviations (1.2533 / sqrt(n) for normal data), far below what
    an anomaly threshold on robust z-scores resolves.
    """
    if not cols:
        x = values.to_numpy()
        count = np.isfinite(x).sum(axis=0)
        if len(x) > max_rows_per_group:
            x = x[np.random.default_rng(seed).choice(len(x), max_rows_per_group, replace=False)]
        with np.errstate(all="ignore"):
            med = np.nanmedian(x, axis=0)
            deviation = np.abs(x - med)
            mad = np.fmax(np.nanmedian(deviation, axis=0), MEAN_AD_TO_MAD * np.nanmean(deviation, axis=0))
        index = pd.Index(["all"])
        return (pd.DataFrame([med], index=index, columns=values.columns),
                pd.DataFrame([mad], index=index, columns=values.columns),
                pd.DataFrame([count], index=index, columns=values.columns))
    grouped = values.groupby([df[c] for c in cols], sort=True, observed=True)
    count = grouped.count()
    codes = grouped.ngroup().to_numpy()
    order = np.lexsort((np.random.default_rng(seed).random(len(codes)), codes))
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(sorted_codes[1:] != sorted_codes[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.sort(order[rank < max_rows_per_group])
    x, kept_codes = values.to_numpy()[keep], codes[keep]
    median = pd.DataFrame(x).groupby(kept_codes, sort=True).median()
    # Broadcasting the group medians by code is much cheaper than groupby().transform("median").
    deviation = pd.DataFrame(np.abs(x - median.to_numpy()[kept_codes])).groupby(kept_codes, sort=True)
    mad = np.fmax(deviation.median(), MEAN_AD_TO_MAD * deviation.mean())
    median.index, median.columns = count.index, values.columns
    mad.index, mad.columns = count.index, values.columns
    return median, mad, count


def _parent_stats_for(df, cols, parent_cols, parent_resolved, index):
    """Statistics of each group's parent group, aligned to `index` (the group's own keys)."""
    if not parent_cols:
        row = parent_resolved.iloc[0]
        med = pd.DataFrame([row["median"].to_numpy()] * len(index), index=index, columns=row["median"].index)
        mad = pd.DataFrame([row["mad"].to_numpy()] * len(index), index=index, columns=row["mad"].index)
        return med, mad
    mapping = df[cols + [c for c in parent_cols if c not in cols]].drop_duplicates(cols).set_index(cols)
    mapping = mapping.reindex(index)
    parent_keys = pd.MultiIndex.from_frame(mapping[parent_cols]) if len(parent_cols) > 1 \
        else pd.Index(mapping[parent_cols[0]])
    med = parent_resolved["median"].reindex(parent_keys)
    mad = parent_resolved["mad"].reindex(parent_keys)
    med.index, mad.index = index, index
    return med, mad


def _mean_abs_dev_scale(values: pd.DataFrame) -> pd.Series:
    """1.2533 * mean absolute deviation / 1.4826: the MAD-equivalent when the MAD itself is 0."""
    return 1.2533 * (values - values.mean()).abs().mean() / MAD_TO_SIGMA


def _long(level, cols, median, mad, count, fallback) -> pd.DataFrame:
    keys = [json.dumps(dict(zip(cols, _as_tuple(k))), default=str) for k in median.index] if cols \
        else ["{}"] * len(median)
    parts = []
    for name, frame in (("median", median), ("mad", mad), ("count", count), ("fallback_level", fallback)):
        f = frame.copy()
        f.index = keys
        parts.append(f.stack(future_stack=True).rename(name))
    out = pd.concat(parts, axis=1).reset_index()
    out.columns = ["group_key", "feature", "median", "mad", "count", "fallback_level"]
    out.insert(0, "level", level)
    out["count"] = out["count"].fillna(0).astype("int64")
    out["fallback_level"] = out["fallback_level"].fillna("")
    return out


def _as_tuple(key):
    return key if isinstance(key, tuple) else (key,)


# --- reviewers' feedback -> proposed adjustments ----------------------------------------------------
#
# A false positive that reviewers keep marking in one (level, group, feature) says the baseline of that
# group is wrong there: its median sits off the group's real centre (FPs deviate in one direction), or
# its MAD is too narrow (FPs on both sides). The rules below find such groups from counts and propose a
# bounded, damped correction (learning rate), in the spirit of relevance feedback (Rocchio, 1971) and of
# the human-in-the-loop threshold tuning of Siddiqui et al., "Feedback-Guided Anomaly Discovery via
# Online Optimization" (KDD 2018). Two model-level knobs follow the same evidence: the contamination (a
# fixed share of rows is always flagged, so clearing false positives without lowering it only flags
# other rows) and the weight of a feature domain whose anomalies reviewers reject.

KINDS = ("shift", "mad_scale", "contamination", "domain_weight")
FP, TP = "false_positive", "true_positive"
EVIDENCE_COLUMNS = ["level", "group_key", "feature", "n_reviewed", "n_false_positive", "n_true_positive",
                    "share", "direction", "direction_share", "typical_deviation", "typical_abs_z", "median", "mad"]


class AdjustmentRefused(BaselineError):
    """A proposed adjustment is outside the bounds, or names an unknown level, group or feature.
    `reason` says which and why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class BaselineFeedback:
    """One proposed change, as baselines.models.BaselineProposal stores it.

    kind "shift": move the median of (level, group_key, feature) by `adjustment` (feature units) times
    the learning rate. "mad_scale": multiply its MAD by 1 + lr * (adjustment - 1) (adjustment = the MAD
    factor). "contamination": move the model's contamination towards `adjustment`. "domain_weight":
    move the weight of the domain named in `feature` towards `adjustment` (level "model", group {}).
    evidence: counts behind it (n_reviewed, n_false_positive, n_true_positive, share, typical deviation,
    and for model-level kinds "current", the value it started from).
    """

    level: str
    group_key: dict
    feature: str
    adjustment: float
    reason: str
    kind: str = "shift"
    evidence: dict = field(default_factory=dict)

    def key(self) -> tuple[str, str, str, str]:
        return (self.kind, self.level, json.dumps(self.group_key, sort_keys=True, default=str), self.feature)


def model_overrides(baselines: BaselineSet) -> dict:
    """The contamination / domain weights feedback set on this baseline set ({} when none)."""
    return dict(getattr(baselines, "overrides", None) or {})


def resolve_verdicts(feedback: pd.DataFrame) -> pd.Series:
    """One verdict per anomaly: the majority of true/false-positive verdicts ("not_sure" does not
    vote; a tie leaves the anomaly out). feedback: rows x (anomaly_id, verdict). Returns a Series
    anomaly_id -> "true_positive" | "false_positive"."""
    missing = {"anomaly_id", "verdict"} - set(feedback.columns)
    if missing:
        raise BaselineError(f"feedback frame lacks column(s): {', '.join(sorted(missing))}")
    votes = feedback[feedback["verdict"].isin([FP, TP])]
    if votes.empty:
        return pd.Series(dtype=object, name="verdict")
    counts = votes.groupby(["anomaly_id", "verdict"]).size().unstack(fill_value=0).reindex(
        columns=[FP, TP], fill_value=0)
    decided = counts[counts[FP] != counts[TP]]
    return pd.Series(np.where(decided[FP] > decided[TP], FP, TP), index=decided.index, name="verdict")


def _attributions(anomalies, verdicts, baselines, levels, z_min) -> pd.DataFrame:
    """Long frame: one row per (reviewed anomaly, level, feature) with |robust z| >= z_min."""
    reviewed = anomalies[anomalies["anomaly_id"].isin(verdicts.index)].reset_index(drop=True)
    columns = ["anomaly_id", "verdict", "level", "group_key", "feature", "z", "deviation", "median", "mad"]
    if reviewed.empty:
        return pd.DataFrame(columns=columns)
    features = [f for f in baselines.features if f in reviewed.columns]
    x = reviewed[features].to_numpy(dtype="float64")
    parts = []
    for level in levels:
        median, mad, _ = lookup(reviewed, baselines, level, features)
        z = (x - median) / (MAD_TO_SIGMA * mad)
        rows, cols = np.nonzero(np.abs(np.nan_to_num(z)) >= z_min)
        if not len(rows):
            continue
        gcols = baselines.group_columns[level]
        keys = (reviewed[gcols].astype(str).apply(lambda r: json.dumps(dict(zip(gcols, r)), default=str), axis=1)
                if gcols else pd.Series(["{}"] * len(reviewed)))
        parts.append(pd.DataFrame({
            "anomaly_id": reviewed["anomaly_id"].to_numpy()[rows],
            "verdict": verdicts.reindex(reviewed["anomaly_id"]).to_numpy()[rows],
            "level": level, "group_key": keys.to_numpy()[rows], "feature": np.array(features)[cols],
            "z": z[rows, cols], "deviation": (x - median)[rows, cols], "median": median[rows, cols],
            "mad": mad[rows, cols]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def _evidence(att: pd.DataFrame) -> pd.DataFrame:
    if att.empty:
        return pd.DataFrame(columns=EVIDENCE_COLUMNS)
    out = []
    for (level, key, feature), g in att.groupby(["level", "group_key", "feature"], sort=True):
        fp = g[g["verdict"] == FP]
        n_fp, n = len(fp), len(g)
        signs = np.sign(fp["z"]) if n_fp else np.sign(g["z"])
        direction = 1 if (signs > 0).sum() >= (signs < 0).sum() else -1
        out.append({
            "level": level, "group_key": key, "feature": feature, "n_reviewed": n, "n_false_positive": n_fp,
            "n_true_positive": n - n_fp, "share": round(n_fp / n, 4), "direction": direction,
            "direction_share": round(float((signs == direction).mean()), 4) if len(signs) else 0.0,
            "typical_deviation": float(fp["deviation"].median()) if n_fp else 0.0,
            "typical_abs_z": float(fp["z"].abs().median()) if n_fp else 0.0,
            "median": float(g["median"].iloc[0]), "mad": float(g["mad"].iloc[0])})
    return pd.DataFrame(out, columns=EVIDENCE_COLUMNS)


def feedback_evidence(anomalies: pd.DataFrame, feedback: pd.DataFrame, baselines: BaselineSet,
                      levels: list[str], *, z_min: float = 3.0) -> pd.DataFrame:
    """Counts of reviewed anomalies per (level, group, feature) in which the anomaly deviates.

    anomalies, feedback: as for suggest_baseline_adjustments. An anomaly counts in (level, group,
    feature) when its robust z-score there is at least z_min in absolute value.
    Returns rows x EVIDENCE_COLUMNS: n_reviewed / n_false_positive / n_true_positive (anomalies), share
    (false-positive share), direction (+1 / -1, the majority sign of the false positives' z),
    direction_share (the share of false positives with that sign), typical_deviation (median of value -
    baseline median over the false positives, feature units), typical_abs_z (their median |z|), median
    and mad (the group's current statistics). Raises BaselineError for missing columns or levels.
    """
    _check_anomalies(anomalies, baselines, levels)
    return _evidence(_attributions(anomalies, resolve_verdicts(feedback), baselines, levels, z_min))


def suggest_baseline_adjustments(
    anomalies: pd.DataFrame, feedback: pd.DataFrame, baselines: BaselineSet, levels: list[str], *,
    min_count: int = 5, min_share: float = 0.7, z_min: float = 3.0, direction_share: float = 0.8,
    learning_rate: float = 0.35, max_shift_mad: float = 1.5, mad_factor_bounds: tuple[float, float] = (0.5, 2.0),
    contamination: float | None = None, feature_domain: dict[str, str] | None = None,
    domain_weights: dict[str, float] | None = None, contamination_min_share: float = 0.5,
    temporal_features: list[str] | None = None, temporal_level: str = "device",
) -> list[BaselineFeedback]:
    """Propose baseline adjustments where reviewers mostly reject the anomalies.

    anomalies: rows x (anomaly_id, the group columns of `levels` (e.g. manufacturer, model, os_version,
        external_id), one float column per baseline feature holding the row's engineered value (NaN
        allowed), and optionally top_feature (the feature that explained the anomaly best)); one row
        per flagged row of the scored run.
    feedback: rows x (anomaly_id, verdict), verdict in true_positive / false_positive / not_sure; several
        reviewers per anomaly allowed (resolve_verdicts takes the majority).
    levels: the baseline levels to look at, most specific last or first as you like: each reviewed
        (anomaly, feature) pair is used by the first level (in this order) whose group gets a proposal.

    Rules, for each (level, group, feature) where at least `min_count` reviewed anomalies deviate by
    |z| >= z_min and at least `min_share` of them are false positives:
    - the false positives deviate in one direction (>= direction_share of them): kind "shift", an
      adjustment (feature units) that would bring the typical false positive to |z| = z_min, clipped so
      that learning_rate * adjustment stays within max_shift_mad MADs;
    - otherwise: kind "mad_scale", factor typical |z| / z_min, within mad_factor_bounds.
    Model level (needs `contamination`, the current value): when at least min_count anomalies are
    reviewed and contamination_min_share of them are false positives (most flagged rows are rejected,
    so the flagged share is too high), kind "contamination" towards current x
    (1 - false-positive share), not below mad_factor_bounds[0] x current. Per feature domain (needs
    feature_domain {feature: domain}; anomalies grouped by top_feature): a domain whose precision is
    under half the overall one and meets min_count / min_share gets kind "domain_weight" towards
    current x (its precision / overall precision), not below mad_factor_bounds[0] x current.
    Returns proposals (possibly none), largest evidence first. Raises BaselineError for missing
    columns or levels. Every proposal passes apply_feedback's bounds with the same settings.
    """
    _check_anomalies(anomalies, baselines, levels)
    verdicts = resolve_verdicts(feedback)
    att = _attributions(anomalies, verdicts, baselines, levels, z_min)
    lo, hi = mad_factor_bounds
    proposals: list[BaselineFeedback] = []
    covered: set[tuple] = set()
    for level in levels:
        rows = att[att["level"] == level]
        if covered and not rows.empty:
            pairs = list(zip(rows["anomaly_id"], rows["feature"]))
            rows = rows[[p not in covered for p in pairs]]
        for ev in _evidence(rows).itertuples(index=False):
            if ev.n_reviewed < min_count or ev.share < min_share or ev.n_false_positive < min_count:
                continue
            sigma = MAD_TO_SIGMA * ev.mad
            evidence = {"n_reviewed": int(ev.n_reviewed), "n_false_positive": int(ev.n_false_positive),
                        "n_true_positive": int(ev.n_true_positive), "share": float(ev.share),
                        "typical_deviation": round(float(ev.typical_deviation), 6),
                        "typical_abs_z": round(float(ev.typical_abs_z), 3), "median": ev.median, "mad": ev.mad}
            where = f"{level} {ev.group_key if ev.group_key != '{}' else '(all)'} {ev.feature}"
            if ev.direction_share >= direction_share:
                wanted = ev.typical_deviation - ev.direction * z_min * sigma
                limit = max_shift_mad * ev.mad / learning_rate
                adjustment = float(np.clip(wanted, -limit, limit))
                if adjustment * ev.direction <= 0:
                    continue
                kind = "shift"
                reason = (f"{ev.n_false_positive} of {ev.n_reviewed} reviewed anomalies in {where} are false "
                          f"positives, {ev.direction_share:.0%} of them {'above' if ev.direction > 0 else 'below'} "
                          f"the median by a typical {ev.typical_deviation:+.4g} (|z| {ev.typical_abs_z:.1f}); "
                          f"move the median by {adjustment:+.4g}")
            else:
                factor = float(np.clip(ev.typical_abs_z / z_min, 1.0, hi))
                if factor <= 1.0:
                    continue
                adjustment, kind = round(factor, 4), "mad_scale"
                reason = (f"{ev.n_false_positive} of {ev.n_reviewed} reviewed anomalies in {where} are false "
                          f"positives on both sides of the median (typical |z| {ev.typical_abs_z:.1f}); widen "
                          f"the MAD by a factor {factor:.3g}")
            evidence["direction_share"] = float(ev.direction_share)
            proposals.append(BaselineFeedback(level, json.loads(ev.group_key), ev.feature, adjustment, reason,
                                              kind, evidence))
            hit = rows[(rows["group_key"] == ev.group_key) & (rows["feature"] == ev.feature)]
            covered.update(zip(hit["anomaly_id"], hit["feature"]))

    n = len(verdicts)
    n_fp = int((verdicts == FP).sum())
    precision = (n - n_fp) / n if n else 0.0
    if contamination is not None and n >= min_count and n_fp / n >= contamination_min_share:
        target = float(max(contamination * (1 - n_fp / n), contamination * lo))
        proposals.append(BaselineFeedback(
            "model", {}, "contamination", target,
            f"{n_fp} of {n} reviewed anomalies are false positives: flag fewer rows, contamination "
            f"{contamination:.4g} -> {target:.4g}", "contamination",
            {"n_reviewed": n, "n_false_positive": n_fp, "n_true_positive": n - n_fp,
             "share": round(n_fp / n, 4), "current": contamination}))
    if feature_domain and n and precision > 0:
        reviewed = anomalies[anomalies["anomaly_id"].isin(verdicts.index)]
        top = (reviewed["top_feature"] if "top_feature" in reviewed.columns
               else _top_feature(reviewed, baselines, levels[0]))
        frame = pd.DataFrame({"domain": top.map(lambda f: feature_domain.get(f, "other")).to_numpy(),
                              "verdict": verdicts.reindex(reviewed["anomaly_id"]).to_numpy()})
        current = dict(domain_weights or {})
        current.update(model_overrides(baselines).get("domain_weights", {}))
        for domain, g in frame.groupby("domain", sort=True):
            d_fp = int((g["verdict"] == FP).sum())
            d_n = len(g)
            d_precision = (d_n - d_fp) / d_n
            if d_n < min_count or d_fp / d_n < min_share or d_precision >= precision / 2:
                continue
            weight = float(current.get(domain, 1.0))
            target = float(max(weight * d_precision / precision, weight * lo))
            proposals.append(BaselineFeedback(
                "model", {}, str(domain), target,
                f"{d_fp} of {d_n} reviewed anomalies explained by the {domain} domain are false positives "
                f"(precision {d_precision:.2f} against {precision:.2f} overall); weight {weight:.3g} -> {target:.3g}",
                "domain_weight", {"n_reviewed": d_n, "n_false_positive": d_fp, "n_true_positive": d_n - d_fp,
                                  "share": round(d_fp / d_n, 4), "current": weight}))
    if temporal_features and temporal_level in baselines.levels:
        seen = {p.key() for p in proposals}
        proposals += [p for p in _temporal_proposals(
            anomalies, verdicts, baselines, [f for f in temporal_features if f in baselines.features],
            temporal_level, min_count=min_count, min_share=min_share, mad_factor_bounds=mad_factor_bounds,
            domain_weights=domain_weights) if p.key() not in seen]
    proposals.sort(key=lambda p: -p.evidence.get("n_false_positive", 0))
    return proposals


TEMPORAL_DOMAIN = "temporal"  # detection.ml.detectors.TEMPORAL_DOMAIN (the engine stays Django- and model-free)


def _temporal_proposals(anomalies, verdicts, baselines, features, level, *, min_count, min_share,
                        mad_factor_bounds, domain_weights) -> list[BaselineFeedback]:
    """Proposals on the hybrid detector's temporal score: max |robust z| at `level` over `features`.

    - Ranking: when reviewed true positives sit clearly higher on the temporal score than false
      positives (median ratio >= 1.5, at least min_count of each), the temporal score separates them
      better than the rest of the model: kind "domain_weight" on TEMPORAL_DOMAIN, towards current x
      that ratio, within mad_factor_bounds.
    - Per group: each reviewed anomaly is attributed to the feature that gives its temporal score;
      a (group, feature) with at least min_count such anomalies, at least min_share of them false
      positives, gets kind "mad_scale" by the false positives' typical |z| (a typical false positive
      lands at |z| 1), within mad_factor_bounds. These anomalies sit below the z_min rule's reach,
      yet they are what the temporal score flags.
    """
    lo, hi = mad_factor_bounds
    reviewed = anomalies[anomalies["anomaly_id"].isin(verdicts.index)].reset_index(drop=True)
    features = [f for f in features if f in reviewed.columns]
    if reviewed.empty or not features:
        return []
    median, mad, _ = lookup(reviewed, baselines, level, features)
    z = np.abs(np.nan_to_num((reviewed[features].to_numpy(dtype="float64") - median) / (MAD_TO_SIGMA * mad)))
    score, driver = z.max(axis=1), z.argmax(axis=1)
    verdict = verdicts.reindex(reviewed["anomaly_id"]).to_numpy()
    is_fp, is_tp = verdict == FP, verdict == TP
    out: list[BaselineFeedback] = []
    if is_fp.sum() >= min_count and is_tp.sum() >= min_count:
        tp_z, fp_z = float(np.median(score[is_tp])), float(np.median(score[is_fp]))
        ratio = tp_z / fp_z if fp_z > 0 else np.inf
        if ratio >= 1.5:
            current = float({**(domain_weights or {}), **model_overrides(baselines).get("domain_weights", {})}
                            .get(TEMPORAL_DOMAIN, 1.0))
            target = float(min(current * ratio, current * hi))
            out.append(BaselineFeedback(
                "model", {}, TEMPORAL_DOMAIN, target,
                f"reviewed true positives sit at a typical temporal |z| {tp_z:.2f} against {fp_z:.2f} for the "
                f"{int(is_fp.sum())} false positives of {len(reviewed)} reviewed: the temporal score separates them; "
                f"weight {current:.3g} -> {target:.3g}", "domain_weight",
                {"n_reviewed": len(reviewed), "n_false_positive": int(is_fp.sum()), "n_true_positive": int(is_tp.sum()),
                 "share": round(float(is_fp.mean()), 4), "current": current, "typical_abs_z_tp": round(tp_z, 3),
                 "typical_abs_z": round(fp_z, 3)}))
    cols = baselines.group_columns[level]
    keys = (reviewed[cols].astype(str).apply(lambda r: json.dumps(dict(zip(cols, r)), default=str), axis=1)
            if cols else pd.Series(["{}"] * len(reviewed)))
    frame = pd.DataFrame({"key": keys.to_numpy(), "feature": np.array(features)[driver], "z": score,
                          "fp": is_fp, "tp": is_tp, "row": np.arange(len(reviewed))})
    for (key, feature), g in frame[frame["fp"] | frame["tp"]].groupby(["key", "feature"], sort=True):
        n, n_fp = len(g), int(g["fp"].sum())
        if n < min_count or n_fp < min_count or n_fp / n < min_share:
            continue
        typical = float(g.loc[g["fp"], "z"].median())
        factor = round(float(np.clip(typical, 1.0, hi)), 4)
        if factor <= 1.0:
            continue
        j = features.index(feature)
        row = int(g["row"].iloc[0])
        where = f"{level} {key if key != '{}' else '(all)'} {feature}"
        out.append(BaselineFeedback(
            level, json.loads(key), feature, factor,
            f"{n_fp} of {n} reviewed anomalies whose temporal score comes from {where} are false positives "
            f"(typical |z| {typical:.2f}); widen the MAD by a factor {factor:.3g}", "mad_scale",
            {"n_reviewed": n, "n_false_positive": n_fp, "n_true_positive": n - n_fp, "share": round(n_fp / n, 4),
             "typical_abs_z": round(typical, 3), "median": float(median[row, j]), "mad": float(mad[row, j]),
             "temporal": True}))
    return out


def apply_feedback(
    baselines: BaselineSet, feedback: list[BaselineFeedback], learning_rate: float = 0.35, *,
    max_shift_mad: float = 1.5, mad_factor_bounds: tuple[float, float] = (0.5, 2.0),
    contamination_bounds: tuple[float, float] = (0.001, 0.5),
) -> BaselineSet:
    """A new BaselineSet with the adjustments applied (the input is not modified).

    shift: median += learning_rate * adjustment on the (level, group_key, feature) row; refused when
        |learning_rate * adjustment| exceeds max_shift_mad x the row's MAD.
    mad_scale: mad *= 1 + learning_rate * (adjustment - 1); refused unless adjustment is within
        mad_factor_bounds.
    contamination / domain_weight: the override moves from its current value c (the set's override,
        else evidence["current"]) to c + learning_rate * (adjustment - c); refused unless adjustment / c
        is within mad_factor_bounds (and, for contamination, adjustment within contamination_bounds).
    Rows of other levels that fell back to an adjusted group keep their copied statistics (they are
    re-resolved the next time baselines are computed from data).
    Raises AdjustmentRefused naming the level, group, feature and bound; nothing is applied then.
    """
    if not 0 < learning_rate <= 1:
        raise AdjustmentRefused(f"learning_rate must be in (0, 1], got {learning_rate}")
    lo, hi = mad_factor_bounds
    stats = baselines.stats.copy()
    overrides = model_overrides(baselines)
    overrides["domain_weights"] = dict(overrides.get("domain_weights", {}))
    for fb in feedback:
        where = f"{fb.level} {json.dumps(fb.group_key, default=str)} {fb.feature}"
        if fb.kind not in KINDS:
            raise AdjustmentRefused(f"{where}: unknown kind {fb.kind!r}; known: {', '.join(KINDS)}")
        if not np.isfinite(fb.adjustment):
            raise AdjustmentRefused(f"{where}: adjustment {fb.adjustment!r} is not a finite number")
        if fb.kind in ("contamination", "domain_weight"):
            if fb.kind == "contamination":
                current = float(overrides.get("contamination", fb.evidence.get("current", np.nan)))
                low, high = contamination_bounds
                if not low <= fb.adjustment <= high:
                    raise AdjustmentRefused(f"{where}: contamination {fb.adjustment:g} outside [{low:g}, {high:g}]")
            else:
                current = float(overrides["domain_weights"].get(fb.feature, fb.evidence.get("current", 1.0)))
            if not np.isfinite(current) or current <= 0:
                raise AdjustmentRefused(f"{where}: no current {fb.kind} to adjust (evidence lacks 'current')")
            ratio = fb.adjustment / current
            if not lo * (1 - 1e-6) <= ratio <= hi * (1 + 1e-6):
                raise AdjustmentRefused(f"{where}: {fb.kind} {current:g} -> {fb.adjustment:g} is a factor "
                                        f"{ratio:.3g}, outside the bound [{lo:g}, {hi:g}] per step")
            value = current + learning_rate * (fb.adjustment - current)
            if fb.kind == "contamination":
                overrides["contamination"] = round(value, 6)
            else:
                overrides["domain_weights"][fb.feature] = round(value, 6)
            continue
        mask = _stat_rows(stats, baselines, fb, where)
        if fb.kind == "shift":
            step = learning_rate * fb.adjustment
            mad = float(stats.loc[mask, "mad"].iloc[0])
            if abs(step) > max_shift_mad * mad * (1 + 1e-9):
                raise AdjustmentRefused(f"{where}: a shift of {step:+.4g} ({learning_rate:g} x {fb.adjustment:+.4g}) "
                                        f"exceeds the bound of {max_shift_mad:g} MAD ({max_shift_mad * mad:.4g}) per step")
            stats.loc[mask, "median"] = stats.loc[mask, "median"] + step
        else:
            if not lo - 1e-9 <= fb.adjustment <= hi + 1e-9:
                raise AdjustmentRefused(f"{where}: MAD factor {fb.adjustment:g} outside the bound [{lo:g}, {hi:g}]")
            stats.loc[mask, "mad"] = stats.loc[mask, "mad"] * (1 + learning_rate * (fb.adjustment - 1))
    if not overrides["domain_weights"]:
        del overrides["domain_weights"]
    return BaselineSet(baselines.levels, list(baselines.features), baselines.min_rows,
                       {k: list(v) for k, v in baselines.group_columns.items()}, stats, overrides)


def validate_llm_proposal(raw: dict, baselines: BaselineSet, evidence: pd.DataFrame, *,
                          learning_rate: float = 0.35, max_shift_mad: float = 1.5,
                          mad_factor_bounds: tuple[float, float] = (0.5, 2.0)) -> BaselineFeedback:
    """Check one proposal an LLM returned and turn it into a BaselineFeedback.

    raw: {"level": "cohort", "group_key": {...}, "feature": "battery_level", "adjustment": 5.0,
        "reason": "...", "kind": "shift" (optional; shift or mad_scale)}.
    evidence: feedback_evidence(...) for the same anomalies. Accepted only when the level, group and
    feature exist in the set, the evidence has reviewed anomalies for them, the reason cites at least
    one of its real counts (n_false_positive or n_reviewed, as a number), and apply_feedback accepts it
    under the same bounds. Raises AdjustmentRefused with the reason otherwise.
    """
    if not isinstance(raw, dict):
        raise AdjustmentRefused(f"an LLM proposal must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in ("level", "group_key", "feature", "adjustment", "reason") if k not in raw]
    if missing:
        raise AdjustmentRefused(f"LLM proposal lacks field(s): {', '.join(missing)}")
    level, group_key, feature = raw["level"], raw["group_key"], raw["feature"]
    kind = raw.get("kind", "shift")
    if kind not in ("shift", "mad_scale"):
        raise AdjustmentRefused(f"kind {kind!r}: an LLM may propose shift or mad_scale only")
    if level not in baselines.levels:
        raise AdjustmentRefused(f"level {level!r} is not in the baseline set ({', '.join(baselines.levels)})")
    if not isinstance(group_key, dict):
        raise AdjustmentRefused(f"group_key must be an object, got {group_key!r}")
    if feature not in baselines.features:
        raise AdjustmentRefused(f"feature {feature!r} is not a baseline feature")
    try:
        adjustment = float(raw["adjustment"])
    except (TypeError, ValueError):
        raise AdjustmentRefused(f"adjustment {raw['adjustment']!r} is not a number") from None
    reason = str(raw["reason"] or "").strip()
    fb = BaselineFeedback(level, {c: str(group_key.get(c, "")) for c in baselines.group_columns[level]},
                          feature, adjustment, reason, kind)
    if set(group_key) != set(baselines.group_columns[level]):
        raise AdjustmentRefused(f"group_key {group_key} must name exactly {baselines.group_columns[level]} at {level}")
    key = _canonical_key(baselines, level, fb.group_key)
    rows = evidence[(evidence["level"] == level) & (evidence["group_key"] == key) & (evidence["feature"] == feature)] \
        if len(evidence) else evidence
    if rows.empty:
        raise AdjustmentRefused(f"{level} {key} {feature}: no reviewed anomalies deviate there; nothing supports it")
    ev = rows.iloc[0]
    cited = {int(n) for n in _numbers(reason)}
    if not cited & {int(ev["n_false_positive"]), int(ev["n_reviewed"])}:
        raise AdjustmentRefused(f"{level} {key} {feature}: the reason must cite the real counts "
                                f"({int(ev['n_false_positive'])} false positives of {int(ev['n_reviewed'])} reviewed)")
    fb.evidence = {k: (v.item() if hasattr(v, "item") else v) for k, v in ev.items()
                   if k in ("n_reviewed", "n_false_positive", "n_true_positive", "share", "typical_deviation",
                            "typical_abs_z", "median", "mad")}
    apply_feedback(baselines, [fb], learning_rate, max_shift_mad=max_shift_mad, mad_factor_bounds=mad_factor_bounds)
    return fb


def _numbers(text: str) -> list[float]:
    import re

    return [float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text) if float(n).is_integer()]


def _canonical_key(baselines: BaselineSet, level: str, group_key: dict) -> str:
    cols = baselines.group_columns[level]
    return json.dumps({c: group_key.get(c) for c in cols}, default=str) if cols else "{}"


def _stat_rows(stats: pd.DataFrame, baselines: BaselineSet, fb: BaselineFeedback, where: str) -> pd.Series:
    if fb.level not in baselines.levels:
        raise AdjustmentRefused(f"{where}: level {fb.level!r} is not in this baseline set")
    if fb.feature not in baselines.features:
        raise AdjustmentRefused(f"{where}: feature {fb.feature!r} is not in this baseline set")
    key = _canonical_key(baselines, fb.level, {k: str(v) for k, v in fb.group_key.items()})
    mask = (stats["level"] == fb.level) & (stats["group_key"] == key) & (stats["feature"] == fb.feature)
    if not mask.any():
        raise AdjustmentRefused(f"{where}: no such group at level {fb.level}")
    return mask


def _top_feature(reviewed: pd.DataFrame, baselines: BaselineSet, level: str) -> pd.Series:
    features = [f for f in baselines.features if f in reviewed.columns]
    median, mad, _ = lookup(reviewed, baselines, level, features)
    z = np.abs(np.nan_to_num((reviewed[features].to_numpy(dtype="float64") - median) / (MAD_TO_SIGMA * mad)))
    return pd.Series(np.array(features)[z.argmax(axis=1)], index=reviewed.index)


def _check_anomalies(anomalies: pd.DataFrame, baselines: BaselineSet, levels) -> None:
    unknown = [lv for lv in levels if lv not in baselines.levels]
    if unknown:
        raise BaselineError(f"level(s) {unknown} are not in this baseline set ({list(baselines.levels)})")
    needed = {"anomaly_id", *(c for lv in levels for c in baselines.group_columns[lv])}
    missing = sorted(needed - set(anomalies.columns))
    if missing:
        raise BaselineError(f"anomalies frame lacks column(s): {', '.join(missing)}")
