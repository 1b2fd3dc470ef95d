"""Durable job state in one SQLite file: each job's plan and progress (so a run killed at any
point resumes where it stopped), and the dead letters (items that failed past their retries,
with the reason, until retried or purged).

SQLite because it survives SIGKILL mid-write (the WAL journal), needs no server, and is
shared safely by the CLI and the server's job runner on one machine.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmembed.contracts import DeadLetter

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, counts TEXT NOT NULL DEFAULT '{}', error TEXT
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL, uri TEXT NOT NULL, position INTEGER NOT NULL, status TEXT NOT NULL,
    PRIMARY KEY (job_id, uri)
);
CREATE INDEX IF NOT EXISTS items_pending ON items (job_id, status, position);
CREATE TABLE IF NOT EXISTS dead_letters (
    job_id TEXT NOT NULL, uri TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL,
    attempts INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (job_id, uri)
);
"""

# Item states: pending (planned, not yet written), done (its point is written), failed (dead letter).
PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass
class JobRow:
    id: str
    source: str
    config: dict[str, Any]
    status: str  # planned | running | done | failed | interrupted
    created: float
    updated: float
    counts: dict[str, Any]
    error: str | None


def job_id(source: str, config: dict[str, Any]) -> str:
    """The same source with the same models and collection is the same job: running it again
    resumes it instead of starting over."""
    return hashlib.sha256(json.dumps([source, config], sort_keys=True).encode()).hexdigest()[:16]


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _many(self, sql: str, rows: list[tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(sql, rows)
            self._db.execute("COMMIT")

    def create(self, job: str, source: str, config: dict[str, Any]) -> JobRow:
        now = time.time()
        self._run(
            "INSERT OR IGNORE INTO jobs (id, source, config, status, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            (job, source, json.dumps(config), "planned", now, now),
        )
        return self.get(job)  # type: ignore[return-value]

    def get(self, job: str) -> JobRow | None:
        rows = self._run(
            "SELECT id, source, config, status, created, updated, counts, error FROM jobs WHERE id = ?", (job,)
        )
        if not rows:
            return None
        r = rows[0]
        return JobRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], json.loads(r[6]), r[7])

    def list(self) -> list[JobRow]:
        return [self.get(r[0]) for r in self._run("SELECT id FROM jobs ORDER BY created DESC")]  # type: ignore[misc]

    def update(
        self, job: str, status: str | None = None, counts: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        current = self.get(job)
        if current is None:
            raise KeyError(job)
        self._run(
            "UPDATE jobs SET status = ?, counts = ?, error = ?, updated = ? WHERE id = ?",
            (
                status or current.status,
                json.dumps(counts if counts is not None else current.counts),
                error,
                time.time(),
                job,
            ),
        )

    def reset_items(self, job: str) -> None:
        """A finished job run again plans afresh (the incremental check decides what to write)."""
        self._run("DELETE FROM items WHERE job_id = ?", (job,))

    def plan(self, job: str, uris: list[str]) -> None:
        """Record the items a run must write; items already planned keep their state."""
        self._many(
            "INSERT OR IGNORE INTO items (job_id, uri, position, status) VALUES (?, ?, ?, ?)",
            [(job, u, n, PENDING) for n, u in enumerate(uris)],
        )

    def pending(self, job: str) -> list[str]:
        return [
            r[0]
            for r in self._run(
                "SELECT uri FROM items WHERE job_id = ? AND status = ? ORDER BY position", (job, PENDING)
            )
        ]

    def mark(self, job: str, uris: list[str], status: str) -> None:
        self._many("UPDATE items SET status = ? WHERE job_id = ? AND uri = ?", [(status, job, u) for u in uris])
        if status == DONE:  # written after all (a rerun, a retry): a dead letter of theirs no longer stands
            self._many("DELETE FROM dead_letters WHERE job_id = ? AND uri = ?", [(job, u) for u in uris])

    def item_counts(self, job: str) -> dict[str, int]:
        return dict(self._run("SELECT status, COUNT(*) FROM items WHERE job_id = ? GROUP BY status", (job,)))  # type: ignore[arg-type]

    def dead_letter(self, job: str, uri: str, code: str, reason: str, attempts: int) -> None:
        self._run(
            "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)",
            (job, uri, code, reason, attempts, time.time()),
        )
        self.mark(job, [uri], FAILED)

    def dead_letters(self, job: str | None = None) -> list[DeadLetter]:
        sql = "SELECT job_id, uri, code, reason, attempts, at FROM dead_letters"
        rows = self._run(sql + " WHERE job_id = ? ORDER BY at", (job,)) if job else self._run(sql + " ORDER BY at")
        return [DeadLetter(*r) for r in rows]

    def requeue_dead_letters(self, job: str) -> int:
        """Dead letters back to pending, so the next run of the job tries them again."""
        letters = self.dead_letters(job)
        self.mark(job, [d.uri for d in letters], PENDING)
        self._run("DELETE FROM dead_letters WHERE job_id = ?", (job,))
        return len(letters)

    def purge_dead_letters(self, job: str | None = None) -> int:
        letters = self.dead_letters(job)
        if job:
            self._run("DELETE FROM dead_letters WHERE job_id = ?", (job,))
        else:
            self._run("DELETE FROM dead_letters")
        return len(letters)

    def close(self) -> None:
        self._db.close()
