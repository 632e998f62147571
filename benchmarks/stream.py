"""Live stream throughput and latency, end to end: Redis stream -> stream consumer(s) -> persisted results.

Sets up a scratch fleet (synthetic, detection.ingest.synthetic: --devices devices, --train-days days
stored and trained on with the real pipeline), then publishes --events events of the hours after the stored
data (every device, hour by hour, as a live fleet sends them) at --rate events/s (0: as fast as
possible) to the fleet's stream, while --consumers consumer processes (stream_consume, the code
`manage.py stream_consume` runs) score and persist them. It reports:
- sustained events/s: events / (first publish -> last entry acknowledged, i.e. persisted);
- latency percentiles of event -> persisted result (the entry's Redis arrival time to the commit
  of its micro-batch), and event -> alerts hook returned when the alerts app is installed;
- that every event has exactly one result (nothing lost, nothing duplicated).
The scratch fleet and stream keys are removed afterwards. Uses the database DATABASE_URL names
(default: the embedded SQLite under VIGIL_VAR_DIR) and the Redis of VIGIL_STREAM_REDIS_URL/REDIS_URL
(default redis://127.0.0.1:6379/0) under a private key prefix.

    VIGIL_VAR_DIR=/tmp/bench python benchmarks/stream.py --events 100000 --rate 0 --json stream.json
    VIGIL_VAR_DIR=/tmp/bench python benchmarks/stream.py --events 30000 --rate 1000 --batch 500

VIGIL_BENCH_PROFILE=DIR makes each consumer write its cProfile to DIR/consumer-<i>.prof.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")
os.environ["VIGIL_STREAM_PREFIX"] = f"bench-{os.getpid()}:telemetry"  # private keys; read by stream_key
os.environ.setdefault("VIGIL_LIVE_PUSH", "0")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402

from detection.choices import Trigger  # noqa: E402
from detection.ingest.loader import ingest_batch  # noqa: E402
from detection.ingest.stream import (  # noqa: E402
    EVENT_FIELD, dead_letter_key, ensure_group, event_payload, redis_client, stream_consume, stream_group_info,
    stream_key,
)
from detection.ingest.synthetic import generate_fleet  # noqa: E402
from detection.models import AnomalyResult, Fleet, Telemetry  # noqa: E402
from detection.services import pipeline_run_create, pipeline_run_execute  # noqa: E402

FLEET = "benchmark-stream-scratch"


def setup_fleet(devices: int, events: int, seed: int, train_days: int) -> list[str]:
    """Scratch fleet trained on train_days; returns the JSON payloads of the next `events` samples."""
    drop_fleet()
    hours = math.ceil(events / devices)
    days = train_days + math.ceil(hours / 24)
    batch = generate_fleet(devices=devices, days=days, seed=seed)
    cut = batch.telemetry["timestamp"].min() + pd.Timedelta(days=train_days)
    live = batch.telemetry[batch.telemetry["timestamp"] >= cut]
    batch.telemetry = batch.telemetry[batch.telemetry["timestamp"] < cut].reset_index(drop=True)
    batch.labels = batch.labels[batch.labels["start"] < cut].reset_index(drop=True)
    ingest_batch(batch=batch, fleet_name=FLEET)
    fleet = Fleet.objects.get(name=FLEET)
    run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
    if not run.model_version_id:
        raise SystemExit(f"training failed: {run.error}")
    live = live.sort_values(["timestamp", "external_id"], ignore_index=True).head(events)
    metrics = fleet.metric_names
    values = live[metrics].to_numpy()
    return [event_payload(fleet=FLEET, device_id=d, timestamp=t,
                          metrics={m: (None if np.isnan(v) else float(v)) for m, v in zip(metrics, row)})
            for d, t, row in zip(live["external_id"], live["timestamp"], values)]


def drop_fleet() -> None:
    fleet = Fleet.objects.filter(name=FLEET).first()
    if fleet is not None:
        AnomalyResult.objects.filter(fleet=fleet).delete()
        Telemetry.objects.filter(fleet=fleet).delete()  # one DELETE, no per-row cascade collection
        fleet.delete()


def consumer_main(index: int, batch: int, stop, out, alerts: bool) -> None:
    if not alerts:
        sys.modules["alerts.services"] = None  # the consumer's hook import then fails: no alerts
    profile = None
    if os.environ.get("VIGIL_BENCH_PROFILE"):  # a directory: each consumer writes its cProfile there
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    cpu = time.process_time()
    stats = stream_consume(fleet_name=FLEET, consumer=f"bench-{index}", batch=batch, block_ms=100,
                           stop=stop.is_set, push=False)
    if profile is not None:
        profile.disable()
        profile.dump_stats(Path(os.environ["VIGIL_BENCH_PROFILE"]) / f"consumer-{index}.prof")
    out.put({**stats.as_dict(), "latencies_s": stats.latencies_s, "alert_latencies_s": stats.alert_latencies_s,
             "cpu_seconds": time.process_time() - cpu})


def publish(client, payloads: list[str], rate: float) -> tuple[float, float]:
    """XADD the payloads at `rate` per second (0: flat out), in pipelined chunks; (start, end) times."""
    key = stream_key(FLEET)
    started = time.time()
    sent, chunk = 0, 500
    while sent < len(payloads):
        if rate > 0:
            due = min(int((time.time() - started) * rate) + 1, len(payloads))
            if due <= sent:
                time.sleep(0.002)
                continue
            upto = min(due, sent + chunk)
        else:
            upto = min(sent + chunk, len(payloads))
        pipe = client.pipeline(transaction=False)
        for payload in payloads[sent:upto]:
            pipe.xadd(key, {EVENT_FIELD: payload})
        pipe.execute()
        sent = upto
    return started, time.time()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ms = np.asarray(values) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} | {"max": round(float(ms.max()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events to publish (20000)")
    parser.add_argument("--rate", type=float, default=0, help="events per second; 0 = as fast as possible")
    parser.add_argument("--devices", type=int, default=500, help="devices of the scratch fleet (500)")
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes (1)")
    parser.add_argument("--batch", type=int, default=2000, help="max events per micro-batch (2000)")
    parser.add_argument("--train-days", type=int, default=7, help="days of stored telemetry to train on (7)")
    parser.add_argument("--no-alerts", dest="alerts", action="store_false",
                        help="leave out the alerts hook (alerts.services.alerts_ingest) to time the stream alone")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    if args.events < 1 or args.devices < 1 or args.consumers < 1 or args.batch < 1 or args.rate < 0:
        parser.error("--events, --devices, --consumers and --batch must be >= 1, --rate >= 0")

    call_command("migrate", verbosity=0)
    client = redis_client()
    client.delete(stream_key(FLEET), dead_letter_key(FLEET))
    t0 = time.perf_counter()
    payloads = setup_fleet(args.devices, args.events, args.seed, args.train_days)
    setup_s = time.perf_counter() - t0
    ensure_group(client, FLEET)

    connections.close_all()  # the consumers fork: each opens its own connection
    # A consumer of `manage.py stream_consume` starts with a small heap. Forked from this process it
    # inherits the training run's objects, and its garbage collector would walk them, copying every
    # page on write (seconds of CPU per consumer in its first batches). Frozen, they are left alone.
    gc.collect()
    gc.freeze()
    ctx = mp.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=consumer_main, args=(i, args.batch, stop, out, args.alerts)) for i in range(args.consumers)]
    for w in workers:
        w.start()
    time.sleep(2.0)  # consumers import, load the model, block on the stream
    load_before = round(os.getloadavg()[0], 1)
    try:
        started, published = publish(client, payloads, args.rate)
        deadline = time.time() + max(120, 10 * args.events / max(args.rate, 1000))
        while time.time() < deadline:
            info = stream_group_info(client, FLEET)
            if info and info["lag"] == 0 and info["pending"] == 0:
                break
            time.sleep(0.01)
        finished = time.time()
        stop.set()
        results = [out.get(timeout=60) for _ in workers]
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    persisted = AnomalyResult.objects.filter(fleet__name=FLEET, run__trigger=Trigger.STREAM).values_list(
        "device_id", "timestamp")
    keys = list(persisted)
    latencies = [x for r in results for x in r["latencies_s"]]
    alert_latencies = [x for r in results for x in r["alert_latencies_s"]]
    total = {k: sum(r[k] for r in results) for k in ("read", "scored", "anomalies", "duplicates", "dead_lettered",
                                                     "batches", "failed_batches", "reclaimed")}
    figures = {
        "database": connection.vendor,
        "cpu_count": os.cpu_count(),
        "events": args.events,
        "target_rate": args.rate or "max",
        "devices": args.devices,
        "consumers": args.consumers,
        "batch": args.batch,
        "alerts_hook": args.alerts and bool(alert_latencies or not total["anomalies"]),
        "load_average_1m_before": load_before,  # other work on the machine at the start
        "setup_seconds": round(setup_s, 1),
        "publish_rate": round(args.events / max(published - started, 1e-9)),
        "sustained_events_per_second": round(args.events / (finished - started)),
        "elapsed_seconds": round(finished - started, 3),
        "latency_event_to_persisted_ms": percentiles(latencies),
        "latency_event_to_alert_ms": percentiles(alert_latencies) or None,
        "results_persisted": len(keys),
        "results_unique": len(set(keys)),
        "complete": len(keys) == len(set(keys)) == args.events,
        "anomaly_share": round(total["anomalies"] / max(total["scored"], 1), 4),
        # CPU the consumer processes spent (startup and idle polling included), per event: unlike
        # events/s, it hardly moves with other work on the machine, so it compares runs under load.
        "consumer_cpu_seconds": round(sum(r["cpu_seconds"] for r in results), 2),
        "consumer_cpu_us_per_event": round(1e6 * sum(r["cpu_seconds"] for r in results) / args.events, 1),
        **total,
    }
    client.delete(stream_key(FLEET), dead_letter_key(FLEET))
    drop_fleet()
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
