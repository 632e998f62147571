"""NAB scoring: the Numenta Anomaly Benchmark's rules, re-implemented. Django-free.

Source: A. Lavin & S. Ahmad, "Evaluating Real-time Anomaly Detection Algorithms - the Numenta
Anomaly Benchmark", IEEE ICMLA 2015, and the reference code github.com/numenta/NAB
(nab/sweeper.py: Sweeper.calcSweepScore, calcScoreByThreshold; nab/optimizer.py; nab/runner.py
normalize). The rules, as implemented here:

- Probationary period: the first min(floor(0.15 * rows), 0.15 * 5000 = 750) rows of each file are
  not scored: detections there count for nothing, and a window with no row after them is not
  counted at all (NAB's labels never put a window there).
- Windows: the inclusive [start, end] timestamp pairs of labels/combined_windows.json, taken as
  row ranges (first row at or after start, last row at or before end).
- A detection is a row whose anomaly score is >= the threshold.
- True positive: only the best detection in a window counts (reward falls with position, so it is
  the first one). A detection at row i of a window [l, r] of width W = r - l + 1 sits at relative
  position y = -(r - i + 1) / W (-1 at the first row, -1/W at the last) and earns
  A_tp * scaled_sigmoid(y) / scaled_sigmoid(-1): exactly A_tp at the start, about
  A_tp * 2.5 / W at the end (NAB divides by scaled_sigmoid(-1) so the earliest detection earns
  A_tp in full).
- False negative: a window without a detection costs -A_fn.
- False positive: every detection outside all windows costs A_fp * scaled_sigmoid(y), with
  y = (i - r) / (W - 1) measured from the end r of the preceding window of width W: close after
  a window it costs almost nothing (the anomaly's tail), more than 3 window widths away the full
  -A_fp. A detection before the first window of its file costs -A_fp. (W = 1 would divide by
  zero in NAB; here it is taken as W - 1 = 1.)
- Detections in the probationary rows and true negatives count 0.
- scaled_sigmoid(y) = 2 * sigmoid(-5 y) - 1 = 2 / (1 + exp(5 y)) - 1 for y <= 3, else -1.
- Threshold: one per detector and profile for the whole corpus, the anomaly score that maximises
  the summed raw score of all files (NAB's sweeper tries every distinct score; ties go to the
  highest threshold, i.e. the fewest detections, as NAB's stable sort does). "Never detect" is
  a candidate (threshold +inf here, 1.1 in NAB, whose scores lie in [0, 1]).
- Normalisation: score = 100 * (raw - null) / (perfect - null), with null the raw score of the
  detector that never detects (-A_fn per window) and perfect A_tp per window (every window
  detected at its first row, no false positive).
- Profiles: config/profiles.json, {name: {"CostMatrix": {"tpWeight", "fpWeight", "fnWeight",
  "tnWeight"}}}; tnWeight is unused, as in NAB.

One extension, off unless asked for (`wait` > 0 in sweep and nab_score): a detector's alarm policy
may hold a file silent for `wait` rows after each detection (a refractory period: a row at or above
the threshold detects only when no row of the `wait` before it detected). The sweep then simulates
that policy at every candidate threshold, since which rows a detection silences depends on the
threshold. It is causal (a row's detection depends on earlier rows only) and one rule for every
file, as the fixed wait after each detection of HTM's and ARTime's NAB runners.
"""
from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .jit import compiled

PROBATION_PERCENT = 0.15
PROBATION_CAP_ROWS = 5000  # NAB: the probationary period is at most 15 % of 5000 rows


class NabError(ValueError):
    """Bad NAB input (profiles file, windows, score arrays); the message names what is wrong."""


@dataclass(frozen=True)
class CostMatrix:
    """One NAB application profile: the weight of a true positive, a false positive and a
    false negative (positive numbers; the sign is part of the rule)."""

    tp_weight: float
    fp_weight: float
    fn_weight: float


