from django.db import models


class ExplanationStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class Verdict(models.TextChoices):
    ACCEPTED = "accepted", "Validated"
    REJECTED = "rejected", "Rejected"
    FAILED = "failed", "Provider failed"


class Provider(models.TextChoices):
    BUILTIN = "builtin", "Built-in writer"
    LLM = "llm", "LLM (OpenAI-compatible API)"


class AttributionMethod(models.TextChoices):
    TREE_SHAP = "tree_shap", "SHAP TreeExplainer"
    KERNEL_SHAP = "kernel_shap", "SHAP KernelExplainer"
    CONTEXT_SHAP = "context_shap", "Shapley values in the device's sequence"
    ROBUST_Z = "robust_z", "Robust z-score (fallback)"
