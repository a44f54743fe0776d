"""Runtime side of the composed detector graph: verify it, open it, run it (numpy + ONNX Runtime; no ``onnx``).

The owner composes the model and its runtime detectors into one ONNX graph (``_compose.py``) and ships it the way
every model is shipped: as a bundle, signed by the owner and encrypted to the devices, carried inside the detector
file. Its signed metadata binds it to the served model (``model_sha256``) and to the detector parameters it
implements (:func:`binding_digest` over the file's model digest, input spec and those detectors' parameters), so a
graph from another model, another calibration or another owner is refused before ONNX Runtime parses a byte of it:
``open_bundle`` checks the owner's signature and the payload MAC first, then the binding is compared.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeshield.errors import ComposedGraphError, InvalidArgumentError

if TYPE_CHECKING:
    from edgeshield.adversarial._calibrate import DetectorFile
    from edgeshield.bundles._ort import onnxruntime
    from edgeshield.keys import DevicePrivateKey, OwnerPublicKey

PROBS_OUTPUT = "edgeshield.probs"
VALID_OUTPUT = "edgeshield.valid"  # 1: the input passes the spec's value checks for certain (else numpy decides)
SCORE_PREFIX = "edgeshield.score."
BINDING_FORMAT = "edgeshield.composed-detectors"
BINDING_VERSION = 1
META_MODEL = "edgeshield.composed.model_sha256"  # signed metadata of the composed bundle
META_BINDING = "edgeshield.composed.binding"


@dataclass(frozen=True)
class ComposedGraph:
    """What the detector file carries: the composed graph's bundle and what that graph computes."""

    bundle: bytes  # a signed, encrypted bundle (``bundles.protect``) of the composed ONNX graph
    detectors: tuple[str, ...]  # the detectors whose scores the graph outputs
    softmax: bool  # whether the graph applies a softmax to the model's output 0 (logits) or reads probabilities

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": base64.b64encode(self.bundle).decode("ascii"),
                "bundle_sha256": hashlib.sha256(self.bundle).hexdigest(), "detectors": list(self.detectors),
                "softmax": self.softmax}

    @classmethod
    def from_dict(cls, d: Any) -> ComposedGraph:
        try:
            raw = base64.b64decode(d["bundle"], validate=True)
            out = cls(raw, tuple(str(n) for n in d["detectors"]), bool(d["softmax"]))
            digest = str(d["bundle_sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"detector file: malformed composed graph ({exc})") from None
        if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), digest) or not out.detectors:
            # A transport check only: what authenticates the graph is the owner's signature on the bundle.
            raise InvalidArgumentError("detector file: the composed graph's bundle does not match its digest")
        return out


def binding_digest(file: DetectorFile, detectors: Sequence[str], softmax: bool) -> str:
    """SHA-256 of what the composed graph must implement: the model, the input spec and the detectors' params."""
    doc = {"format": BINDING_FORMAT, "version": BINDING_VERSION, "model_sha256": file.model_sha256,
           "input_spec": file.input_spec.to_dict(), "softmax": bool(softmax),
           "detectors": [{"name": n, "params": file.get(n).params} for n in detectors]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ComposedDetectors:
    """One ONNX Runtime session that returns the probabilities on ``x``, each composed detector's scores and
    whether ``x`` certainly passes the input spec's value checks (finite, range, grid)."""

    def __init__(self, session: onnxruntime.InferenceSession, detectors: Sequence[str]) -> None:
        inputs = session.get_inputs()
        outputs = {o.name for o in session.get_outputs()}
        wanted = [PROBS_OUTPUT, *(SCORE_PREFIX + n for n in detectors)]
        if len(inputs) != 1 or not set(wanted) <= outputs:
            raise ComposedGraphError(f"the composed graph does not output {sorted(set(wanted) - outputs)}")
        self.checks_spec = VALID_OUTPUT in outputs  # without it, numpy checks every input's values
        self.session, self.detectors = session, tuple(detectors)
        self.input_name = inputs[0].name
        self._outputs = [PROBS_OUTPUT, *([VALID_OUTPUT] if self.checks_spec else []), *wanted[1:]]

    def run_checked(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
        """The probabilities on ``x``, ``{detector: scores}`` and the spec check, from one ``session.run``."""
        out = self.session.run(self._outputs, {self.input_name: x})
        if not self.checks_spec:
            return out[0], dict(zip(self.detectors, out[1:], strict=True)), False
        return out[0], dict(zip(self.detectors, out[2:], strict=True)), bool(out[1] == 1.0)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The probabilities on ``x`` and ``{detector: scores}``."""
        probs, scores, _ = self.run_checked(x)
        return probs, scores


@contextlib.contextmanager
def bytes_as_file(data: bytes, name: str) -> Iterator[Path]:
    """``data`` readable at a path for as long as the block runs: an anonymous memory file where the system has
    them (Linux), else a file in a private temporary directory, removed afterwards."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as fh:
                fh.write(data)
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="edgeshield-") as d:  # created 0700
        p = Path(d) / name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield p


def check_binding(metadata: Mapping[str, str], file: DetectorFile, composed: ComposedGraph, model_sha256: str) -> None:
    """Refuse a composed graph whose signed metadata names another model or other detector parameters."""
    if not hmac.compare_digest(metadata.get(META_MODEL, ""), model_sha256):
        raise ComposedGraphError(f"the composed detector graph was built for model "
                                 f"{metadata.get(META_MODEL, '(none)')[:16]}…, not this model ({model_sha256[:16]}…)")
    if not hmac.compare_digest(metadata.get(META_BINDING, ""),
                               binding_digest(file, composed.detectors, composed.softmax)):
        raise ComposedGraphError("the composed detector graph was not built for this detector file's detectors "
                                 "and parameters (recalibrate, or remove the composed graph)")


def open_composed(file: DetectorFile, owner_key: OwnerPublicKey, device_key: DevicePrivateKey, *,
                  model_sha256: str, session_options: onnxruntime.SessionOptions | None = None) -> ComposedDetectors:
    """Verify and open the detector file's composed graph for the model ``model_sha256`` (the served bundle's).

    The bundle's owner signature and this device's payload MAC are checked before anything is parsed (a foreign
    or altered graph raises the bundle's typed errors: ``WrongOwnerKeyError``, ``SignatureError``,
    ``PayloadDigestError``...); then the binding (:class:`ComposedGraphError`). ORT sees only a verified graph.
    """
    from edgeshield import bundles

    composed = file.composed
    if composed is None:
        raise InvalidArgumentError("this detector file carries no composed graph")
    file.check_model(model_sha256)
    with bytes_as_file(composed.bundle, "composed-detectors.esb") as path:
        manifest = bundles.verify(path, owner_key)  # signature first: the binding is read from signed metadata
        check_binding(manifest.metadata, file, composed, model_sha256)
        opened = bundles.open_bundle(path, owner_key, device_key, session_options=session_options)
    check_binding(opened.manifest.metadata, file, composed, model_sha256)  # what was opened is what was checked
    return ComposedDetectors(opened.session, composed.detectors)
