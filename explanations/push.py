"""The one helper that tells pages an explanation changed. Producers call explanation_push; they never
touch the channel layer themselves. The event carries ids only: the consumer re-checks the user and
renders the panel itself (explanations.consumers)."""
from __future__ import annotations

import logging
from typing import TypedDict

logger = logging.getLogger(__name__)


class ExplanationEvent(TypedDict):
    type: str  # "explanation.updated"
    anomaly_id: int
    explanation_id: int


def group_name(anomaly_id: int) -> str:
    return f"explanation-anomaly-{int(anomaly_id)}"


def explanation_push(*, explanation) -> None:
    """Tell every page showing the explanation's anomaly that it changed. A failing channel layer is
    logged, never raised: the page's polling picks the change up anyway."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    event: ExplanationEvent = {"type": "explanation.updated", "anomaly_id": explanation.anomaly_id,
                               "explanation_id": explanation.pk}
    try:
        async_to_sync(layer.group_send)(group_name(explanation.anomaly_id), event)
    except Exception:  # the push is best effort; polling is the fallback
        logger.warning("could not push explanation %s", explanation.pk, exc_info=True)
