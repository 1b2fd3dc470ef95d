"""Durable job state in one SQLite file: each job's plan and progress (so a run killed at any
point resumes where it stopped), and the dead letters (items that failed past their retries,
with the reason, until retried or purged).

The plan lives here, not in memory: a job over a million items records each planned item (its
listing, as JSON) chunk by chunk, then reads its pending items back in windows by position.
The point ids its source listed go to a temporary table of the plan's own, appended in listing
order and indexed once it is whole (a sort: a million inserts into a B-tree cost 6x as much),
which finds the points gone from the source and the items listed twice. Every one of those is
an indexed query per chunk or window, never one per item.

The ledger (``written``) records, per source and collection, the point each item has and the
listing version it was written at. A plan trusts it instead of looking every listed item up in
the vector store while the store's count of the source's points equals the ledger's: the
embedded engine's lookup by id visits every segment, so at a million points those lookups
cost more per item than the rest of a rerun. Anything that changes the count behind the
ledger's back (a point deleted over HTTP, a job cut off between writing and recording) sends
the next plan to the store, which then rebuilds the ledger.

SQLite because it survives SIGKILL mid-write (the WAL journal), needs no server, and is
shared safely by the CLI and the server's job runner on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmembed.contracts import DeadLetter
from mmembed.loaders.sources import SourceItem, repeated

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, counts TEXT NOT NULL DEFAULT '{}', error TEXT
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL, uri TEXT NOT NULL, position INTEGER NOT NULL, status TEXT NOT NULL, item TEXT,
    PRIMARY KEY (job_id, uri)
);
CREATE INDEX IF NOT EXISTS items_pending ON items (job_id, status, position);
CREATE TABLE IF NOT EXISTS written (
    ledger TEXT NOT NULL, point TEXT NOT NULL, version TEXT, PRIMARY KEY (ledger, point)
) WITHOUT ROWID;
DROP TABLE IF EXISTS listed;
CREATE TABLE IF NOT EXISTS dead_letters (
    job_id TEXT NOT NULL, uri TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL,
    attempts INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (job_id, uri)
);
"""

# A planned item is stored as the JSON list of its fields (dataclasses.astuple deep-copies each one:
# a third of planning a million items).
_ITEM_FIELDS = [f.name for f in dataclasses.fields(SourceItem)]

# Address space, not memory: only the pages read are resident, and they are file pages the kernel may drop.
MMAP_BYTES = 4 << 30

# Item states: pending (planned, not yet written), done (its point is written), failed (dead letter).
PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass
class JobRow:
    id: str
    source: str
    config: dict[str, Any]
    status: str  # planned | running | done | failed | interrupted; a server's watch: watching | stopped
    created: float
    updated: float
    counts: dict[str, Any]
    error: str | None


