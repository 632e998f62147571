from django.db import models


class ProposalStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    APPLIED = "applied", "Applied"
    FAILED = "failed", "Failed"


class ProposalKind(models.TextChoices):
    """What a proposal changes: a baseline median shift, a MAD scale factor, the contamination, or a
    feature-domain weight of the model."""

    SHIFT = "shift", "Median shift"
    MAD_SCALE = "mad_scale", "MAD scale"
    CONTAMINATION = "contamination", "Contamination"
    DOMAIN_WEIGHT = "domain_weight", "Domain weight"


class ProposalSource(models.TextChoices):
    RULES = "rules", "Rule-based engine"
    LLM = "llm", "LLM"
    USER = "user", "User"
