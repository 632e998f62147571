"""What a bulk action on a list posts: the ids of the rows ticked and the list's query string to go back
to. Used by the anomaly list's verdicts (detection.views) and the proposal queue's decisions
(baselines.views)."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponseRedirect, QueryDict


def posted_ids(request: HttpRequest, field: str) -> list[int]:
    """The ids posted under field (a repeated form field), blanks skipped, in the order posted. Raises
    ValueError("ids must be whole numbers") for one that is not an integer in 1 .. 2**63 - 1 (a bigger
    one would overflow the database)."""
    try:
        ids = [int(v) for v in request.POST.getlist(field) if v.strip()]
    except ValueError:
        raise ValueError("ids must be whole numbers") from None
    if any(not 0 < i < 2**63 for i in ids):
        raise ValueError("ids must be whole numbers")
    return ids


def back_url(request: HttpRequest, path: str) -> str:
    """path followed by the query string posted as "query" (the list's filters, sort and page). It is
    parsed and re-encoded, so it can only be a query string: a line break cannot reach a Location header."""
    query = QueryDict(request.POST.get("query", "").lstrip("?")).urlencode()
    return path + (f"?{query}" if query else "")


def see_other(url: str) -> HttpResponseRedirect:
    """A 303 redirect: back to the list after a refused bulk action, whose message waits there."""
    response = HttpResponseRedirect(url)
    response.status_code = 303
    return response
