"""The privacy ledger on real SQLite: refusal before release, atomic spends across threads and processes, restarts,
kill -9, audit entries and the budget-exhausted event."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeshield import audit
from edgeshield.errors import InvalidArgumentError
from edgeshield.monitor import SecurityEvent
from edgeshield.privacy import (
    BudgetExceededError,
    LedgerMismatchError,
    NotAPrivacyLedgerError,
    PrivacyError,
    PrivacyLedger,
)
from edgeshield.privacy._accounting import history_epsilon

DELTA = 1e-5
Z, Q = 1.0, 0.1


def _eps(rounds: int, z: float = Z, q: float = Q) -> float:
    return history_epsilon([(z, q, rounds)], DELTA, "rdp")


def _budget_for(rounds: int) -> float:
    """A budget that affords exactly ``rounds`` rounds at (Z, Q)."""
    return (_eps(rounds) + _eps(rounds + 1)) / 2


def test_spend_check_and_history(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.db", epsilon_budget=10.0, delta=DELTA) as ledger:
        assert ledger.epsilon("a") == 0.0 and ledger.clients() == []
        assert ledger.check("a", Z, Q, steps=3) == pytest.approx(_eps(3))
        assert ledger.epsilon("a") == 0.0  # check records nothing
        for r in range(3):
            ledger.spend("a", r, Z, Q)
        ledger.spend("b", 1, 2.0, 0.5)  # re-joins, dropouts: each client's history is its own
        assert ledger.epsilon("a") == pytest.approx(_eps(3))
        assert ledger.epsilon("b") == pytest.approx(_eps(1, 2.0, 0.5))
        assert ledger.clients() == ["a", "b"]
        assert [h["round"] for h in ledger.history("a")] == [0, 1, 2]
        assert ledger.history("a")[-1]["epsilon"] == pytest.approx(_eps(3))
        rows = {r["client"]: r for r in ledger.report()}
        assert rows["a"]["rounds"] == 3 and rows["a"]["last_round"] == 2 and not rows["a"]["exhausted"]
        assert rows["a"]["remaining"] == pytest.approx(10.0 - _eps(3))
    assert (tmp_path / "l.db").stat().st_mode & 0o777 == 0o600


def test_heterogeneous_history_composes(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.db", epsilon_budget=50.0, delta=DELTA) as ledger:
        ledger.spend("c", 0, 1.0, 0.1)
        ledger.spend("c", 3, 0.8, 0.2)
        ledger.spend("c", 7, 1.0, 0.1)
        expected = history_epsilon([(1.0, 0.1, 2), (0.8, 0.2, 1)], DELTA, "rdp")
        assert ledger.epsilon("c") == pytest.approx(expected)


def test_refused_before_release_and_exhaustion_announced_once(tmp_path: Path) -> None:
    events: list[SecurityEvent] = []
    log = audit.AuditLog(tmp_path / "audit.db")
    ledger = PrivacyLedger(tmp_path / "l.db", epsilon_budget=_budget_for(3), delta=DELTA, audit=log,
                           emit=events.append)
    for r in range(2):
        ledger.spend("dev-1", r, Z, Q)
    assert events == []
    ledger.spend("dev-1", 2, Z, Q)  # the last affordable round: the next one would be over
    assert [e.kind for e in events] == ["privacy.budget_exhausted"]
    assert events[0].actor == "dev-1" and events[0].data["epsilon"] == pytest.approx(_eps(3))
    with pytest.raises(BudgetExceededError) as info:
        ledger.check("dev-1", Z, Q)  # the client asks before it releases: refused
    assert info.value.client == "dev-1" and info.value.epsilon == pytest.approx(_eps(4))
    with pytest.raises(BudgetExceededError):
        ledger.spend("dev-1", 3, Z, Q)
    assert len(ledger.history("dev-1")) == 3  # the refused round was not recorded
    assert len(events) == 1  # announced once
    assert ledger.check("dev-1", 50.0, Q) < ledger.epsilon_budget  # a much quieter round still fits
    spends = [e for e in log.entries() if e.kind == "privacy.spend"]
    assert [e.data["round"] for e in spends] == [0, 1, 2]
    assert spends[-1].actor == "dev-1" and spends[-1].data["epsilon"] == pytest.approx(_eps(3))
    assert spends[-1].data["budget"] == ledger.epsilon_budget and spends[-1].data["delta"] == DELTA
    assert spends[-1].data["sampling"] == "poisson"
    assert {r["client"]: r["exhausted"] for r in ledger.report()} == {"dev-1": True}
    ledger.close()
    log.close()


def test_a_first_round_over_budget_is_refused(tmp_path: Path) -> None:
    events: list[SecurityEvent] = []
    with PrivacyLedger(tmp_path / "l.db", epsilon_budget=0.1, delta=DELTA, emit=events.append) as ledger:
        with pytest.raises(BudgetExceededError, match="nothing was released"):
            ledger.spend("x", 0, Z, 1.0)
        assert ledger.epsilon("x") == 0.0
        assert [e.kind for e in events] == ["privacy.budget_exhausted"]


def test_duplicate_round_and_bad_arguments_refused(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.db", epsilon_budget=10.0, delta=DELTA) as ledger:
        ledger.spend("a", 4, Z, Q)
        with pytest.raises(PrivacyError, match="already spent"):
            ledger.spend("a", 4, Z, Q)
        for client in ("", " a", "a\n", "x" * 129, 7):
            with pytest.raises(InvalidArgumentError):
                ledger.spend(client, 5, Z, Q)  # type: ignore[arg-type]
        for args in ((-1, Z, Q), (True, Z, Q), (5, 0.0, Q), (5, Z, 0.0), (5, Z, 1.5), (5, float("nan"), Q)):
            with pytest.raises(InvalidArgumentError):
                ledger.spend("a", *args)  # type: ignore[arg-type]
        assert len(ledger.history("a")) == 1
    for kwargs in ({"epsilon_budget": 0.0, "delta": DELTA}, {"epsilon_budget": 1.0, "delta": 0.0},
                   {"epsilon_budget": 1.0, "delta": DELTA, "accountant": "gdp"}):
        with pytest.raises(InvalidArgumentError):
            PrivacyLedger(tmp_path / "other.db", **kwargs)  # type: ignore[arg-type]


def test_survives_restart_and_refuses_another_budget(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA) as ledger:
        ledger.spend("a", 0, Z, Q)
        ledger.spend("a", 1, Z, Q)
    with PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA) as ledger:
        assert ledger.epsilon("a") == pytest.approx(_eps(2))
        ledger.spend("a", 2, Z, Q)
        assert ledger.epsilon("a") == pytest.approx(_eps(3))
    for kwargs in ({"epsilon_budget": 50.0, "delta": DELTA}, {"epsilon_budget": 5.0, "delta": 1e-3},
                   {"epsilon_budget": 5.0, "delta": DELTA, "accountant": "pld"}):
        with pytest.raises(LedgerMismatchError):
            PrivacyLedger(path, **kwargs)  # type: ignore[arg-type]


def test_not_a_ledger(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(NotAPrivacyLedgerError):
        PrivacyLedger(junk, epsilon_budget=1.0, delta=DELTA)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(NotAPrivacyLedgerError):
        PrivacyLedger(foreign, epsilon_budget=1.0, delta=DELTA)


def test_threads_racing_for_the_last_of_a_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.db", epsilon_budget=_budget_for(4), delta=DELTA)
    outcomes: list[str] = []

    def worker(r: int) -> None:
        try:
            ledger.spend("shared", r, Z, Q)
            outcomes.append("ok")
        except BudgetExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] * 4 + ["refused"] * 6
    assert len(ledger.history("shared")) == 4 and ledger.epsilon("shared") <= ledger.epsilon_budget
    ledger.close()


SPENDER = """
import sys
from edgeshield.privacy import BudgetExceededError, PrivacyLedger
path, budget, first, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ledger = PrivacyLedger(path, epsilon_budget=budget, delta=1e-5)
ok = 0
for r in range(first, first + count):
    try:
        ledger.spend("shared", r, 1.0, 0.1)
        ok += 1
    except BudgetExceededError:
        pass
    sys.stdout.write(f"{r}\\n")
    sys.stdout.flush()