def load_profiles(path: Path | str) -> dict[str, CostMatrix]:
    """Read NAB's config/profiles.json. Raises NabError for a missing, unreadable or malformed file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise NabError(f"cannot read the NAB profiles file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise NabError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise NabError(f"{path} must map profile names to {{'CostMatrix': {{...}}}}")
    profiles = {}
    for name, entry in raw.items():
        matrix = entry.get("CostMatrix") if isinstance(entry, dict) else None
        try:
            profiles[name] = CostMatrix(float(matrix["tpWeight"]), float(matrix["fpWeight"]),
                                        float(matrix["fnWeight"]))
        except (TypeError, KeyError, ValueError):
            raise NabError(f"{path}: profile {name!r} needs a CostMatrix with numeric tpWeight, fpWeight "
                           f"and fnWeight") from None
    return profiles


def probationary_length(n_rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a file that are not scored: min(floor(percent * n), percent * 5000)."""
    return int(min(math.floor(percent * n_rows), percent * PROBATION_CAP_ROWS))


def scaled_sigmoid(y) -> np.ndarray:
    """NAB's scaledSigmoid: 2 * sigmoid(-5 y) - 1 for y <= 3, -1 beyond (y: relative position)."""
    y = np.asarray(y, dtype="float64")
    with np.errstate(over="ignore"):
        value = 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0
    return np.where(y > 3.0, -1.0, value)


def window_bounds(timestamps, windows: Sequence[tuple]) -> list[tuple[int, int]]:
    """Row ranges of inclusive timestamp windows.

    timestamps: ascending, one per row (anything pandas turns into datetimes; naive = UTC).
    windows: (start, end) pairs, inclusive. Returns (first row >= start, last row <= end) per window
    in start order; a window that holds no row is left out. Raises NabError if timestamps are
    not ascending, a window ends before it starts, or two windows share a row.
    """
    ts = _utc_ns(timestamps)
    if len(ts) > 1 and np.any(ts[1:] < ts[:-1]):
        raise NabError("timestamps must be in ascending order")
    bounds = []
    for start, end in sorted(windows, key=lambda w: pd.Timestamp(w[0])):
        s, e = _utc_ns([start])[0], _utc_ns([end])[0]
        if e < s:
            raise NabError(f"window {start} .. {end} ends before it starts")
        left, right = int(np.searchsorted(ts, s, "left")), int(np.searchsorted(ts, e, "right")) - 1
        if left > right:
            continue
        if bounds and left <= bounds[-1][1]:
            raise NabError(f"window {start} .. {end} overlaps the window before it")
        bounds.append((left, right))
    return bounds


def row_rewards(n_rows: int, bounds: Sequence[tuple[int, int]], cost: CostMatrix) -> tuple[np.ndarray, np.ndarray]:
    """What a detection at each row would earn (NAB's weighted sweep score), and its window.

    bounds: (left, right) inclusive row ranges, ascending and disjoint (window_bounds' output).
    Returns (reward: float, n_rows; window: int, n_rows, the index into bounds or -1 outside).
    """
    rows = np.arange(n_rows)
    reward = np.empty(n_rows)
    window = np.full(n_rows, -1, dtype=np.int64)
    max_tp = float(scaled_sigmoid(-1.0))
    for k, (left, right) in enumerate(bounds):
        width = right - left + 1
        inside = rows[left:right + 1]
        window[left:right + 1] = k
        reward[left:right + 1] = scaled_sigmoid(-(right - inside + 1) / width) * cost.tp_weight / max_tp
    outside = np.flatnonzero(window < 0)
    rights = np.array([r for _, r in bounds], dtype=np.int64)
    widths = np.array([r - l + 1 for l, r in bounds], dtype=np.int64)
    before = np.searchsorted(rights, outside, "left") - 1  # the last window ending before the row
    unweighted = np.full(len(outside), -1.0)
    after = before >= 0
    if after.any():
        k = before[after]
        position = (outside[after] - rights[k]) / np.maximum(widths[k] - 1, 1)
        unweighted[after] = scaled_sigmoid(position)
    reward[outside] = unweighted * cost.fp_weight
    return reward, window


