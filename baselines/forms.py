"""Forms of the baseline and proposal pages: decision comment, rollback reason, the diff's two versions."""

from __future__ import annotations

from django import forms

COMMENT_MAX = 2000


class DecisionForm(forms.Form):
    """Approve or reject a proposal; the comment is optional and goes into the audit log."""

    comment = forms.CharField(
        label="Comment",
        required=False,
        max_length=COMMENT_MAX,
        widget=forms.Textarea(attrs={"rows": 2, "maxlength": COMMENT_MAX}),
    )


class RollbackForm(forms.Form):
    """Roll a fleet's baseline back to an earlier version; the reason is required (it is audited)."""

    reason = forms.CharField(
        label="Reason",
        max_length=COMMENT_MAX,
        widget=forms.Textarea(attrs={"rows": 2, "maxlength": COMMENT_MAX}),
    )


class SuggestForm(forms.Form):
    fleet = forms.SlugField(label="Fleet", max_length=100)


class DiffForm(forms.Form):
    """Two version numbers of one fleet, ?from=&to= (choices: the fleet's versions, newest first)."""

    def __init__(self, *args, choices: list[tuple[int, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # "from" is a Python keyword, so the fields are added here rather than declared.
        for name, label in (("from", "From"), ("to", "To")):
            self.fields[name] = forms.TypedChoiceField(label=label, choices=choices or [], coerce=int)
