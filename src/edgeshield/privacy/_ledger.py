"""A privacy ledger that fails closed: per client and per round, what was spent and the accountant's running epsilon.

The server keeps one under central DP (sampling, dropouts and re-joins make each client's epsilon its own); a client
keeps its own for local DP, with the same class, so that a client over its budget refuses to send. ``check`` is the
question asked *before* a release; ``spend`` asks it again inside one ``BEGIN IMMEDIATE`` transaction and records the
round only if the answer is still yes, so two processes racing for the last of a budget cannot both get it. Epsilon
is recomputed from the client's whole history (every round it took part in, with its own noise and sampling rate)
by the ledger's accountant under its sampling scheme ("poisson" or "fixed", see ``_accounting``); the budget,
delta, accountant and sampling scheme are fixed when the ledger is created (a ledger created before sampling schemes
existed has none stored, and is "poisson").
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from edgeshield._sqlite import PrivateStore
from edgeshield.errors import InvalidArgumentError
from edgeshield.privacy._accounting import check_delta, check_round, check_scheme, check_steps, history_epsilon
from edgeshield.privacy._errors import BudgetExceededError, LedgerMismatchError, NotAPrivacyLedgerError, PrivacyError

if TYPE_CHECKING:
    from edgeshield.monitor import SecurityEvent

_APPLICATION_ID = 0x45535056  # "ESPV"
_SCHEMA_VERSION = 1
_MAX_CLIENT = 128  # the audit log's actor limit: a client id is the actor of its spends

_SCHEMA = (
    f"PRAGMA application_id = {_APPLICATION_ID}",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ("CREATE TABLE spends (id INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT NOT NULL, round INTEGER NOT NULL,"
     " noise_multiplier REAL NOT NULL, sampling_rate REAL NOT NULL, epsilon REAL NOT NULL, ts REAL NOT NULL,"
     " UNIQUE (client, round))"),
    "CREATE TABLE exhausted (client TEXT PRIMARY KEY, epsilon REAL NOT NULL, ts REAL NOT NULL)",
)


class AuditSink(Protocol):
    """What the ledger needs of an audit log (``edgeshield.audit.AuditLog`` is one)."""

    def append(self, kind: str, actor: str, data: dict[str, Any] | None = None) -> object: ...


def _check_client(client: object) -> str:
    if (not isinstance(client, str) or not client or len(client) > _MAX_CLIENT or not client.isprintable()
            or client.strip() != client):
        raise InvalidArgumentError(f"invalid client id {client!r}: use 1-{_MAX_CLIENT} printable characters without "
                                   "surrounding spaces")
    return client


def _check_round_number(rnd: object) -> int:
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise InvalidArgumentError(f"round must be a whole number >= 0, got {rnd!r}")
    return rnd


class PrivacyLedger(PrivateStore):
    """Per-client (epsilon, delta) budgets over SQLite; every spend audited as ``privacy.spend`` when ``audit`` is
    given, and ``privacy.budget_exhausted`` emitted (once per client) when a client can afford no further round."""

    _what = "privacy ledger"
    _application_id = _APPLICATION_ID
    _schema = _SCHEMA
    _tables = frozenset({"meta", "spends", "exhausted"})
    _not_a_store = NotAPrivacyLedgerError

    def __init__(self, path: str | os.PathLike[str], *, epsilon_budget: float, delta: float,
                 audit: AuditSink | None = None, emit: Callable[[SecurityEvent], None] | None = None,
                 accountant: str = "rdp", sampling: str = "poisson") -> None:
        if isinstance(epsilon_budget, bool) or not isinstance(epsilon_budget, (int, float)) \
                or not math.isfinite(epsilon_budget) or epsilon_budget <= 0:
            raise InvalidArgumentError(f"epsilon_budget must be finite and > 0, got {epsilon_budget!r}")
        self.epsilon_budget = float(epsilon_budget)
        self.delta = check_delta(delta)
        self.accountant, self.sampling = check_scheme(accountant, sampling)
        self._audit = audit
        self._emit = emit
        super().__init__(path)

    # --- store hooks ---
    def _created(self, conn: sqlite3.Connection) -> None:
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(self._meta().items()))

    def _opened(self, conn: sqlite3.Connection, create: bool) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] > _SCHEMA_VERSION:
            raise NotAPrivacyLedgerError(f"{self.path} is a newer privacy ledger than this build reads")
        conn.execute("PRAGMA synchronous=FULL")
        stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        stored.setdefault("sampling", "poisson")  # created before sampling schemes: Poisson was the only one
        if stored != self._meta():
            raise LedgerMismatchError(
                f"{self.path} was created with epsilon budget {stored.get('epsilon_budget')}, delta "
                f"{stored.get('delta')}, the {stored.get('accountant')} accountant and {stored.get('sampling')} "
                f"sampling; it cannot be reopened with {self._meta()['epsilon_budget']}, {self._meta()['delta']}, "
                f"{self.accountant}, {self.sampling} (start a new ledger)")

    def _meta(self) -> dict[str, str]:
        return {"epsilon_budget": repr(self.epsilon_budget), "delta": repr(self.delta), "accountant": self.accountant,
                "sampling": self.sampling}

    # --- the questions ---
    def _history(self, conn: sqlite3.Connection, client: str) -> list[tuple[float, float, int]]:
        rows = conn.execute("SELECT noise_multiplier, sampling_rate, COUNT(*) FROM spends WHERE client = ?"
                            " GROUP BY noise_multiplier, sampling_rate", (client,)).fetchall()
        return [(float(z), float(q), int(n)) for z, q, n in rows]

    def _projected(self, history: list[tuple[float, float, int]], z: float, q: float, steps: int) -> float:
        return history_epsilon([*history, (z, q, steps)], self.delta, self.accountant, sampling=self.sampling)

    def check(self, client: str, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> float:
        """The client's epsilon after ``steps`` more rounds at (``noise_multiplier``, ``sampling_rate``: ``m/N`` in
        a "fixed" ledger); raises :class:`BudgetExceededError` when that is over the budget. Records nothing but the
        exhaustion."""
        name = _check_client(client)
        z, q = check_round(noise_multiplier, sampling_rate, self.sampling)
        n = check_steps(steps)
        with self._lock:
            history = self._history(self._open_conn(), name)
        projected = self._projected(history, z, q, n)
        if projected > self.epsilon_budget:
            self._refuse(name, projected)
        return projected

    def spend(self, client: str, round: int, noise_multiplier: float, sampling_rate: float) -> float:  # noqa: A002
        """Charge one round to ``client`` and return its running epsilon; refuses (:class:`BudgetExceededError`,
        nothing recorded) when the round would take it over the budget, and refuses a second spend for the same
        round (:class:`PrivacyError`). Call it before the release it pays for."""
        name = _check_client(client)
        rnd = _check_round_number(round)
        z, q = check_round(noise_multiplier, sampling_rate, self.sampling)
        now = time.time()
        refused: float | None = None
        exhausted = False
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM spends WHERE client = ? AND round = ?", (name, rnd)).fetchone():
                raise PrivacyError(f"client {name!r} has already spent privacy budget in round {rnd}")
            history = self._history(conn, name)
            epsilon = self._projected(history, z, q, 1)
            if epsilon > self.epsilon_budget:
                refused = epsilon
                exhausted = self._mark_exhausted(conn, name, epsilon, now)
            else:
                conn.execute("INSERT INTO spends (client, round, noise_multiplier, sampling_rate, epsilon, ts)"
                             " VALUES (?, ?, ?, ?, ?, ?)", (name, rnd, z, q, epsilon, now))
                if self._audit is not None:  # in the transaction: a spend the audit log refuses is not recorded
                    self._audit.append("privacy.spend", name, {
                        "client": name, "round": rnd, "noise_multiplier": z, "sampling_rate": q,
                        "sampling": self.sampling, "epsilon": epsilon, "delta": self.delta,
                        "budget": self.epsilon_budget})
                if self._projected(history, z, q, 2) > self.epsilon_budget:  # the next such round is unaffordable
                    exhausted = self._mark_exhausted(conn, name, epsilon, now)
        if exhausted:
            self._announce(name, epsilon if refused is None else refused)
        if refused is not None:
            raise BudgetExceededError(name, refused, self.epsilon_budget, self.delta)
        return epsilon

    def _refuse(self, name: str, projected: float) -> None:
        with self._tx() as conn:
            first = self._mark_exhausted(conn, name, projected, time.time())
        if first:
            self._announce(name, projected)
        raise BudgetExceededError(name, projected, self.epsilon_budget, self.delta)

    def _mark_exhausted(self, conn: sqlite3.Connection, name: str, epsilon: float, now: float) -> bool:
        cur = conn.execute("INSERT OR IGNORE INTO exhausted (client, epsilon, ts) VALUES (?, ?, ?)",
                           (name, epsilon, now))
        return cur.rowcount > 0

    def _announce(self, name: str, epsilon: float) -> None:
        if self._emit is None:
            return
        from edgeshield.monitor import SecurityEvent

        self._emit(SecurityEvent("privacy.budget_exhausted", name,
                                 {"client": name, "epsilon": epsilon, "delta": self.delta}, source="fl"))

    # --- reading ---
    def epsilon(self, client: str) -> float:
        """The client's running epsilon (0 before its first spend)."""
        rows = self._read("SELECT MAX(epsilon) FROM spends WHERE client = ?", (_check_client(client),))
        return float(rows[0][0]) if rows and rows[0][0] is not None else 0.0

    def clients(self) -> list[str]:
        return [str(r[0]) for r in self._read("SELECT DISTINCT client FROM spends ORDER BY client")]

    def history(self, client: str) -> list[dict[str, Any]]:
        """The client's spends, oldest first: round, noise multiplier, sampling rate, running epsilon, time."""
        rows = self._read("SELECT round, noise_multiplier, sampling_rate, epsilon, ts FROM spends WHERE client = ?"
                          " ORDER BY id", (_check_client(client),))
        keys = ("round", "noise_multiplier", "sampling_rate", "epsilon", "ts")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def report(self) -> list[dict[str, Any]]:
        """One row per client: rounds spent, last round, running epsilon, what is left, whether it is exhausted."""
        rows = self._read("SELECT s.client, COUNT(*), MAX(s.round), MAX(s.epsilon), e.client IS NOT NULL"
                          " FROM spends AS s LEFT JOIN exhausted AS e ON e.client = s.client"
                          " GROUP BY s.client ORDER BY s.client")
        return [{"client": c, "rounds": int(n), "last_round": int(last), "epsilon": float(eps),
                 "epsilon_budget": self.epsilon_budget, "remaining": max(0.0, self.epsilon_budget - float(eps)),
                 "delta": self.delta, "accountant": self.accountant, "sampling": self.sampling, "exhausted": bool(ex)}
                for c, n, last, eps, ex in rows]