@dataclass(frozen=True)
class NabSeries:
    """One NAB file as a detector saw it.

    timestamps: n rows, ascending. scores: n anomaly scores (float, higher = more anomalous; NaN
    never detects; the probationary rows are ignored whatever they hold). windows: inclusive
    (start, end) timestamp pairs.
    """

    name: str
    timestamps: object
    scores: np.ndarray
    windows: Sequence[tuple]

    def __post_init__(self) -> None:
        n = len(self.timestamps)
        if len(self.scores) != n:
            raise NabError(f"{self.name}: {len(self.scores)} anomaly scores for {n} rows")


@dataclass(frozen=True)
class _Prepared:
    name: str
    scores: np.ndarray
    reward: np.ndarray
    window: np.ndarray
    probation: int
    windows: list[int]  # indexes into bounds of the windows that have a scored row


def _prepare(series: NabSeries, cost: CostMatrix, percent: float) -> _Prepared:
    n = len(series.timestamps)
    bounds = window_bounds(series.timestamps, series.windows)
    reward, window = row_rewards(n, bounds, cost)
    probation = probationary_length(n, percent)
    scored = [k for k, (_, right) in enumerate(bounds) if right >= probation]
    return _Prepared(series.name, np.asarray(series.scores, dtype="float64"), reward, window, probation, scored)


@dataclass(frozen=True)
class FileScore:
    """One file's NAB result for one set of detections: raw score (weighted TP + FP + FN sum),
    windows detected and missed, false-positive detections (rows) and what they cost."""

    raw: float
    windows: int
    detected: int
    false_positives: int
    fp_cost: float

    def as_dict(self) -> dict:
        return {"raw": round(self.raw, 4), "windows": self.windows, "detected": self.detected,
                "false_positives": self.false_positives, "fp_cost": round(self.fp_cost, 4)}


def score_detections(timestamps, detections, windows: Sequence[tuple], cost: CostMatrix, *,
                     probation_percent: float = PROBATION_PERCENT) -> FileScore:
    """Score one file's 0/1 detections (n rows, aligned with timestamps) under NAB's rules."""
    detections = np.asarray(detections, dtype=bool)
    prepared = _prepare(NabSeries("file", timestamps, detections.astype("float64"), windows), cost,
                        probation_percent)
    return _score_prepared(prepared, detections, cost)


def _score_prepared(p: _Prepared, detections: np.ndarray, cost: CostMatrix) -> FileScore:
    active = detections.copy()
    active[:p.probation] = False
    raw, detected = 0.0, 0
    for k in p.windows:
        hits = np.flatnonzero(active & (p.window == k))
        if len(hits):
            raw += float(p.reward[hits].max())
            detected += 1
        else:
            raw -= cost.fn_weight
    fp = active & (p.window < 0)
    fp_cost = float(p.reward[fp].sum())
    return FileScore(raw + fp_cost, len(p.windows), detected, int(fp.sum()), fp_cost)


def refractory(detections, wait: int) -> np.ndarray:
    """One file's detections (n rows, bool, time order) with every detection that follows an earlier
    kept one by `wait` rows or fewer dropped: row t stays a detection only when none of rows
    t - wait .. t - 1 is one (after dropping). wait 0 returns a copy. Raises ValueError for wait < 0."""
    if wait < 0:
        raise ValueError(f"wait must be at least 0 rows, got {wait}")
    detections = np.asarray(detections, dtype=bool)
    out = detections.copy()
    if wait:
        last = -wait - 1
        for t in np.flatnonzero(detections):
            if t - last > wait:
                last = t
            else:
                out[t] = False
    return out


def detections_at(p: _Prepared, threshold: float, wait: int = 0) -> np.ndarray:
    """A prepared file's detections at a threshold: scored rows (after the probationary period) at
    or above it, then the refractory wait (see refractory)."""
    detections = p.scores >= threshold
    detections[:p.probation] = False
    return refractory(detections, wait)


@dataclass(frozen=True)
class ThresholdScore:
    """The corpus raw score when every row with score >= threshold is a detection."""

    threshold: float
    raw: float
    detections: int
    detected_windows: int
    false_positives: int


