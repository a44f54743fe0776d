"""What the served OpenAPI document says: request bodies derived from the model's input spec, every answer.

The JSON request schema is the input spec written as JSON Schema (nested arrays of the model's rank, fixed
dimensions as ``minItems == maxItems``, the batch between 1 and ``max_batch``, values within the spec's range
and the dtype's, ``multipleOf`` its quantum), so a schema-driven fuzzer's valid bodies are the ones the server
accepts and its invalid ones the ones it refuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgeshield.adversarial import InputSpec


class ErrorBody(BaseModel):
    """Every refusal: a one-line reason and, for bad input, the field at fault."""

    error: str
    field: str | None = None


class Health(BaseModel):
    status: str


class ModelInfo(BaseModel):
    bundle_id: str
    model_sha256: str
    model_version: int
    created: str
    metadata: dict[str, str]
    detector: bool


class Decision(BaseModel):
    decision: str
    score: float | None
    threshold: float | None
    flag_threshold: float | None
    detector: str | None
    prediction: int | None


class Prediction(BaseModel):
    """``predictions`` (labels) or, with a detector, ``decisions`` and ``counts``; an output policy may add
    probabilities or top-k fields."""

    model_config = ConfigDict(extra="allow")
    predictions: list[Any] | None = None
    decisions: list[Decision] | None = None
    counts: dict[str, int] | None = None


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


COMMON: dict[int | str, dict[str, Any]] = {
    401: _err("No verified client certificate, a revoked one, or revocation cannot be checked"),
    403: _err("The client's role may not use this endpoint"),
    408: _err("The request body did not arrive in time"),
    413: _err("The request body is over the size limit"),
    503: _err("A connection or concurrency limit is reached; retry after Retry-After seconds"),
}
PREDICT: dict[int | str, dict[str, Any]] = {
    **COMMON,
    415: _err("The body is neither application/json nor application/x-npy"),
    422: _err("The input does not fit the model's input spec; `field` names what is wrong"),
    429: _err("The client's rate limit is exhausted; retry after Retry-After seconds"),
    504: _err("Inference took longer than the server's inference timeout"),
}
METRICS: dict[int | str, dict[str, Any]] = {
    **COMMON,
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


def _item_schema(spec: InputSpec) -> dict[str, Any]:
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        item: dict[str, Any] = {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}
    else:
        big = float(np.finfo(dtype).max)
        item = {"type": "number", "minimum": -big, "maximum": big}
    if spec.min is not None:
        item["minimum"] = max(item["minimum"], spec.min)
    if spec.max is not None:
        item["maximum"] = min(item["maximum"], spec.max)
    if spec.quantum is not None:
        item["multipleOf"] = spec.quantum
    return item


def input_schema(spec: InputSpec, max_batch: int) -> dict[str, Any]:
    """JSON Schema of ``{"inputs": ...}`` for ``spec``."""
    schema = _item_schema(spec)
    for axis in range(len(spec.shape) - 1, -1, -1):
        dim = spec.shape[axis]
        array: dict[str, Any] = {"type": "array", "items": schema, "minItems": 1}
        if axis == 0:
            array["maxItems"] = max_batch
        elif dim is not None:
            array["minItems"] = array["maxItems"] = dim
        schema = array
    return {"type": "object", "properties": {"inputs": schema}, "required": ["inputs"],
            "additionalProperties": False}


def predict_request_body(spec: InputSpec, max_batch: int) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": input_schema(spec, max_batch)},
        "application/x-npy": {"schema": {"type": "string", "format": "binary",
                                         "description": f"a NumPy .npy file: dtype {spec.dtype}, shape "
                                                        f"{[d if d is not None else 'N' for d in spec.shape]}"}},
    }}}


def security(openapi: dict[str, Any]) -> dict[str, Any]:
    """Declare mutual TLS (OpenAPI 3.1 ``mutualTLS``) as the one way to authenticate."""
    openapi.setdefault("components", {})["securitySchemes"] = {
        "deviceCertificate": {"type": "mutualTLS",
                              "description": "A client certificate issued by the device CA; its role decides access"}}
    openapi["security"] = [{"deviceCertificate": []}]
    return openapi
