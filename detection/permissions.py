"""Roles as Django groups: viewer (reads), reviewer (gives feedback), approver (approves baseline changes
and promotes models), admin. Roles are cumulative (admin ⊇ approver ⊇ reviewer ⊇ viewer); superusers
have every role. The groups are created by migration detection 0004.
"""
from __future__ import annotations

from functools import wraps
from typing import Callable

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from .choices import Role

ROLE_ORDER: tuple[str, ...] = tuple(Role.values)  # weakest first


def user_roles(user) -> set[str]:
    """Every role user holds, the implied ones included; one query per user object (cached on it)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return set()
    if user.is_superuser:
        return set(ROLE_ORDER)
    cached = getattr(user, "_vigil_roles", None)
    if cached is None:
        names = set(user.groups.filter(name__in=ROLE_ORDER).values_list("name", flat=True))
        top = max((ROLE_ORDER.index(n) for n in names), default=-1)
        cached = user._vigil_roles = set(ROLE_ORDER[: top + 1])
    return cached


def user_has_role(user, role: str) -> bool:
    """True when user holds role or a stronger one; raises ValueError for an unknown role."""
    if role not in ROLE_ORDER:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLE_ORDER)}")
    return role in user_roles(user)


def role_required(role: str) -> Callable:
    """View decorator: anonymous users go to the login page, users without role get a rendered 403."""
    if role not in ROLE_ORDER:
        raise ValueError(f"unknown role {role!r}")

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not user_has_role(request.user, role):
                return render(request, "403.html", {"required_role": role}, status=403)
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