def sweep(series: Sequence[NabSeries], cost: CostMatrix, *, probation_percent: float = PROBATION_PERCENT,
          wait: int = 0, _prepared: Sequence[_Prepared] | None = None) -> list[ThresholdScore]:
    """NAB's threshold sweep over a corpus: the raw score at every distinct anomaly score.

    wait: rows after each detection in which the same file does not detect again (refractory; 0:
    NAB's own rule, every row at or above the threshold detects). Returns one ThresholdScore per
    candidate, threshold descending, starting with +inf (no detection, the null score). wait 0:
    O(R log R) in the scored rows R of all files (NAB's calcScoreByThreshold, vectorised: a
    window's credit is the running maximum of its rewards). wait > 0: the rows are switched on one
    by one, highest score first, and each one re-decides only the rows its detection (or a
    detection it silences) reaches, O(R log R + R x wait x chain) (numba, compiled on first use).
    Raises ValueError for wait < 0.
    """
    prepared = _prepared if _prepared is not None else [_prepare(s, cost, probation_percent) for s in series]
    if wait < 0:
        raise ValueError(f"wait must be at least 0 rows, got {wait}")
    if wait:
        return _sweep_refractory(prepared, cost, int(wait))
    n_windows = sum(len(p.windows) for p in prepared)
    null = -cost.fn_weight * n_windows
    scores, rewards, keys, offset = [], [], [], 0
    for p in prepared:
        s = p.scores[p.probation:]
        keep = ~np.isnan(s)
        scores.append(s[keep])
        rewards.append(p.reward[p.probation:][keep])
        w = p.window[p.probation:][keep]
        keys.append(np.where(w >= 0, w + offset, -1))
        offset += len(p.reward)  # window indexes are below the file's row count: unique keys
    out = [ThresholdScore(math.inf, null, 0, 0, 0)]
    if not scores or not sum(len(s) for s in scores):
        return out
    score, reward, key = np.concatenate(scores), np.concatenate(rewards), np.concatenate(keys)
    order = np.argsort(-score, kind="stable")
    score, reward, key = score[order], reward[order], key[order]
    outside = key < 0
    gain = np.where(outside, reward, 0.0)
    first = np.zeros(len(key), dtype=bool)
    inside = np.flatnonzero(~outside)
    if len(inside):
        frame = pd.DataFrame({"key": key[inside], "reward": reward[inside]})
        best = frame.groupby("key", sort=False)["reward"].cummax()
        previous = best.groupby(frame["key"], sort=False).shift(1)
        first[inside] = previous.isna().to_numpy()
        # A window's credit moves from -A_fn to its best reward so far; each row adds the change.
        gain[inside] = (best - previous.fillna(-cost.fn_weight)).to_numpy()
    total = null + np.cumsum(gain)
    last_of_tie = np.r_[score[1:] != score[:-1], True]
    idx = np.flatnonzero(last_of_tie)
    detected, fps = np.cumsum(first)[idx], np.cumsum(outside)[idx]
    out += [ThresholdScore(float(score[i]), float(total[i]), int(i + 1), int(d), int(f))
            for i, d, f in zip(idx, detected, fps)]
    return out


