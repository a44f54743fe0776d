"""The device's TUF client: refresh the trusted metadata, read the update index, download the parts it names.

Follows python-tuf's ``ngclient.Updater`` step by step (refresh: root, timestamp, snapshot, targets; then
target info; then download and verify length and hash), and turns each of its failures into one of ours, so
a rollback, a freeze, mixed-up metadata, endless data or a truncated download is a typed refusal. Needs ``tuf``.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from edgeshield.errors import InvalidArgumentError, MissingDependencyError
from edgeshield.updates._errors import (
    EndlessDataError,
    MetadataExpiredError,
    MetadataMismatchError,
    MetadataRollbackError,
    MetadataSignatureError,
    TruncatedDownloadError,
    UpdateDownloadError,
    UpdateRefusedError,
)
from edgeshield.updates._index import PARTS, UpdateIndex, check_custom, index_path

if TYPE_CHECKING:
    from tuf.ngclient.fetcher import FetcherInterface

    from edgeshield.updates._tuf import TargetFile, Updater

_FILE_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fetched:
    """An update TUF verified: its index and the downloaded part files (each matching its signed hash)."""

    index: UpdateIndex
    files: dict[str, Path]


def _fetcher(timeout_s: float, deadline_s: float) -> tuple[FetcherInterface, Callable[[], None]]:
    from tuf.api import exceptions
    from tuf.ngclient.fetcher import FetcherInterface

    class DeadlineFetcher(FetcherInterface):
        """httpx (``timeout_s`` to connect and between reads) plus a whole-file deadline checked as bytes arrive, so
        a server that drips bytes cannot hold the device; ``file://`` URLs read a repository on local media."""

        def __init__(self) -> None:
            self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                                        headers={"Accept-Encoding": "identity", "User-Agent": "edgeshield-updater"})

        def close(self) -> None:
            self._client.close()

        def _fetch(self, url: str) -> Iterator[bytes]:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme == "file":
                path = Path(urllib.parse.unquote(parsed.path))
                if not path.is_file():
                    raise exceptions.DownloadHTTPError(f"not found: {path}", 404)
                return self._file(path)
            if parsed.scheme not in ("http", "https"):
                raise exceptions.DownloadError(f"unsupported URL scheme {parsed.scheme!r}")
            deadline = time.monotonic() + deadline_s
            try:
                response = self._client.send(self._client.build_request("GET", url), stream=True)
            except httpx.TimeoutException as exc:
                raise exceptions.SlowRetrievalError(f"no answer within {timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise exceptions.DownloadError(f"{type(exc).__name__}: {exc}") from exc
            if response.status_code >= 400:
                response.close()
                raise exceptions.DownloadHTTPError(f"HTTP {response.status_code}", response.status_code)
            return self._body(response, deadline)

        @staticmethod
        def _body(response: httpx.Response, deadline: float) -> Iterator[bytes]:
            try:
                for chunk in response.iter_raw():
                    if time.monotonic() > deadline:
                        raise exceptions.SlowRetrievalError(f"download took longer than {deadline_s:g} s")
                    yield chunk
            except httpx.RemoteProtocolError as exc:  # the body ended before its Content-Length
                raise TruncatedDownloadError(f"the download was cut short: {exc}") from None
            except httpx.TimeoutException as exc:
                raise exceptions.SlowRetrievalError(f"no data for {timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise exceptions.DownloadError(f"download failed: {type(exc).__name__}: {exc}") from None
            finally:
                response.close()

        @staticmethod
        def _file(path: Path) -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(_FILE_CHUNK):
                    yield chunk

    fetcher = DeadlineFetcher()
    return fetcher, fetcher.close


@contextlib.contextmanager
def _refusals(what: str) -> Iterator[None]:
    """python-tuf's exceptions, as EdgeShield's typed refusals (exit 3) or download failures (exit 1)."""
    from tuf.api import exceptions as tex

    try:
        yield
    except UpdateRefusedError:
        raise
    except tex.UnsignedMetadataError as exc:
        raise MetadataSignatureError(f"{what}: metadata is not signed by the trusted keys: {exc}") from None
    except tex.ExpiredMetadataError as exc:
        raise MetadataExpiredError(f"{what}: {exc} (a freeze attack, or a repository whose timestamp nobody "
                                   "re-signed)") from None
    except tex.BadVersionNumberError as exc:
        raise MetadataRollbackError(f"{what}: {exc} (metadata older than what this device trusts)") from None
    except tex.LengthOrHashMismatchError as exc:
        raise MetadataMismatchError(f"{what}: {exc}") from None
    except tex.DownloadLengthMismatchError as exc:
        raise EndlessDataError(f"{what}: {exc}") from None
    except tex.RepositoryError as exc:
        raise UpdateRefusedError(f"{what}: the repository's metadata is invalid: {exc}") from None
    except tex.SlowRetrievalError as exc:
        raise UpdateDownloadError(f"{what}: the repository is too slow: {exc}") from None
    except tex.DownloadHTTPError as exc:
        raise UpdateDownloadError(f"{what}: HTTP {exc.status_code} from the repository") from None
    except tex.DownloadError as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        raise UpdateDownloadError(f"{what}: download failed: {detail}") from None


def fetch_update(
    metadata_dir: Path,
    download_dir: Path,
    url: str,
    model: str,
    bootstrap_root: bytes,
    *,
    timeout_s: float = 30.0,
    deadline_s: float = 600.0,
    max_bundle_bytes: int | None = None,
) -> Fetched:
    """Refresh TUF metadata from ``url`` (``URL/metadata/``, ``URL/targets/``) and download ``model``'s update.

    ``bootstrap_root`` is the root the device was provisioned with; newer roots are followed as TUF rotates keys.
    Every file is checked against the length and hash its signed metadata pins before it is used.
    """
    try:
        from edgeshield.updates._tuf import Updater
    except ImportError:
        raise MissingDependencyError("pulling updates needs python-tuf: pip install 'edgeshield[update]'") from None
    if not timeout_s > 0 or not deadline_s > 0:
        raise InvalidArgumentError("timeouts must be positive")
    base = url.rstrip("/")
    metadata_dir.mkdir(parents=True, exist_ok=True)
    download_dir.mkdir(parents=True, exist_ok=True)
    fetcher, close = _fetcher(timeout_s, deadline_s)
    try:
        with _refusals("repository refresh"):
            updater = Updater(str(metadata_dir), f"{base}/metadata/", str(download_dir), f"{base}/targets/",
                              fetcher=fetcher, bootstrap=bootstrap_root)
            updater.refresh()
        index_info = _target_info(updater, index_path(model))
        with _refusals("update index"):
            index_file = updater.download_target(index_info, str(download_dir / "update.json"))
        index = UpdateIndex.decode(Path(index_file).read_bytes())
        if index.model != model:
            from edgeshield.updates._errors import UpdateMismatchError

            raise UpdateMismatchError(f"the update index for {model} describes {index.model}")
        files: dict[str, Path] = {}
        for part in PARTS:
            path = index.targets.get(part)
            if path is None:
                continue
            info = _target_info(updater, path)
            check_custom(info.custom, index, part)
            if part == "bundle" and max_bundle_bytes is not None and info.length > max_bundle_bytes:
                raise EndlessDataError(f"the bundle is {info.length} bytes, above this device's limit of "
                                       f"{max_bundle_bytes}")
            with _refusals(f"{part} download"):
                files[part] = Path(updater.download_target(info, str(download_dir / os.path.basename(path))))
        return Fetched(index, files)
    finally:
        close()


def _target_info(updater: Updater, path: str) -> TargetFile:
    with _refusals(f"target {path}"):
        info = updater.get_targetinfo(path)
    if info is None:
        from edgeshield.updates._errors import NothingToDoError

        raise NothingToDoError(f"the repository offers no {path}")
    return info
