"""ONNX Runtime sessions over authenticated plaintext: streamed into ONNX Runtime's own loader, or from memory.

Streaming (version 2 bundles whose image is one self-contained model): the verified plaintext chunks are written
into a pipe and ONNX Runtime loads the model from the pipe's ``/proc/self/fd`` path, so its protobuf parser reads
chunk ``i`` while chunk ``i + 1`` is being decrypted, and the model is held once (by ONNX Runtime, which owns it
and frees each weight once it has pre-packed it) instead of twice (a decrypted image plus ONNX Runtime's copy).
A pipe lives in kernel memory: the plaintext never touches disk, and the path opens only for this process (and
whoever may already read its memory).

glibc raises its mmap threshold at run time (up to 32 MiB) once a large block is freed, after which the growing
buffers of ONNX Runtime's stream parser land in the heap and leave holes there: benchmarks/bundles.py measured
the streamed open's peak at 1.19x the model in one run and 1.77x in the next. The streamed open therefore pins
the threshold at glibc's own default (128 KiB, ``mallopt(M_MMAP_THRESHOLD)``), once per process and only where
the user has not set ``MALLOC_MMAP_THRESHOLD_``: large blocks then stay mapped and go back to the system when
freed.

From memory (version 1 bundles, and images with a separate weights section): the graph bytes plus the weights
handed over as an in-memory external-data file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from edgeshield.errors import UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np

    from edgeshield.bundles import _format
    from edgeshield.bundles._ort import onnxruntime

FD_DIR = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
PIPE_SIZE = 1 << 20  # Linux's default pipe-max-size; fewer wake-ups than the 64 KiB default
MMAP_THRESHOLD = 128 * 1024  # glibc's default M_MMAP_THRESHOLD, kept from drifting upwards (see above)
_pinned: list[bool] = []


def can_stream() -> bool:
    """Whether this platform lets ONNX Runtime open a pipe by path (Linux, macOS; not Windows)."""
    return FD_DIR is not None


def from_stream(
    chunks: Iterable[bytes | memoryview],
    model_size: int,
    options: onnxruntime.SessionOptions | None,
    providers: Sequence[str] | None,
) -> onnxruntime.InferenceSession:
    """A session whose model is the first ``model_size`` bytes of ``chunks``, parsed by ONNX Runtime as they arrive.

    ``chunks`` is consumed to its end (a verifying iterator checks every chunk, also those past the model), and
    ONNX Runtime sees end of file only then. Whatever ``chunks`` raises is raised here, and any session ONNX
    Runtime may have built from the bytes before it is dropped.
    """
    from edgeshield.bundles._ort import onnxruntime as ort

    if FD_DIR is None:
        raise UnsupportedModelError("streaming a model into ONNX Runtime needs /proc/self/fd or /dev/fd")
    _pin_mmap_threshold()
    rd, wr = os.pipe()  # both ends close-on-exec (Python's default): no child process inherits them
    failure: list[BaseException] = []

    def feed() -> None:
        left = model_size
        try:
            _set_pipe_size(wr)
            for chunk in chunks:
                view = memoryview(chunk)[:left]
                left -= len(view)
                try:
                    while view:
                        view = view[os.write(wr, view):]
                except BrokenPipeError:
                    left = 0  # ONNX Runtime stopped reading (its own error is reported); keep verifying
        except BaseException as exc:  # noqa: BLE001 - carried to the caller's thread and raised there
            failure.append(exc)
        finally:
            os.close(wr)  # end of file for ONNX Runtime, only once every chunk has been verified

    feeder = threading.Thread(target=feed, name="edgeshield-bundle-stream", daemon=True)
    feeder.start()
    session = None
    load_error: Exception | None = None
    try:
        session = ort.InferenceSession(f"{FD_DIR}/{rd}", options or ort.SessionOptions(),
                                       providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped exceptions for unloadable models
        load_error = exc
    finally:
        os.close(rd)  # a feeder blocked on a full pipe now gets EPIPE instead of waiting forever
        feeder.join()
    if failure:
        del session
        raise failure[0]
    if session is None:
        raise _unloadable(load_error)
    return session


def from_image(
    graph: bytes,
    weights: np.ndarray[tuple[int], np.dtype[np.uint8]],
    image: _format.Image,
    options: onnxruntime.SessionOptions | None,
    providers: Sequence[str] | None,
) -> onnxruntime.InferenceSession:
    """Session from graph bytes plus the weights handed over as an in-memory external-data file (a uint8 array).

    ``options`` (the caller's ``session_options``) is used up: the weights are registered on it.
    """
    from edgeshield.bundles._ort import onnxruntime as ort

    opts = options or ort.SessionOptions()
    if image.weights_size:
        opts.add_external_initializers_from_files_in_memory([image.weights_location], [weights], [image.weights_size])
    try:
        return ort.InferenceSession(graph, opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped exceptions for unloadable models
        raise _unloadable(exc) from None


def _unloadable(exc: BaseException | None) -> UnsupportedModelError:
    text = str(exc).strip() if exc is not None else ""
    first = text.splitlines()[0] if text else type(exc).__name__
    return UnsupportedModelError(f"ONNX Runtime cannot load the bundled model: {first}")


def _set_pipe_size(fd: int) -> None:
    import fcntl

    setter = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setter is not None:
        with contextlib.suppress(OSError):  # a lower pipe-max-size: the default size works, with more wake-ups
            fcntl.fcntl(fd, setter, PIPE_SIZE)


def _pin_mmap_threshold() -> None:
    if _pinned or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _pinned.append(True)
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has a no-op mallopt): nothing to pin
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # -3 = M_MMAP_THRESHOLD