def _refractory_sweep(order, scores, reward, window, lows, highs, wait, fn_weight, null):  # jit.compiled
    """Rows (positions in one line of all files, files wait + 1 apart) switched on in `order`; after
    each run of equal scores, the totals of the detections that the refractory rule keeps."""
    n = len(reward)
    active = np.zeros(n, dtype=np.bool_)
    detected = np.zeros(n, dtype=np.bool_)
    credit = np.full(len(lows), -fn_weight)
    groups = 1
    for k in range(1, len(order)):
        if scores[k] != scores[k - 1]:
            groups += 1
    thresholds = np.empty(groups)
    totals = np.empty(groups)
    counts = np.zeros((groups, 3), dtype=np.int64)  # detections, windows detected, false positives
    total, n_detections, n_hits, n_fps, g = null, 0, 0, 0, 0
    for k in range(len(order)):
        row = order[k]
        active[row] = True
        silenced = False
        for j in range(max(0, row - wait), row):
            if detected[j]:
                silenced = True
                break
        if not silenced:
            # Switch row on, then re-decide the rows after it until one keeps its detection: from
            # there on every row sees the same detections in its last `wait` rows as before.
            last, horizon, j = row, row + wait, row
            while j < n and j <= horizon:
                if j == row or active[j]:
                    now = j == row or j - last > wait
                    if now != detected[j]:
                        detected[j] = now
                        n_detections += 1 if now else -1
                        w = window[j]
                        if w < 0:
                            total += reward[j] if now else -reward[j]
                            n_fps += 1 if now else -1
                        else:
                            best = -fn_weight
                            for i in range(lows[w], highs[w] + 1):
                                if detected[i] and reward[i] > best:
                                    best = reward[i]
                            if (best > -fn_weight) != (credit[w] > -fn_weight):
                                n_hits += 1 if best > -fn_weight else -1
                            total += best - credit[w]
                            credit[w] = best
                        horizon = max(horizon, j + wait)
                    elif now:
                        break
                    if now:
                        last = j
                j += 1
        if k == len(order) - 1 or scores[k + 1] != scores[k]:
            thresholds[g] = scores[k]
            totals[g] = total
            counts[g, 0], counts[g, 1], counts[g, 2] = n_detections, n_hits, n_fps
            g += 1
    return thresholds, totals, counts


def _sweep_refractory(prepared: Sequence[_Prepared], cost: CostMatrix, wait: int) -> list[ThresholdScore]:
    n_windows = sum(len(p.windows) for p in prepared)
    null = -cost.fn_weight * n_windows
    scores, rewards, windows, lows, highs, offset = [], [], [], [], [], 0
    for p in prepared:
        s = p.scores.copy()
        # The probationary rows are never switched on; a window that ends among them is not counted
        # (_prepare), so every row of an uncounted window stays off.
        s[:p.probation] = np.nan
        counted = {k: len(lows) + i for i, k in enumerate(p.windows)}
        for k in p.windows:
            rows = np.flatnonzero(p.window == k)
            lows.append(offset + int(rows[0]))
            highs.append(offset + int(rows[-1]))
        scores.append(np.r_[s, np.full(wait + 1, np.nan)])  # a gap of wait + 1 rows between files
        rewards.append(np.r_[p.reward, np.zeros(wait + 1)])
        windows.append(np.r_[[counted.get(int(k), -1) for k in p.window],
                             np.full(wait + 1, -1)].astype(np.int64))
        offset += len(p.reward) + wait + 1
    out = [ThresholdScore(math.inf, null, 0, 0, 0)]
    score = np.concatenate(scores) if scores else np.empty(0)
    rows = np.flatnonzero(~np.isnan(score))
    if not len(rows):
        return out
    order = rows[np.argsort(-score[rows], kind="stable")]
    thresholds, totals, counts = compiled(_refractory_sweep)(
        order, score[order], np.concatenate(rewards), np.concatenate(windows),
        np.asarray(lows, dtype=np.int64), np.asarray(highs, dtype=np.int64), wait, cost.fn_weight, null)
    out += [ThresholdScore(float(t), float(r), int(c[0]), int(c[1]), int(c[2]))
            for t, r, c in zip(thresholds, totals, counts)]
    return out


@dataclass(frozen=True)
class ProfileScore:
    """A detector's NAB result under one profile.

    threshold: the corpus-optimal anomaly-score threshold (+inf: never detect). raw: summed raw
    score at it; null and perfect: the never-detecting and the ideal detector's raw scores;
    score: the normalised score (null 0, perfect 100). per_file: {name: FileScore} at threshold.
    """

    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    score: float
    windows: int
    detected_windows: int
    false_positives: int
    detections: int
    per_file: dict[str, FileScore]

    def as_dict(self, *, per_file: bool = False) -> dict:
        out = {"profile": self.profile, "score": round(self.score, 2),
               "threshold": None if math.isinf(self.threshold) else self.threshold,
               "raw": round(self.raw, 4), "null": self.null, "perfect": self.perfect, "windows": self.windows,
               "detected_windows": self.detected_windows, "false_positives": self.false_positives,
               "detections": self.detections}
        if per_file:
            out["per_file"] = {k: v.as_dict() for k, v in self.per_file.items()}
        return out


