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
noise and turns every daytime value into a "20-sigma" outlier, while the floored one does not. The robust z-score is (x - median) / (1.4826 * MAD)
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
    """

    levels: tuple[str, ...]
    features: list[str]
    min_rows: int
    group_columns: dict[str, list[str]]
    stats: pd.DataFrame = field(repr=False)

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
) -> BaselineSet:
    """Median and MAD of every feature for every group of every level.

    df: rows x (group columns of the requested levels + feature_cols); NaNs are ignored.
    max_rows_per_group / seed: median and MAD come from a seeded random sample of at most this
        many rows per group (see _group_median_mad); counts are over every row.
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
            if weak.to_numpy().any():
                p_median, p_mad = _parent_stats_for(df, cols, group_columns[parent], resolved[parent], own_median.index)
                median = median.mask(weak, p_median)
                mad = mad.mask(weak, p_mad)
                fallback = fallback.mask(weak, parent)
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