print("ok", ok)
"""


def _spender(*args: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    return subprocess.Popen([sys.executable, "-c", SPENDER, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env=env)


def test_processes_racing_for_the_last_of_a_budget(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    budget = _budget_for(6)
    PrivacyLedger(path, epsilon_budget=budget, delta=DELTA).close()
    procs = [_spender(path, budget, 100 * i, 5) for i in range(3)]  # 15 attempts for 6 rounds
    oks = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        oks.append(int(out.strip().splitlines()[-1].split()[1]))
    assert sum(oks) == 6
    with PrivacyLedger(path, epsilon_budget=budget, delta=DELTA) as ledger:
        assert len(ledger.history("shared")) == 6
        assert ledger.epsilon("shared") == pytest.approx(_eps(6)) and ledger.epsilon("shared") <= budget


def test_kill_9_mid_spending_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    proc = _spender(path, 1000.0, 0, 100_000)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = 0
    while seen < 20 and time.monotonic() < deadline:
        if proc.stdout.readline():
            seen += 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert seen >= 20
    with PrivacyLedger(path, epsilon_budget=1000.0, delta=DELTA) as ledger:
        history = ledger.history("shared")
        assert len(history) >= 20  # every spend acknowledged before the kill is there
        rounds = [h["round"] for h in history]
        assert rounds == list(range(len(rounds)))
        for i, h in enumerate(history):  # each row's running epsilon is the accountant's over the rows before it
            assert h["epsilon"] == pytest.approx(_eps(i + 1))
        ledger.spend("shared", len(rounds), Z, Q)  # and it goes on


# --- a ledger under sampling="fixed" (m of N without replacement, replace-one; RDP only) ---
ZF, QF = 2.0, 10 / 100


def _fixed_eps(rounds: int) -> float:
    return history_epsilon([(ZF, QF, rounds)], DELTA, "rdp", sampling="fixed")


def test_fixed_ledger_refuses_before_release(tmp_path: Path) -> None:
    events: list[SecurityEvent] = []
    log = audit.AuditLog(tmp_path / "audit.db")
    budget = (_fixed_eps(2) + _fixed_eps(3)) / 2  # two fixed-size rounds fit, a third does not
    assert history_epsilon([(ZF, QF, 4)], DELTA, "rdp") < budget  # where a Poisson ledger would allow four
    with PrivacyLedger(tmp_path / "l.db", epsilon_budget=budget, delta=DELTA, audit=log, emit=events.append,
                       sampling="fixed") as ledger:
        assert ledger.sampling == "fixed"
        assert ledger.check("dev", ZF, QF, steps=2) == pytest.approx(_fixed_eps(2))
        ledger.spend("dev", 0, ZF, QF)
        assert ledger.epsilon("dev") == pytest.approx(_fixed_eps(1)) and events == []
        ledger.spend("dev", 1, ZF, QF)
        assert [e.kind for e in events] == ["privacy.budget_exhausted"]  # the next round is unaffordable
        with pytest.raises(BudgetExceededError) as info:
            ledger.check("dev", ZF, QF)
        assert info.value.epsilon == pytest.approx(_fixed_eps(3))
        with pytest.raises(BudgetExceededError):
            ledger.spend("dev", 2, ZF, QF)
        assert len(ledger.history("dev")) == 2 and len(events) == 1
        with pytest.raises(InvalidArgumentError, match="m/N"):
            ledger.spend("other", 0, ZF, 0.123456789)  # no fixed-size rate
        assert [r["sampling"] for r in ledger.report()] == ["fixed"]
    spends = [e for e in log.entries() if e.kind == "privacy.spend"]
    assert [(e.data["round"], e.data["sampling"]) for e in spends] == [(0, "fixed"), (1, "fixed")]
    assert spends[-1].data["epsilon"] == pytest.approx(_fixed_eps(2))
    log.close()


def test_sampling_is_fixed_at_creation(tmp_path: Path) -> None:
    fixed, poisson = tmp_path / "fixed.db", tmp_path / "poisson.db"
    PrivacyLedger(fixed, epsilon_budget=5.0, delta=DELTA, sampling="fixed").close()
    PrivacyLedger(poisson, epsilon_budget=5.0, delta=DELTA).close()
    with pytest.raises(LedgerMismatchError, match="fixed sampling"):
        PrivacyLedger(fixed, epsilon_budget=5.0, delta=DELTA)
    with pytest.raises(LedgerMismatchError, match="poisson sampling"):
        PrivacyLedger(poisson, epsilon_budget=5.0, delta=DELTA, sampling="fixed")
    PrivacyLedger(fixed, epsilon_budget=5.0, delta=DELTA, sampling="fixed").close()  # the same scheme reopens
    with pytest.raises(InvalidArgumentError, match="no PLD"):
        PrivacyLedger(tmp_path / "x.db", epsilon_budget=5.0, delta=DELTA, accountant="pld", sampling="fixed")
    with pytest.raises(InvalidArgumentError):
        PrivacyLedger(tmp_path / "x.db", epsilon_budget=5.0, delta=DELTA, sampling="uniform")
    assert not (tmp_path / "x.db").exists()


def test_a_ledger_from_before_sampling_schemes_is_poisson(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA) as ledger:
        ledger.spend("a", 0, Z, Q)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM meta WHERE key = 'sampling'")  # what a ledger written before this change holds
    conn.close()
    with PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA) as ledger:
        assert ledger.sampling == "poisson" and ledger.epsilon("a") == pytest.approx(_eps(1))
        ledger.spend("a", 1, Z, Q)
    with pytest.raises(LedgerMismatchError):
        PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA, sampling="fixed")
