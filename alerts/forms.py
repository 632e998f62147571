from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from detection.models import Fleet

from .models import AlertRule


class AlertRuleForm(forms.ModelForm):
    """An alert rule. A webhook needs a secret (receivers check the signature); quiet hours need both ends."""

    fleet = forms.ModelChoiceField(queryset=Fleet.objects.all(), to_field_name="name")

    class Meta:
        model = AlertRule
        fields = ["fleet", "name", "enabled", "min_severity", "manufacturer", "model", "os_version", "store",
                  "device_external_id", "email_to", "webhook_url", "webhook_secret", "quiet_start", "quiet_end",
                  "budget", "budget_window_minutes"]
        widgets = {"email_to": forms.TextInput(), "webhook_secret": forms.PasswordInput(render_value=True),
                   "quiet_start": forms.TimeInput(attrs={"type": "time"}),
                   "quiet_end": forms.TimeInput(attrs={"type": "time"})}
        labels = {"min_severity": "Minimum severity", "device_external_id": "Device", "email_to": "Email to",
                  "budget": "Messages per window", "budget_window_minutes": "Window (minutes)",
                  "quiet_start": "Quiet from (UTC)", "quiet_end": "Quiet until (UTC)",
                  "os_version": "OS version", "webhook_url": "Webhook URL"}

    def clean_email_to(self) -> str:
        value = self.cleaned_data.get("email_to", "")
        for address in (a.strip() for a in value.split(",")):
            if address:
                try:
                    validate_email(address)
                except ValidationError:
                    raise ValidationError(f"{address!r} is not an email address") from None
        return value

    def clean_budget(self) -> int:
        value = self.cleaned_data["budget"]
        if value < 1:
            raise ValidationError("at least 1 message per window")
        return value

    def clean_budget_window_minutes(self) -> int:
        value = self.cleaned_data["budget_window_minutes"]
        if not 1 <= value <= 7 * 24 * 60:
            raise ValidationError("between 1 minute and 7 days")
        return value

    def clean(self):
        data = super().clean()
        if data.get("webhook_url") and not data.get("webhook_secret"):
            self.add_error("webhook_secret", "a webhook needs a secret to sign its messages")
        if (data.get("quiet_start") is None) != (data.get("quiet_end") is None):
            self.add_error("quiet_end", "give both ends of the quiet hours, or neither")
        fleet, name = data.get("fleet"), data.get("name")
        taken = AlertRule.objects.filter(fleet=fleet, name=name).exclude(pk=self.instance.pk)
        if fleet and name and taken.exists():
            self.add_error("name", f"{fleet.name} already has a rule named {name!r}")
        return data


class SnoozeForm(forms.Form):
    minutes = forms.TypedChoiceField(coerce=int, choices=[(60, "1 hour"), (240, "4 hours"), (1440, "1 day"),
                                                          (10080, "1 week")])
