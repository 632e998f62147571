"""In-process cost of one /api/v1/detect call: detection.serving.detect_observations for one observation.

No HTTP server and no serializer: this measures the scoring work a request pays for (device lookup,
production-model check, history read, features, baselines, detector, explanation). It uses the fleet
that benchmarks/api_load.py prepares (60 devices, 7 days, a trained production model, in the private
SQLite database of VIGIL_VAR_DIR, default /tmp/vigil-api-load) and stored samples of its last day as
observations, each scored on its own, one after the other.

Reports mean, p50, p99 and max of the wall time and of the process CPU time per call (CPU time is
less disturbed by other processes on a shared machine; compare runs made back to back), then
optionally a cProfile of --profile calls. Goal (issue 7): mean <= 2.5 ms, p99 <= 5 ms on an idle
machine, so that one core serves 300 requests/s with room for the WSGI server's own ~1.2 ms.

    .venv/bin/python benchmarks/detect_inprocess.py
    .venv/bin/python benchmarks/detect_inprocess.py --calls 500 --pandas    # the reference pandas path
    .venv/bin/python benchmarks/detect_inprocess.py --profile 100 --json var/detect_inprocess.json
    .venv/bin/python benchmarks/detect_inprocess.py --batch 500             # one 500-observation call
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("VIGIL_VAR_DIR", "/tmp/vigil-api-load")


def summary(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1000
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", default="api-load", help="fleet name (created on first use)")
    parser.add_argument("--devices", type=int, default=60)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="timed one-observation calls")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (model load, caches)")
    parser.add_argument("--pandas", action="store_true", help="force the pandas path (serving.FAST_PATH off)")
    parser.add_argument("--batch", type=int, default=0, help="also time one call with this many observations")
    parser.add_argument("--profile", type=int, default=0, help="cProfile this many further calls")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after the warm-up, as a server can after loading the app: the "
                             "collector then no longer walks the long-lived objects (Django, pandas, models)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    import api_load

    _, observations = api_load.prepare(args.fleet, args.devices, args.days)
    from detection import serving
    from detection.models import Fleet

    serving.FAST_PATH = not args.pandas
    fleet = Fleet.objects.get(name=args.fleet)
    observed = [{"device_id": o["device_id"], "timestamp": serving._utc(o["timestamp"]), "metrics": o["metrics"]}
                for o in observations]  # distinct stored samples
    calls = [[o] for o in observed]
    needed = args.warmup + args.calls + args.profile
    calls = (calls * (needed // len(calls) + 1))[:needed]
    for c in calls[:args.warmup]:
        serving.detect_observations(fleet=fleet, observations=c)
    if args.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    wall, cpu = [], []
    for c in calls[args.warmup:args.warmup + args.calls]:
        w, p = time.perf_counter(), time.process_time()
        serving.detect_observations(fleet=fleet, observations=c)
        cpu.append(time.process_time() - p)
        wall.append(time.perf_counter() - w)
    figures = {"path": "pandas" if args.pandas else ("online" if serving.model_load(fleet=fleet).online else "pandas"),
               "calls": args.calls, "gc_freeze": args.gc_freeze, "wall_ms": summary(wall), "cpu_ms": summary(cpu),
               "load_average": list(os.getloadavg())}
    if args.batch:
        batch = observed[:args.batch]
        serving.detect_observations(fleet=fleet, observations=batch)
        started = time.perf_counter()
        serving.detect_observations(fleet=fleet, observations=batch)
        figures["batch"] = {"observations": len(batch), "wall_ms": round((time.perf_counter() - started) * 1000, 1)}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for c in calls[args.warmup + args.calls:]:
            serving.detect_observations(fleet=fleet, observations=c)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
