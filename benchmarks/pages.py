"""Page benchmark: the fleet overview and the anomaly list rendered server-side with 100,000 anomalies
in one scored run (plus --normal normal results and --feedback verdicts), on whatever DATABASE_URL selects
(by default a scratch SQLite file under --var-dir, so the demo database is never touched).

    python benchmarks/pages.py --anomalies 100000 --renders 20 [--json FILE]

Each page is rendered --renders times with Django's test client after one first render; reports the median
and p95 in milliseconds, the first render (which fills the per-run cache of the overview's aggregates and
the list's count, see detection.selectors._for_finished_run) and its number of queries. Rows are
bulk-created. DEBUG is off, as in production.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "anomaly_project.settings")

PAGES = {
    "overview": "/fleets/{fleet}/",
    "anomaly list": "/fleets/{fleet}/anomalies/",
    "anomaly list, by score, page 500": "/fleets/{fleet}/anomalies/?sort=-score&page=500",
    "anomaly list, severity + store filter": "/fleets/{fleet}/anomalies/?severity=high&store=store-03",
    "anomaly list, open only": "/fleets/{fleet}/anomalies/?review=open",
    "device list": "/fleets/{fleet}/devices/",
}


def _populate(*, anomalies: int, normal: int, feedback: int, devices: int, name: str) -> None:
    """One fleet, one baseline and model version, one succeeded run holding the results."""
    import datetime as dt
    import random

    from django.contrib.auth import get_user_model
    from django.db import transaction

    from baselines.models import BaselineVersion
    from detection.choices import Label, ModelStatus, RunStage, RunStatus, Severity, Verdict
    from detection.models import AnomalyFeedback, AnomalyResult, Device, Fleet, ModelVersion, PipelineRun

    rng = random.Random(7)
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    with transaction.atomic():
        fleet = Fleet.objects.create(name=name, metric_schema=[{"name": "battery_level", "unit": "%"}],
                                     cohort_columns=["manufacturer", "model", "os_version"])
        Device.objects.bulk_create([
            Device(fleet=fleet, external_id=f"dev-{i:05d}", manufacturer="Zebra", model=("TC52", "TC57", "MC33")[i % 3],
                   os_version="11", store=f"store-{i % 40:02d}", customer=f"customer-{i % 7}") for i in range(devices)])
        device_ids = list(Device.objects.filter(fleet=fleet).values_list("id", flat=True))
        baseline = BaselineVersion.objects.create(fleet=fleet, number=1, levels=["global", "cohort"])
        model = ModelVersion.objects.create(fleet=fleet, version=1, algorithm="hybrid", baseline_version=baseline,
                                            status=ModelStatus.PRODUCTION)
        run = PipelineRun.objects.create(fleet=fleet, status=RunStatus.SUCCEEDED, stage=RunStage.DONE,
                                         model_version=model, baseline_version=baseline, n_scored=anomalies + normal,
                                         n_anomalies=anomalies, threshold=0.6, started_at=t0, finished_at=t0)
        severities = [s for s in Severity.values]
        top = [{"metric": "battery_level", "feature": "battery_level", "kind": "value", "value": 12.0,
                "typical": 70.0, "mad": 6.0, "z": -6.5, "level": "cohort"}]

        def rows(n, label, offset=0):
            for i in range(offset, offset + n):
                yield AnomalyResult(
                    run=run, fleet=fleet, device_id=device_ids[i % len(device_ids)],
                    timestamp=t0 + dt.timedelta(minutes=5 * i), anomaly_score=0.6 + rng.random(),
                    label=label, threshold=0.6, severity=severities[i % 4] if label == Label.ANOMALY else "",
                    model_version=model, baseline_version=baseline,
                    top_metrics=top if label == Label.ANOMALY else [])

        AnomalyResult.objects.bulk_create(rows(anomalies, Label.ANOMALY), batch_size=5000)
        AnomalyResult.objects.bulk_create(rows(normal, Label.NORMAL, offset=anomalies), batch_size=5000)
        reviewer = get_user_model().objects.create_user(f"{name}-reviewer")
        ids = list(AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).values_list("id", flat=True)[:feedback])
        AnomalyFeedback.objects.bulk_create([AnomalyFeedback(anomaly_id=i, user=reviewer, verdict=Verdict.values[i % 3])
                                             for i in ids], batch_size=5000)


class _QueryTimer:
    """connection.execute_wrapper that records (milliseconds, SQL) of every query."""

    def __init__(self, log: list):
        self.log = log

    def __call__(self, execute, sql, params, many, context):
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.log.append(((time.perf_counter() - start) * 1000, sql))


def _bulk_review(name: str, only: str) -> dict:
    """One verdict on a page of anomalies (50, the list's form) and on 500 (the API's maximum), timed
    once each over open anomalies of the run: wall milliseconds and queries, the commit hooks included."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db import connection
    from django.test import Client

    from detection.models import AnomalyResult
    from detection.services import FEEDBACK_BULK_MAX

    if only and only not in "bulk review":
        return {}
    reviewer = get_user_model().objects.create_user(f"{name}-bulk-reviewer")
    reviewer.groups.add(Group.objects.get_or_create(name="reviewer")[0])
    client = Client()
    client.force_login(reviewer)
    open_ids = list(AnomalyResult.objects.filter(fleet__name=name, label=-1, feedback__isnull=True)
                    .order_by("-timestamp").values_list("pk", flat=True)[:50 + FEEDBACK_BULK_MAX])
    # Untimed: the first request of a process imports the URLconf and views (~0.3 s), which the pages
    # above have paid already unless --only picked this benchmark alone.
    client.get(f"/fleets/{name}/anomalies/", secure=True)
    out = {}
    for label, ids, send in (
        ("list form, 50 anomalies", open_ids[:50], lambda ids: client.post(
            f"/fleets/{name}/anomalies/review/", {"anomaly": ids, "verdict": "false_positive"}, secure=True,
            headers={"HX-Request": "true"})),
        (f"API, {FEEDBACK_BULK_MAX} anomalies", open_ids[50:], lambda ids: client.post(
            "/api/v1/feedback/bulk/", {"anomalies": ids, "verdict": "false_positive"},
            content_type="application/json", secure=True)),
    ):
        queries: list[tuple[float, str]] = []
        start = time.perf_counter()
        with connection.execute_wrapper(_QueryTimer(queries)):
            response = send(ids)
        ms = (time.perf_counter() - start) * 1000
        assert response.status_code in (200, 201), (label, response.status_code, response.content[:300])
        out[label] = {"ms": round(ms, 1), "queries": len(queries)}
        print(f"  bulk review, {label:27s} {ms:7.1f} ms  {len(queries):4d} queries")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anomalies", type=int, default=100_000)
    parser.add_argument("--normal", type=int, default=20_000)
    parser.add_argument("--feedback", type=int, default=2_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--renders", type=int, default=20)
    parser.add_argument("--var-dir", default="/tmp/vigil-bench-pages",
                        help="scratch folder for the SQLite file when DATABASE_URL is unset")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--slow-queries", action="store_true", help="print each page's three slowest queries")
    parser.add_argument("--only", default="", help="benchmark only the pages whose label contains this")
    args = parser.parse_args()
    os.environ.setdefault("VIGIL_VAR_DIR", args.var_dir)
    # Production-like: DEBUG off (no query log); plain static names, so no collectstatic is needed.
    os.environ.setdefault("DJANGO_DEBUG", "false")
    os.environ.setdefault("DJANGO_SECRET_KEY", "benchmark-only-" + os.urandom(16).hex())
    os.environ.setdefault("VIGIL_MANIFEST_STATIC", "false")

    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from detection.models import Fleet
    from detection.services import fleet_delete

    call_command("migrate", verbosity=0)
    name = f"bench-pages-{args.anomalies}"
    if (old := Fleet.objects.filter(name=name).first()) is not None:
        fleet_delete(fleet=old)
    get_user_model().objects.filter(username__startswith=name).delete()
    start = time.perf_counter()
    _populate(anomalies=args.anomalies, normal=args.normal, feedback=args.feedback, devices=args.devices, name=name)
    populate_s = time.perf_counter() - start
    # ANALYZE gives SQLite's planner the row counts (what a production database's autovacuum keeps up to date).
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE" if connection.vendor == "sqlite" else "ANALYZE detection_anomalyresult")

    viewer = get_user_model().objects.create_user(f"{name}-viewer")
    viewer.groups.add(Group.objects.get_or_create(name="viewer")[0])
    client = Client()
    client.force_login(viewer)
    report = {"anomalies": args.anomalies, "normal": args.normal, "feedback": args.feedback, "devices": args.devices,
              "database": connection.vendor, "populate_seconds": round(populate_s, 1), "pages": {}}
    print(f"{args.anomalies:,} anomalies + {args.normal:,} normal results, {args.feedback:,} verdicts, "
          f"{args.devices:,} devices on {connection.vendor} (populated in {populate_s:.1f} s)")
    for label, template in PAGES.items():
        if args.only not in label:
            continue
        url = template.format(fleet=name)
        queries: list[tuple[float, str]] = []
        start = time.perf_counter()
        with connection.execute_wrapper(_QueryTimer(queries)):
            response = client.get(url, secure=True)
        cold_ms = (time.perf_counter() - start) * 1000
        if args.slow_queries:
            with connection.execute_wrapper(_QueryTimer(queries := [])):  # the warm render's queries
                client.get(url, secure=True)
        assert response.status_code == 200, (url, response.status_code)
        times = []
        for _ in range(args.renders):
            start = time.perf_counter()
            client.get(url, secure=True)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        report["pages"][label] = {"median_ms": round(statistics.median(times), 1), "p95_ms": round(p95, 1),
                                  "first_ms": round(cold_ms, 1), "queries": len(queries), "renders": args.renders}
        print(f"  {label:38s} median {statistics.median(times):6.1f} ms  p95 {p95:6.1f} ms  "
              f"first {cold_ms:6.1f} ms  {len(queries):2d} queries")
        if args.slow_queries:
            for ms, sql in sorted(queries, reverse=True)[:3]:
                print(f"      {ms:7.1f} ms  {sql[:300]}")
    report["bulk_review"] = _bulk_review(name, args.only)
    fleet_delete(fleet=Fleet.objects.get(name=name))
    get_user_model().objects.filter(username__startswith=name).delete()
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
