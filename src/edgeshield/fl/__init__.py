"""Federated learning on Flower with EdgeShield's differential privacy and robust aggregation.

Everything here is imported lazily: ``import edgeshield.fl`` loads neither torch nor Flower; a public name is
resolved from its submodule on first use (PEP 562), so modules owned by different parts stay independent.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # configuration (P2)
    "DPConfig": "_config",
    "FLConfig": "_config",
    "UnsupportedCombinationError": "_config",
    "check_combination": "_config",
    # data, model, attacks (P2)
    "FederatedData": "_data",
    "federated_data": "_data",
    "partition": "_data",
    "ATTACKS": "_attacks",
    "BACKDOOR_TARGET": "_attacks",
    "add_trigger": "_attacks",
    "backdoor_success": "_attacks",
    "parse_attack": "_attacks",
    # strategy and simulation (P2)
    "CentralDP": "_strategy",
    "RobustAggregation": "_strategy",
    "make_strategy": "_strategy",
    "make_client_app": "_client",
    "FLResult": "_sim",
    "RoundRecord": "_sim",
    "SimulationError": "_sim",
    "Simulator": "_sim",
    "effective_noise_multiplier": "_sim",
    "run_simulation": "_sim",
    "protect_result": "_export",
    "to_onnx": "_export",
    # robust aggregation and update validation (P3)
    "AggregateResult": "_robust",
    "Aggregator": "_robust",
    "make_aggregator": "_robust",
    "outliers": "_robust",
    "UpdateRejected": "_updates",
    "flatten": "_updates",
    "unflatten": "_updates",
    "validate_update": "_updates",
    # on-device data validation
    "DataReport": "_validate",
    "check_local_data": "_validate",
    # deployment (SuperLink + SuperNodes over TLS) adds its names here
}

__all__ = [  # noqa: PLE0604 - the names resolved lazily by __getattr__
    *_EXPORTS,
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeshield.fl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
