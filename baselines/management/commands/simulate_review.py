"""python manage.py simulate_review --fleet NAME --rounds 3 [--json FILE]: the feedback loop on a fleet with
ground truth (GroundTruthLabel rows, e.g. from generate_fleet), with simulated people.

Round 0 is the current state (the latest scored run; one is made if there is none). Each further round: a
"simulated-reviewer" labels every open anomaly of the latest run from the ground truth (through
detection.services.feedback_give), proposals are made (baselines.services.proposals_suggest) and approved
by a "simulated-approver", and the apply chain runs (new baseline version, retrain, re-score). A table of
anomalies, TP, FP, precision and recall per round is printed (and written as JSON with --json).
"""
from __future__ import annotations

import json

import pandas as pd
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from baselines import services
from baselines.tasks import apply_chain
from detection.choices import Label, Role, RunStatus, Trigger, Verdict
from detection.ingest.loader import load_ground_truth
from detection.management.checks import fleet_named
from detection.ml.evaluation import binary_metrics, in_windows
from detection.models import AnomalyFeedback, AnomalyResult, Fleet, PipelineRun
from detection.services import feedback_give, pipeline_run_create, pipeline_run_execute

ACTOR = "simulate_review"


class Command(BaseCommand):
    help = "Simulate reviewers and approvers on a fleet with ground truth and report precision/recall per round."

    def add_arguments(self, parser):
        parser.add_argument("--fleet", required=True, help="fleet name (must have ground-truth labels)")
        parser.add_argument("--rounds", type=int, default=3, help="feedback rounds after round 0 (default 3)")
        parser.add_argument("--json", dest="json_path", help="also write the table to this JSON file")

    def handle(self, *args, **opts):
        fleet = fleet_named(opts["fleet"])
        if opts["rounds"] < 0:
            raise CommandError(f"--rounds must be >= 0, got {opts['rounds']}")
        truth = load_ground_truth(fleet)
        if truth.empty:
            raise CommandError(f"fleet {fleet.name} has no ground-truth labels; generate one with generate_fleet")
        reviewer = _user("simulated-reviewer", Role.REVIEWER)
        approver = _user("simulated-approver", Role.APPROVER)
        run = _latest_run(fleet)
        if run is None:
            run = pipeline_run_execute(run_id=pipeline_run_create(fleet=fleet, trigger=Trigger.CLI).id)
            if run.status != RunStatus.SUCCEEDED:
                raise CommandError(f"the initial pipeline run failed: {run.error}")
        rows = [{"round": 0, **_metrics(run, truth), "proposals": 0, "applied": 0}]
        self._print_header()
        self._print(rows[-1])
        for number in range(1, opts["rounds"] + 1):
            self._review(run, truth, reviewer)
            try:
                proposals = services.proposals_suggest(fleet=fleet, actor_label=ACTOR)
            except services.ProposalError as exc:
                raise CommandError(str(exc)) from None
            ids = []
            for proposal in proposals:
                try:
                    services.proposal_approve(proposal=proposal, user=approver, comment="simulated approval",
                                              enqueue=False)
                    ids.append(proposal.pk)
                except services.ProposalError as exc:
                    self.stdout.write(self.style.WARNING(f"proposal {proposal.pk} not approved: {exc}"))
            if ids:
                apply_chain(ids).apply()
            applied = services.BaselineProposal.objects.filter(pk__in=ids, status="applied").count()
            failed = services.BaselineProposal.objects.filter(pk__in=ids, status="failed").first()
            if failed is not None:
                self.stdout.write(self.style.WARNING(f"proposals failed: {failed.error}"))
            run = _latest_run(fleet)
            rows.append({"round": number, **_metrics(run, truth), "proposals": len(proposals), "applied": applied})
            self._print(rows[-1])
        first, last = rows[0], rows[-1]
        summary = {"fp_change": (last["fp"] - first["fp"]) / first["fp"] if first["fp"] else None,
                   "recall_ratio": last["recall"] / first["recall"] if first["recall"] else None}
        self.stdout.write(f"FP {first['fp']} -> {last['fp']} ({summary['fp_change']:+.0%}); recall "
                          f"{first['recall']:.3f} -> {last['recall']:.3f} ({summary['recall_ratio']:.0%} of round 0)"
                          if first["fp"] and first["recall"] else "no false positives or recall at round 0")
        if opts["json_path"]:
            with open(opts["json_path"], "w") as fh:
                json.dump({"fleet": fleet.name, "rounds": rows, **summary}, fh, indent=2)

    def _review(self, run: PipelineRun, truth: pd.DataFrame, reviewer) -> None:
        reviewed = set(AnomalyFeedback.objects.filter(anomaly__run=run, user=reviewer).values_list("anomaly_id",
                                                                                                     flat=True))
        open_ = pd.DataFrame.from_records(
            AnomalyResult.objects.filter(run=run, label=Label.ANOMALY).exclude(id__in=reviewed)
            .values_list("id", "device_id", "timestamp"), columns=["id", "device_id", "timestamp"])
        if open_.empty:
            return
        open_["timestamp"] = pd.to_datetime(open_["timestamp"], utc=True)
        hits = in_windows(open_, truth)
        anomalies = AnomalyResult.objects.in_bulk(open_["id"].tolist())
        for pk, hit in zip(open_["id"], hits):
            feedback_give(anomaly=anomalies[pk], user=reviewer,
                          verdict=Verdict.TRUE_POSITIVE if hit else Verdict.FALSE_POSITIVE,
                          comment="simulated from ground truth")

    def _print_header(self):
        self.stdout.write(f"{'round':>5} {'anomalies':>9} {'TP':>5} {'FP':>5} {'precision':>9} {'recall':>7} "
                          f"{'proposals':>9} {'applied':>7}")

    def _print(self, row):
        self.stdout.write(f"{row['round']:>5} {row['anomalies']:>9} {row['tp']:>5} {row['fp']:>5} "
                          f"{row['precision']:>9.3f} {row['recall']:>7.3f} {row['proposals']:>9} {row['applied']:>7}")


def _user(username: str, role: str):
    user, _ = get_user_model().objects.get_or_create(username=username)
    user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


def _latest_run(fleet: Fleet) -> PipelineRun | None:
    return (PipelineRun.objects.filter(fleet=fleet, status=RunStatus.SUCCEEDED, model_version__isnull=False)
            .order_by("-created_at", "-id").first())


def _metrics(run: PipelineRun, truth: pd.DataFrame) -> dict:
    """Row-level TP/FP/precision/recall of run's decisions against the ground-truth windows."""
    rows = pd.DataFrame.from_records(AnomalyResult.objects.filter(run=run).values_list("device_id", "timestamp",
                                                                                        "label"),
                                     columns=["device_id", "timestamp", "label"])
    rows["timestamp"] = pd.to_datetime(rows["timestamp"], utc=True)
    m = binary_metrics(in_windows(rows, truth), (rows["label"] == Label.ANOMALY).to_numpy())
    return {"run": run.id, "anomalies": m.tp + m.fp, "tp": m.tp, "fp": m.fp, "precision": round(m.precision, 4),
            "recall": round(m.recall, 4)}