def normalised_score(raw: float, null: float, perfect: float) -> float:
    """100 * (raw - null) / (perfect - null). Raises NabError when perfect == null (no window)."""
    if perfect == null:
        raise NabError("the files hold no anomaly window after their probationary period, so the NAB score "
                       "(null detector 0, perfect detector 100) is undefined")
    return 100.0 * (raw - null) / (perfect - null)


def nab_score(series: Sequence[NabSeries], profiles: Mapping[str, CostMatrix], *,
              probation_percent: float = PROBATION_PERCENT, wait: int = 0) -> dict[str, ProfileScore]:
    """Optimise the threshold per profile over the corpus and score each profile at its threshold.

    series: every file of the corpus. wait: rows after each detection in which the same file does
    not detect again (see sweep; 0 is NAB's own rule). Raises NabError for bad windows, mismatched
    lengths or a corpus without any scored window, ValueError for wait < 0.
    """
    if not series:
        raise NabError("no NAB series to score")
    out = {}
    for name, cost in profiles.items():
        prepared = [_prepare(s, cost, probation_percent) for s in series]
        candidates = sweep(series, cost, wait=wait, _prepared=prepared)
        best = max(candidates, key=lambda c: c.raw)  # max() keeps the first: the highest threshold
        n_windows = sum(len(p.windows) for p in prepared)
        null, perfect = -cost.fn_weight * n_windows, cost.tp_weight * n_windows
        per_file = {p.name: _score_prepared(p, detections_at(p, best.threshold, wait), cost)
                    for p in prepared}
        out[name] = ProfileScore(name, best.threshold, best.raw, null, perfect,
                                 normalised_score(best.raw, null, perfect), n_windows, best.detected_windows,
                                 best.false_positives, best.detections, per_file)
    return out


def streaming_rank(scores, start: int) -> np.ndarray:
    """Each score's rank among every score before it: the share of earlier scores it exceeds.

    scores: n raw anomaly scores of one file, in time order (higher = more anomalous); rows before
    `start` form the reference (e.g. a detector's scores on its own training rows, known once it
    is trained) and get NaN. Row t >= start gets #{j < t: s_j < s_t} / #{j < t}, in [0, 1], 1 for
    a new maximum; NaN scores stay NaN and are not remembered. Causal (no later row is read),
    monotone in the score at any one time, and comparable across files whatever the detector's
    scale: the corpus-wide threshold of NAB's sweeper then means "above this share of the file's
    own history". O(n log n) searches, O(n^2) worst-case list inserts (fast below ~10^5 rows).
    """
    return _streaming(scores, start, lambda history, x: bisect.bisect_left(history, x) / len(history)
                      if history else math.nan)


def streaming_top_rank(scores, start: int) -> np.ndarray:
    """Each score's reciprocal rank from the top among the scores before it: 1 / (1 + #{j < t: s_j >= s_t}).

    scores: n raw anomaly scores of one file, in time order (higher = more anomalous); rows before
    `start` form the reference and get NaN, as in streaming_rank. Row t >= start gets 1 for a new
    maximum, 1/2 when one earlier score was at least as high, 1/(k+1) when k were; NaN scores stay
    NaN and are not remembered. Causal and monotone in the score at any one time, like
    streaming_rank, but it counts where streaming_rank takes a share: a corpus-wide threshold 1/(K+1)
    means "among the K + 1 highest of the file's history so far", a number of events rather than a
    share of rows, so a long file does not earn more alarms than a short one (NAB gives each file a
    few windows whatever its length). O(n log n) searches, O(n^2) worst-case list inserts.
    """
    return _streaming(scores, start, lambda history, x: 1.0 / (1 + len(history) - bisect.bisect_left(history, x)))


ORDER_RATIO_RANKS = (8, 16)


