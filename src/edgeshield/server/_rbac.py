"""Role-based access control with pycasbin: a model file and an editable CSV policy of (role, path, method)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from edgeshield._io import check_readable_file
from edgeshield.errors import InvalidArgumentError, MissingDependencyError

ROLES = ("admin", "operator", "auditor", "client")


def default_policy_path() -> Path:
    return Path(str(resources.files("edgeshield.server") / "policy" / "policy.csv"))


def default_model_path() -> Path:
    return Path(str(resources.files("edgeshield.server") / "policy" / "model.conf"))


class Rbac:
    """``allowed(role, path, method)``; the policy is read once at start-up (edit the CSV, restart or reload)."""

    def __init__(self, policy: str | os.PathLike[str] | None = None,
                 model: str | os.PathLike[str] | None = None) -> None:
        try:
            import casbin
        except ImportError:
            raise MissingDependencyError("the server needs casbin, a core dependency: pip install edgeshield") from None
        self.policy_path = check_readable_file(policy or default_policy_path(), what="RBAC policy")
        self.model_path = check_readable_file(model or default_model_path(), what="RBAC model")
        try:
            self._enforcer = casbin.Enforcer(str(self.model_path), str(self.policy_path))
        except Exception as exc:  # noqa: BLE001 - casbin raises plain exceptions for malformed files
            raise InvalidArgumentError(f"cannot load the RBAC policy {self.policy_path}: {exc}") from None

    def allowed(self, role: str | None, path: str, method: str) -> bool:
        return role is not None and bool(self._enforcer.enforce(role, path, method))

    def reload(self) -> None:
        self._enforcer.load_policy()
