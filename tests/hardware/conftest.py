"""Software-TPM fixtures for the hardware tests: real ``swtpm`` processes on free loopback ports, never a fake TPM.

Every test is checked to leave no swtpm running that it started (a module- or session-scoped TPM may outlive a
test; it is checked when its module ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeshield.hardware._swtpm import SoftwareTPM, live_instances, live_processes

TPMFactory = Callable[..., SoftwareTPM]


def _check_and_kill(leftover: list[SoftwareTPM], what: str) -> None:
    for tpm in leftover:
        tpm.close()
    assert not leftover, f"{what} left {len(leftover)} software TPM(s) running"


@pytest.fixture(autouse=True)
def _no_swtpm_left_by_test() -> Iterator[None]:
    """Fail a test that leaves a software TPM running (the TPMs of wider-scoped fixtures do not count)."""
    before = set(live_instances())
    yield
    _check_and_kill([t for t in live_instances() if t not in before], "the test")


@pytest.fixture(autouse=True, scope="module")
def _no_swtpm_left_by_module() -> Iterator[None]:
    """After a module's fixtures are torn down, no swtpm process started here may be running."""
    yield
    _check_and_kill(live_instances(), "the module")
    assert live_processes() == [], "swtpm processes outlived their SoftwareTPM"


@pytest.fixture
def swtpm() -> Iterator[SoftwareTPM]:
    """A fresh, running software TPM for one test (new seeds: a different TPM from every other)."""
    with SoftwareTPM() as tpm:
        yield tpm


@pytest.fixture
def swtpm_factory() -> Iterator[TPMFactory]:
    """Make more software TPMs in a test (``factory(state_dir=None, with_ek_cert=False, ca_dir=None)``), started;
    all are closed after the test."""
    made: list[SoftwareTPM] = []

    def make(state_dir: Path | None = None, *, with_ek_cert: bool = False, ca_dir: Path | None = None) -> SoftwareTPM:
        tpm = SoftwareTPM(state_dir, with_ek_cert=with_ek_cert, ca_dir=ca_dir)
        made.append(tpm)
        tpm.start()
        return tpm

    yield make
    for tpm in made:
        tpm.close()


@pytest.fixture(scope="module")
def swtpm_module() -> Iterator[SoftwareTPM]:
    """One software TPM shared by a module's tests (cheaper; tests must not depend on its PCRs' history)."""
    with SoftwareTPM() as tpm:
        yield tpm


@pytest.fixture(scope="module")
def swtpm_ek() -> Iterator[SoftwareTPM]:
    """A module-scoped software TPM manufactured with EK and platform certificates from its own local CA
    (``swtpm_ek.ek_ca_certs()`` to enrol; takes about a second to make)."""
    with SoftwareTPM(with_ek_cert=True) as tpm:
        yield tpm
