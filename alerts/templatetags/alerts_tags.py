from django import template

register = template.Library()


@register.simple_tag
def open_alert_count() -> int:
    """Open alerts over all fleets, for the nav badge (one COUNT query)."""
    from alerts.selectors import open_alert_count as count

    return count()
