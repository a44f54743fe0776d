"""Data subjects: pseudonyms under per-subject keys, erasure by crypto-shredding (through the real server's
pipeline), retention purges; the audit log keeps verifying."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from edgeshield import audit, transport
from edgeshield.compliance import NotASubjectKeyStoreError, SubjectKeys, erase_subject, purge
from edgeshield.errors import InvalidArgumentError, PathNotFoundError
from edgeshield.models import load_digits_split
from edgeshield.server import running
from edgeshield.watermark import EvidenceStore

from _deploy import Built


def test_pseudonyms_are_per_subject_stable_and_not_stored_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "subjects.db"
    with SubjectKeys(path) as keys:
        a, b = keys.pseudonym("patient-17"), keys.pseudonym("patient-18")
        assert a != b and len(a) == 32 and int(a, 16) >= 0
        assert keys.pseudonym("patient-17") == a and keys.existing_pseudonym("patient-17") == a
        assert keys.existing_pseudonym("nobody") is None and len(keys) == 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"patient-17" not in path.read_bytes()
    with sqlite3.connect(path) as conn:
        assert all("patient" not in str(row) for row in conn.execute("SELECT * FROM subject_keys"))
    with SubjectKeys(path, create=False) as keys:  # reopened: the same keys
        assert keys.pseudonym("patient-17") == a


def test_subject_ids_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with SubjectKeys(tmp_path / "s.db") as keys:
        for bad in ("", " x", "a\nb", "x" * 257):
            with pytest.raises(InvalidArgumentError):
                keys.pseudonym(bad)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(NotASubjectKeyStoreError):
        SubjectKeys(other)
    with pytest.raises(PathNotFoundError):
        SubjectKeys(tmp_path / "missing.db", create=False)


def _predict(b: Built, port: int, subject: str | None, n: int = 16) -> None:
    import httpx

    alice = b.certs["alice"]
    ctx = transport.client_context(b.root / "ca" / "ca.crt", alice.cert_path, alice.key_path)
    headers = {"x-subject-id": subject} if subject else {}
    x = load_digits_split().x_test[:n] if subject != "patient-2" else load_digits_split().x_test[n:2 * n]
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10) as c:
        r = c.post("/v1/predict", json={"inputs": x.tolist()}, headers=headers)
        assert r.status_code == 200, r.text


def _rows_by_subject(b: Built) -> dict[str | None, int]:
    with sqlite3.connect(b.root / "evidence.db") as conn:
        return dict(conn.execute("SELECT subject, count(*) FROM evidence GROUP BY subject").fetchall())


def test_erase_removes_the_subjects_rows_and_key_and_the_log_still_verifies(built: Built) -> None:
    with running(built.serve) as (_srv, _w, port):
        _predict(built, port, "patient-1")
        _predict(built, port, "patient-2")
    with SubjectKeys(built.root / "subjects.db") as keys:
        before = keys.pseudonym("patient-1")
    log = audit.AuditLog(built.root / "audit.db", readonly=True)
    served = [e for e in log.entries() if e.kind in ("inference.predict", "watermark.served")]
    assert {e.data.get("subject") for e in served} >= {before}  # the pipeline logged pseudonyms only
    assert all("patient" not in json.dumps(e.data) for e in log.entries())
    rows = _rows_by_subject(built)
    assert rows.get("patient-1", 0) > 0 and rows.get("patient-2", 0) > 0  # rate 0.5: rows for both

    done = erase_subject(built.deployment(), "patient-1")
    assert done.key_destroyed and done.stores["served_evidence"] == rows["patient-1"]
    after = _rows_by_subject(built)
    assert "patient-1" not in after and after["patient-2"] == rows["patient-2"]
    with SubjectKeys(built.root / "subjects.db") as keys:
        assert keys.existing_pseudonym("patient-1") is None
        assert keys.pseudonym("patient-1") != before  # a new key: the old pseudonym never links again
    report = audit.AuditLog(built.root / "audit.db", readonly=True).verify(
        public_key=audit.load_verify_key(built.root / "audit.pub"), require_checkpoint=True)
    assert report.entries > 0
    entry = audit.AuditLog(built.root / "audit.db", readonly=True).tail(2)[0]
    assert entry.kind == "subject.erased" and entry.seq == done.audit_seq
    assert entry.data == {"subject_ref": done.erasure_id, "records": rows["patient-1"],
                          "stores": {"served_evidence": rows["patient-1"], "subject_keys": 1}}
    text = json.dumps(entry.to_dict())
    assert "patient-1" not in text and before not in text
    # crypto-shredding: the erased rows and the key are gone from the files, not just unlinked
    data = (built.root / "evidence.db").read_bytes() + (built.root / "subjects.db").read_bytes()
    assert b"patient-1" not in data


def test_erasing_an_unknown_subject_is_audited_with_zero_records(built: Built) -> None:
    done = erase_subject(built.deployment(), "never-seen")
    assert not done.key_destroyed and done.records == 0 and done.audit_seq is not None


def test_purge_deletes_only_records_older_than_the_policy(built: Built) -> None:
    x = np.random.default_rng(0).random((6, 64), dtype=np.float32)
    with EvidenceStore(built.root / "evidence.db") as store:
        store.add("alice", x[:4], np.zeros(4, dtype=np.int64), subject="s1")
        store.add("bob", x[4:], np.zeros(2, dtype=np.int64))
    with sqlite3.connect(built.root / "evidence.db") as conn:
        conn.execute("UPDATE evidence SET time = '2020-01-01T00:00:00.000+00:00' WHERE client = 'alice'")
    done = purge(built.deployment())
    assert done.stores == {"served_evidence": 4}
    with EvidenceStore(built.root / "evidence.db") as store:
        assert store.count() == 2
    entry = audit.AuditLog(built.root / "audit.db", readonly=True).tail(2)[0]
    assert entry.kind == "retention.purged" and entry.data["records"] == 4
    with pytest.raises(InvalidArgumentError, match="retention"):
        purge(built.deployment(**{"retention-days": None}))