def streaming_order_ratio(scores, start: int, *, ranks: tuple[int, int] = ORDER_RATIO_RANKS,
                          floor: float = 1e-12) -> np.ndarray:
    """Each score divided by the geometric mean of the lo-th to hi-th highest scores before it.

    scores: n raw anomaly scores of one file, in time order, meant to be non-negative (a distance, a
    novelty); rows before `start` form the reference and get NaN, as in streaming_rank. ranks:
    (lo, hi), 1 <= lo <= hi. Row t >= start gets s_t / q_t, q_t the geometric mean of the earlier
    scores ranked lo .. hi from the top (all of them while fewer than hi are known; the lowest one
    while fewer than lo are), at least `floor`; NaN where no earlier score exists. NaN scores stay
    NaN and are not remembered. Causal and monotone in the score at any one time.

    Why: streaming_top_rank's threshold is a count ("among the K highest so far"), which ignores
    by how much a score stands out; this one is a multiple of a high order statistic of the file's
    own history, the way SPOT (Siffer et al., "Anomaly Detection in Streams with Extreme Value
    Theory", KDD 2017) starts from a high empirical quantile of the stream and sets its alarm level
    relative to it. A file whose top scores are all alike (noise) needs a score well above them; a
    file with a few towering earlier spikes still alarms on a clear new event below them. The
    reference is the geometric mean of a band of order statistics rather than one of them, so it
    moves smoothly as the history fills. O(n log n) searches, O(n^2) worst-case list inserts.
    Raises ValueError for ranks outside 1 <= lo <= hi or floor <= 0.
    """
    lo, hi = ranks
    if not 1 <= lo <= hi or floor <= 0:
        raise ValueError(f"ranks must satisfy 1 <= lo <= hi and floor > 0, got {ranks} and {floor}")

    def ratio(history: list, x: float) -> float:
        n = len(history)
        if not n:
            return math.nan
        band = history[max(0, n - hi):n - lo + 1] if n >= lo else history[:1]
        reference = math.exp(sum(math.log(max(v, floor)) for v in band) / len(band))
        return x / max(reference, floor)

    return _streaming(scores, start, ratio)


def _streaming(scores, start: int, value) -> np.ndarray:
    """The loop of the streaming calibrations: row t >= start gets value(history, s_t), history the
    sorted non-NaN scores before t (those before `start` included); rows before start and NaN scores
    get NaN, and NaN scores are not remembered."""
    scores = np.asarray(scores, dtype="float64")
    out = np.full(len(scores), np.nan)
    history = sorted(x for x in scores[:start] if not math.isnan(x))
    for t in range(max(start, 0), len(scores)):
        x = scores[t]
        if math.isnan(x):
            continue
        out[t] = value(history, x)
        bisect.insort(history, x)
    return out


def suppress_repeats(scores, window: int) -> np.ndarray:
    """Keep a score only where it is a new high of the last `window` rows; 0 elsewhere.

    scores: n calibrated scores of one file in time order (NaN where none; NaN stays NaN and is
    not remembered). Row t keeps s_t when s_t > max(s_{t-window}, ..., s_{t-1}), otherwise gets 0.
    Causal, threshold-free and the same rule for every file: once a detector has fired, the rows
    that merely stay high (the same event) do not fire again, while a stronger reading still does.
    NAB rewards the first detection in a window and charges every detection outside one, so the
    repeats of one event can only cost. (HTM's and ARTime's NAB runners suppress repeats likewise,
    with a fixed wait after each detection.) Raises ValueError for window < 1.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    s = np.asarray(scores, dtype="float64")
    past = pd.Series(s).shift(1).rolling(window, min_periods=1).max().to_numpy()
    out = np.where(np.isnan(past) | (s > past), s, 0.0)
    out[np.isnan(s)] = np.nan
    return out


def _utc_ns(values) -> np.ndarray:
    ts = pd.to_datetime(pd.Series(values) if not isinstance(values, pd.Series) else values)
    if getattr(ts.dt, "tz", None) is None:
        ts = ts.dt.tz_localize("UTC")
    return ts.dt.tz_convert("UTC").to_numpy(dtype="datetime64[ns]")
