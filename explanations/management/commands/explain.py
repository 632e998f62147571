"""python manage.py explain --run ID|latest [--fleet NAME] [--top N] [--provider NAME] [--regenerate] [--json FILE]"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from detection.choices import Label
from detection.models import AnomalyResult, Fleet, PipelineRun
from detection.selectors import latest_scored_run
from explanations.narrative import PROVIDERS
from explanations.services import (
    ExplanationError,
    explanation_record,
    explanation_run_generate,
    provider_resolve,
)


class Command(BaseCommand):
    help = ("Explain every anomaly of a pipeline run (SHAP attributions and a validated narrative each), "
            "showing progress; cached explanations are reused unless --regenerate.")

    def add_arguments(self, parser):
        parser.add_argument("--run", required=True, help="pipeline run id, or 'latest' (the newest scored run)")
        parser.add_argument("--fleet", help="fleet name; with --run latest, that fleet's newest scored run")
        parser.add_argument("--provider", choices=PROVIDERS, help="narrative provider (default: VIGIL_LLM provider, "
                                                                  "builtin unless configured)")
        parser.add_argument("--top", type=int, help="only the N highest-scoring anomalies of the run")
        parser.add_argument("--regenerate", action="store_true", help="explain again even where cached")
        parser.add_argument("--json", dest="json_file",
                            help="write, per anomaly, the payload, narrative, provider and validation to this file")

    def handle(self, *args, **opts):
        run = self._run(opts["run"], opts.get("fleet"))
        try:
            provider_resolve(opts.get("provider"))
        except ExplanationError as exc:
            raise CommandError(str(exc)) from None
        top, ids = opts.get("top"), None
        if top is not None:
            if top < 1:
                raise CommandError(f"--top must be at least 1, not {top}")
            ids = list(AnomalyResult.objects.filter(run=run, label=Label.ANOMALY)
                       .order_by("-anomaly_score", "pk").values_list("pk", flat=True)[:top])
        which = f"{len(ids)} highest-scoring of the {run.n_anomalies}" if ids is not None else f"{run.n_anomalies}"
        self.stdout.write(f"explaining the {which} anomalies of run {run.pk} on fleet {run.fleet.name}")
        started = time.perf_counter()
        try:
            result = explanation_run_generate(run=run, provider=opts.get("provider"), anomaly_ids=ids,
                                              regenerate=opts["regenerate"], progress=self._progress)
        except ExplanationError as exc:
            raise CommandError(str(exc)) from None
        verdicts: dict[str, int] = {}
        for e in result.explanations:
            verdicts[e.verdict or e.status] = verdicts.get(e.verdict or e.status, 0) + 1
        summary = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())) or "nothing to explain"
        self.stdout.write(self.style.SUCCESS(
            f"run {run.pk}: {len(result.explanations)} explanations ({result.generated} generated, "
            f"{result.reused} cached) in {time.perf_counter() - started:.1f}s; narratives: {summary}"))
        if opts.get("json_file"):
            self._write_json(Path(opts["json_file"]), run, result.explanations)

    def _run(self, ident: str, fleet_name: str | None) -> PipelineRun:
        fleet = None
        if fleet_name:
            fleet = Fleet.objects.filter(name=fleet_name).first()
            if fleet is None:
                known = ", ".join(Fleet.objects.values_list("name", flat=True)) or "none yet"
                raise CommandError(f"unknown fleet {fleet_name!r} (known: {known})")
        if ident == "latest":
            if fleet is not None:
                run = latest_scored_run(fleet=fleet)
            else:
                run = (PipelineRun.objects.filter(status__in=("succeeded", "degraded"), n_anomalies__gt=0)
                       .order_by("-created_at", "-id").first())
            if run is None:
                raise CommandError("no scored run" + (f" of fleet {fleet.name}" if fleet else "") + " yet; run the "
                                   "pipeline first")
            return run
        try:
            pk = int(ident)
        except ValueError:
            raise CommandError(f"--run must be a run id or 'latest', not {ident!r}") from None
        runs = PipelineRun.objects.select_related("fleet", "model_version", "baseline_version")
        run = runs.filter(pk=pk, **({"fleet": fleet} if fleet else {})).first() if 0 < pk < 2**63 else None
        if run is None:
            raise CommandError(f"no pipeline run {pk}" + (f" of fleet {fleet.name}" if fleet else ""))
        return run

    def _progress(self, done: int, total: int, message: str) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        self.stdout.write(f"  [{'#' * filled}{'.' * (width - filled)}] {done:>6,}/{total:,}  {message}")
        self.stdout.flush()

    def _write_json(self, path: Path, run: PipelineRun, explanations) -> None:
        document = {"run": run.pk, "fleet": run.fleet.name, "anomalies": [explanation_record(e) for e in explanations]}
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        try:
            with open(part, "w", encoding="utf-8") as fh:
                json.dump(document, fh, default=str)
            os.replace(part, path)
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc}") from None
        self.stdout.write(f"wrote {len(explanations)} explanations to {path}")
