"""Role permissions for the API, on top of detection.permissions (roles are cumulative Django groups)."""
from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission

from detection.permissions import user_has_role


class HasRole(BasePermission):
    """Reads need `read_role`, writes (and domain actions) `write_role`. Anonymous users get 401
    (the authentication classes add the challenge), signed-in users without the role 403."""

    read_role = "viewer"
    write_role = "approver"

    def has_permission(self, request, view) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        role = getattr(view, "read_role", self.read_role) if request.method in SAFE_METHODS else \
            getattr(view, "write_role", self.write_role)
        action_roles = getattr(view, "action_roles", {})
        role = action_roles.get(getattr(view, "action", None), role)
        return user_has_role(request.user, role)
