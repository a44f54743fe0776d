"""The secure edge inference server: mutual TLS 1.3 (device PKI), RBAC (pycasbin), input validation and robust
inference, Prometheus metrics, and every security event in the tamper-evident audit log."""

from edgeshield.server._app import ServerState, create_app
from edgeshield.server._rbac import ROLES, Rbac
from edgeshield.server._serve import ServeConfig, build_state, make_server, running, serve

__all__ = ["ROLES", "Rbac", "ServeConfig", "ServerState", "build_state", "create_app", "make_server", "running",
           "serve"]