def _listing(job: str) -> str:
    """The plan's temporary listing table: its name is built from the job id, so it is checked."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", job):
        raise ValueError(f"a job id is letters, digits, '-' and '_'; got {job!r}")
    return f"listing_{job}"


def ledger_id(source: str, collection: str) -> str:
    """Every job over one source writes the same points of a collection, whatever its models."""
    return hashlib.sha256(json.dumps([source, collection]).encode()).hexdigest()[:16]


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
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
        for column in ("item", "point", "version"):  # a job store written before these were kept
            if column not in columns:
                self._db.execute(f"ALTER TABLE items ADD COLUMN {column} TEXT")
        self._db.execute("PRAGMA temp.cache_size = -16384")  # KiB: a plan's listing spills to disk past it
        self._lock = threading.Lock()

    @contextmanager
    def mapped(self) -> Iterator[None]:
        """Reads through a memory map while the block runs. A plan looks every listed point up in the
        ledger, a random page each, and a read() per page made that lookup 1.5x as costly per item at
        a million items as at 100,000 (4.7 s against 3.2 s mapped). Unmapped afterwards, so a run's
        resident memory holds none of the file."""
        with self._lock:
            self._db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        try:
            yield
        finally:
            with self._lock:
                self._db.execute("PRAGMA mmap_size = 0")

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _many(self, sql: str, rows: list[tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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

    def begin_plan(self, job: str, resume: bool) -> None:
        """A new plan starts an empty listing; a run that is not a resume also forgets the last
        run's items (the incremental check decides what to write again)."""
        table = _listing(job)
        self._run(f'DROP TABLE IF EXISTS temp."{table}"')
        self._run(f'CREATE TEMP TABLE "{table}" (point TEXT NOT NULL, uri TEXT NOT NULL)')
        if not resume:
            self._run("DELETE FROM items WHERE job_id = ?", (job,))

    def has_pending(self, job: str) -> bool:
        return bool(self._run("SELECT 1 FROM items WHERE job_id = ? AND status = ? LIMIT 1", (job, PENDING)))

    def record_listing(self, job: str, points: Sequence[tuple[str, str]]) -> None:
        """``points``: (point id, URI) of a chunk of the listing, appended."""
        self._many(f'INSERT INTO temp."{_listing(job)}" (point, uri) VALUES (?, ?)', list(points))

    def end_listing(self, job: str, source: str) -> None:
        """Indexes the whole listing for ``unlisted``; a source naming an item twice is refused."""
        table = _listing(job)
        try:
            self._run(f'CREATE UNIQUE INDEX temp."{table}_point" ON "{table}" (point)')
        except sqlite3.IntegrityError:
            twice = self._run(
                f'SELECT uri FROM temp."{table}" WHERE point IN '
                f'(SELECT point FROM temp."{table}" GROUP BY point HAVING COUNT(*) > 1) LIMIT 1'
            )
            raise repeated(source, twice[0][0]) from None

    def unlisted(self, job: str, points: Sequence[str]) -> list[str]:
        """Which of these points (a page of the store's) the plan's listing did not name."""
        listed = {
            r[0]
            for r in self._run(
                f'SELECT point FROM temp."{_listing(job)}" WHERE point IN ({",".join("?" * len(points))})',
                tuple(points),
            )
        }
        return [p for p in points if p not in listed]

    def states(self, job: str, uris: Sequence[str]) -> dict[str, str]:
        """The recorded state of each of these items that has one (pending, done, failed)."""
        rows = self._run(
            f"SELECT uri, status FROM items WHERE job_id = ? AND uri IN ({','.join('?' * len(uris))})", (job, *uris)
        )
        return dict(rows)  # type: ignore[arg-type]

    def dead_lettered(self, job: str, uris: Sequence[str]) -> set[str]:
        rows = self._run(
            f"SELECT uri FROM dead_letters WHERE job_id = ? AND uri IN ({','.join('?' * len(uris))})", (job, *uris)
        )
        return {r[0] for r in rows}

    def plan(self, job: str, items: Sequence[tuple[int, str, SourceItem]]) -> None:
        """Record items a run must write, at their listing positions, with their point ids; items
        already planned (a resumed run's) keep their state."""
        self._many(
            "INSERT INTO items (job_id, uri, position, status, item, point, version) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (job_id, uri) DO UPDATE SET position = excluded.position, item = excluded.item, "
            "point = excluded.point, version = excluded.version",
            [
                (job, i.uri, n, PENDING, json.dumps([getattr(i, f) for f in _ITEM_FIELDS], default=str), pid, i.version)
                for n, pid, i in items
            ],
        )

    def pending(self, job: str, after: int = -1, limit: int = -1) -> list[tuple[int, SourceItem]]:
        """Planned items not yet written, by position: a window of at most ``limit`` after ``after``."""
        rows = self._run(
            "SELECT position, item FROM items WHERE job_id = ? AND status = ? AND position > ? AND item IS NOT NULL "
            "ORDER BY position LIMIT ?",
            (job, PENDING, after, limit),
        )
        return [(position, SourceItem(*json.loads(item))) for position, item in rows]

    def mark(self, job: str, uris: list[str], status: str) -> None:
        self._many("UPDATE items SET status = ? WHERE job_id = ? AND uri = ?", [(status, job, u) for u in uris])
        if status == DONE:  # written after all (a rerun, a retry): a dead letter of theirs no longer stands
            self._many("DELETE FROM dead_letters WHERE job_id = ? AND uri = ?", [(job, u) for u in uris])
            ledger = self.ledger(job)
            self._many(
                "INSERT INTO written (ledger, point, version) SELECT ?, point, version FROM items "
                "WHERE job_id = ? AND uri = ? AND point IS NOT NULL "
                "ON CONFLICT (ledger, point) DO UPDATE SET version = excluded.version",
                [(ledger, job, u) for u in uris],
            )

    # --- the ledger: what each source's jobs wrote ------------------------------------------

    def ledger(self, job: str) -> str:
        row = self.get(job)
        if row is None:
            raise KeyError(job)
        return ledger_id(row.source, row.config.get("collection", ""))

    def written_count(self, ledger: str) -> int:
        return int(self._run("SELECT COUNT(*) FROM written WHERE ledger = ?", (ledger,))[0][0])

    def written_versions(self, ledger: str, points: Sequence[str]) -> dict[str, str | None]:
        """The version each of these points was written at, for those the ledger has."""
        rows = self._run(
            f"SELECT point, version FROM written WHERE ledger = ? AND point IN ({','.join('?' * len(points))})",
            (ledger, *points),
        )
        return dict(rows)  # type: ignore[arg-type]

    def record_written(self, ledger: str, versions: dict[str, str | None]) -> None:
        """What the store says a chunk's points hold: the ledger rebuilt as a plan reads the store."""
        self._many(
            "INSERT OR REPLACE INTO written (ledger, point, version) VALUES (?, ?, ?)",
            [(ledger, p, v) for p, v in versions.items()],
        )

    def forget_written(self, ledger: str, points: Sequence[str] | None = None) -> None:
        """``points`` deleted from the store; None: the whole ledger, before it is rebuilt."""
        if points is None:
            self._run("DELETE FROM written WHERE ledger = ?", (ledger,))
        else:
            self._many("DELETE FROM written WHERE ledger = ? AND point = ?", [(ledger, p) for p in points])

    def unlisted_written(self, job: str, ledger: str) -> list[str]:
        """Points the ledger has that the plan's listing did not name: one anti-join on its index."""
        rows = self._run(
            f"SELECT w.point FROM written w WHERE w.ledger = ? AND NOT EXISTS "
            f'(SELECT 1 FROM temp."{_listing(job)}" l WHERE l.point = w.point)',
            (ledger,),
        )
        return [r[0] for r in rows]

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
