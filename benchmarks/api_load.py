"""Load benchmark of the scoring API against a real ASGI server (daphne, as production runs it).

Prepares a demo fleet in a private SQLite database (VIGIL_VAR_DIR, default /tmp/vigil-api-load) with a
trained production model and an API token, starts `daphne anomaly_project.asgi:application` on
127.0.0.1 with DEBUG off and the rate limits raised, then:

1. /api/v1/detect open-loop at a fixed rate (--rate req/s for --seconds): request i is sent at
   t0 + i / rate whatever the previous answers did, and its latency is counted from that scheduled
   time, so a server that falls behind shows it (no coordinated omission). Reports achieved
   throughput, errors and latency p50/p95/p99/max in ms.
2. /api/v1/detect/batch with --batch observations, --batch-repeats times in a row: p50/max in ms.

Observations are stored samples of the fleet (real device ids, timestamps and values), so each call
does the full serving work (history read, features, baselines, detector). Goals: p99 < 25 ms at
300 req/s on 2 cores; a 500-observation batch < 300 ms.

    .venv/bin/python benchmarks/api_load.py --rate 300 --seconds 20
    .venv/bin/python benchmarks/api_load.py --rate 50 --seconds 10 --json var/api_load.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import logging

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VAR_DIR = os.environ.setdefault("VIGIL_VAR_DIR", "/tmp/vigil-api-load")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")
SERVER_ENV = {
    "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "api-load-benchmark-only", "DJANGO_SECURE_SSL_REDIRECT": "0",
    "DJANGO_SECURE_COOKIES": "0", "DJANGO_SECURE_HSTS_SECONDS": "0", "VIGIL_LOG_LEVEL": "WARNING",
    **{f"VIGIL_API_THROTTLE_{s}": "10000000/min" for s in ("USER", "TOKEN", "DETECT", "INGEST")},
}


def prepare(fleet_name: str, devices: int, days: int) -> tuple[str, list[dict]]:
    """The fleet (generated and trained once, reused after), a token, and stored samples as observations."""
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from detection.ingest.loader import ingest_batch, load_telemetry_frame
    from detection.ingest.synthetic import generate_fleet
    from detection.models import Fleet
    from detection.serving import production_model_version
    from detection.services import pipeline_run_create, pipeline_run_execute

    call_command("migrate", verbosity=0)
    fleet = Fleet.objects.filter(name=fleet_name).first()
    if fleet is None:
        ingest_batch(batch=generate_fleet(devices=devices, days=days, seed=7), fleet_name=fleet_name)
        fleet = Fleet.objects.get(name=fleet_name)
    if production_model_version(fleet=fleet) is None:
        run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet).id)
        if not run.model_version_id:
            raise SystemExit(f"the pipeline failed: {run.error}")
    user = get_user_model().objects.filter(username="api-load").first() or \
        get_user_model().objects.create_superuser("api-load", "load@example.com", None)
    token, _ = Token.objects.get_or_create(user=user)
    frame = load_telemetry_frame(fleet)
    recent = frame[frame["timestamp"] >= frame["timestamp"].max() - np.timedelta64(1, "D")]
    metrics = fleet.metric_names
    observations = [{"fleet": fleet.name, "device_id": r.external_id, "timestamp": r.timestamp.isoformat(),
                     "metrics": {m: (None if np.isnan(getattr(r, m)) else float(getattr(r, m))) for m in metrics}}
                    for r in recent.sample(frac=1.0, random_state=0).itertuples(index=False)]
    return token.key, observations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                               "anomaly_project.asgi:application"], cwd=REPO,
                              env={**os.environ, **SERVER_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"daphne exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    raise SystemExit("daphne did not start within 60 s")


def percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {}
    a = np.asarray(values_ms)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


async def open_loop(base: str, token: str, observations: list[dict], rate: float, seconds: float) -> dict:
    import httpx

    n = int(rate * seconds)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"Authorization": f"Token {token}"}
    latencies, service, errors = [], [], {}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        await client.post("/api/v1/detect", json=observations[0])  # load the model before timing
        t0 = time.perf_counter()

        async def one(i: int):
            scheduled = t0 + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            sent = time.perf_counter()
            try:
                response = await client.post("/api/v1/detect", json=observations[i % len(observations)])
                status = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            if status == 200:
                latencies.append((done - scheduled) * 1000)
                service.append((done - sent) * 1000)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
    return {"target_rate": rate, "requests": n, "ok": len(latencies), "errors": errors,
            "achieved_rate": round(len(latencies) / elapsed, 1), "seconds": round(elapsed, 2),
            "latency_ms_from_schedule": percentiles(latencies), "latency_ms_from_send": percentiles(service)}


def batch_runs(base: str, token: str, observations: list[dict], size: int, repeats: int) -> dict:
    import httpx

    body = {"observations": observations[:size]}
    times, statuses = [], []
    with httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=120) as client:
        client.post("/api/v1/detect/batch", json=body)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            response = client.post("/api/v1/detect/batch", json=body)
            times.append((time.perf_counter() - start) * 1000)
            statuses.append(response.status_code)
    return {"observations": len(body["observations"]), "repeats": repeats, "statuses": sorted(set(statuses)),
            "latency_ms": percentiles(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="detect requests per second (open loop)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=500, help="observations per /detect/batch call")
    parser.add_argument("--batch-repeats", type=int, default=10)
    parser.add_argument("--fleet", default="api-load")
    parser.add_argument("--devices", type=int, default=60)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    token, observations = prepare(args.fleet, args.devices, args.days)
    port = free_port()
    server = start_server(port)
    base = f"http://127.0.0.1:{port}"
    report = {"server": "daphne (1 process)", "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    try:
        # The batch first: after an overloaded open loop, daphne would still be working off its backlog.
        report["detect_batch"] = batch_runs(base, token, observations, args.batch, args.batch_repeats)
        report["detect"] = asyncio.run(open_loop(base, token, observations, args.rate, args.seconds))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
