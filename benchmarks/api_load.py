"""Load benchmark of the scoring API against a real server, as production runs it.

Prepares a demo fleet in the database the environment names (DATABASE_URL, else a private SQLite file
under VIGIL_VAR_DIR, default /tmp/vigil-api-load) with a trained production model and an API token,
then starts the API server on 127.0.0.1 with DEBUG off and the rate limits raised:
- `--server gunicorn` (default): `gunicorn anomaly_project.wsgi:application`, --workers processes
  (default: one per core), gthread workers with keep-alive; production serves HTTP (pages and the
  API) this way, and daphne only serves the websockets (docker/nginx.conf routes /ws/ to it);
- `--server daphne`: one daphne process (the ASGI app), as `make serve` runs everything.
Then:
1. /api/v1/detect open-loop at a fixed rate (--rate req/s for --seconds): request i is sent at
   t0 + i / rate whatever the previous answers did, and its latency is counted from that scheduled
   time, so a server that falls behind shows it (no coordinated omission). Reports achieved
   throughput, errors and latency p50/p95/p99/max in ms.
2. /api/v1/detect/batch with --batch observations, --batch-repeats times in a row: p50/max in ms.

The client is a small asyncio HTTP/1.1 client over keep-alive connections (OpenLoopClient): it costs
tens of microseconds of CPU a request, where httpx cost about a millisecond, which on 2 cores was
taken from the server under test.

Observations are stored samples of the fleet (real device ids, timestamps and values), so each call
does the full serving work (history read, features, baselines, detector). Goals: p99 < 25 ms at
300 req/s on 2 cores; a 500-observation batch < 300 ms.

    .venv/bin/python benchmarks/api_load.py --rate 300 --seconds 20
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/vigil_api_load REDIS_URL=redis://127.0.0.1:6379/5 \
        .venv/bin/python benchmarks/api_load.py --rate 300 --seconds 20 --json var/api_load.json
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
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


def _database_vendor() -> str:
    from django.db import connection

    return connection.vendor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *, server: str, workers: int) -> subprocess.Popen:
    if server == "gunicorn":
        # The production settings (docker/gunicorn.conf.py: gthread workers with keep-alive, each one
        # loading the production models before it takes requests), bound to loopback here.
        command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
                   "--config", str(REPO / "docker" / "gunicorn.conf.py"), "anomaly_project.wsgi:application"]
    else:
        command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                   "anomaly_project.asgi:application"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **SERVER_ENV},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"{server} exited: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    raise SystemExit(f"{server} did not start within 60 s")


class OpenLoopClient:
    """POSTs JSON over a pool of HTTP/1.1 keep-alive connections with asyncio streams.

    Each request takes an idle connection (or opens one), writes the request, reads the status line,
    headers and Content-Length body. Enough HTTP for Django behind gunicorn or daphne, and cheap: the
    load generator shares the machine's 2 cores with the server under test.
    """

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        # Last in, first out: the most recently answered connection takes the next request.
        self.idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = collections.deque()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, payload

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {}
    a = np.asarray(values_ms)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


async def open_loop(base: str, token: str, observations: list[dict], rate: float, seconds: float) -> dict:
    host, port = base.removeprefix("http://").split(":")
    client = OpenLoopClient(host, int(port), {"Authorization": f"Token {token}"})
    bodies = [json.dumps(o).encode() for o in observations]
    n = int(rate * seconds)
    latencies, service, errors = [], [], {}
    # Before timing: every worker has loaded the model (gunicorn's post_worker_init) and answered.
    for _ in range(3):
        await asyncio.gather(*(client.post("/api/v1/detect", bodies[k]) for k in range(16)))
    # The client's own garbage collections (thousands of pending coroutines) would stall its event
    # loop and show as server latency; collect once now and not during the run.
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()

    async def one(i: int):
        scheduled = t0 + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        sent = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(client.post("/api/v1/detect", bodies[i % len(bodies)]), 30)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            status = type(exc).__name__
        done = time.perf_counter()
        if status == 200:
            latencies.append((done - scheduled) * 1000)
            service.append((done - sent) * 1000)
        else:
            errors[str(status)] = errors.get(str(status), 0) + 1

    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    gc.enable()
    client.close()
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
    parser.add_argument("--server", choices=("gunicorn", "daphne"), default="gunicorn")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="gunicorn worker processes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    token, observations = prepare(args.fleet, args.devices, args.days)
    port = free_port()
    server = start_server(port, server=args.server, workers=args.workers)
    base = f"http://127.0.0.1:{port}"
    report = {"server": "daphne (1 process)" if args.server == "daphne" else
              f"gunicorn ({args.workers} gthread workers)", "database": _database_vendor(), "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
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
