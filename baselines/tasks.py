"""Celery tasks of the feedback loop: thin wrappers that take ids and call one service each.

Applying approved proposals is a chain on the ml queue: build the baseline version -> retrain, re-score
and persist (a pipeline run on that version) -> mark applied and notify. Each step claims its work with a
conditional update (baselines.services), so a redelivered task never runs a step twice.
"""
from celery import chain, shared_task

from . import services


@shared_task(name="baselines.tasks.proposal_baseline_task", acks_late=True, queue="ml")
def proposal_baseline_task(proposal_ids: list[int]) -> list[int]:
    services.apply_step_baseline(proposal_ids=proposal_ids)
    return proposal_ids


@shared_task(name="baselines.tasks.proposal_retrain_task", acks_late=True, queue="ml")
def proposal_retrain_task(proposal_ids: list[int]) -> list[int]:
    services.apply_step_retrain(proposal_ids=proposal_ids)
    return proposal_ids


@shared_task(name="baselines.tasks.proposal_finish_task", acks_late=True, queue="ml")
def proposal_finish_task(proposal_ids: list[int]) -> list[int]:
    services.apply_step_finish(proposal_ids=proposal_ids)
    return proposal_ids


def apply_chain(proposal_ids: list[int]):
    """The chain's signature (immutable steps, each given the ids)."""
    ids = [int(i) for i in proposal_ids]
    return chain(proposal_baseline_task.si(ids), proposal_retrain_task.si(ids), proposal_finish_task.si(ids))


def enqueue_apply_chain(proposal_ids: list[int]) -> None:
    apply_chain(proposal_ids).apply_async()


@shared_task(name="baselines.tasks.proposals_suggest_all_task", acks_late=True)
def proposals_suggest_all_task() -> dict:
    """Periodic (celery beat): propose adjustments for every fleet from its reviewed anomalies."""
    return services.proposals_suggest_all(actor_label="celery-beat")
