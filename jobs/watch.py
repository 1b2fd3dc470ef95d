"""Watch mode: keep a collection in step with its source while the source changes.

A folder is followed through the operating system's file events (``watchfiles``); an S3 prefix,
which sends none here, is listed again every ``poll_s`` and compared by ETag (the incremental
plan). Every round is an ordinary incremental job over one ``Ingest``, so the cache, dead
letters, retries and the ledger behave as in ``mmembed ingest``, and the models load once.

- The first round is a whole pass with --sync: what changed while nothing watched is caught up.
  A folder's watcher is running before that pass starts, so a change made during or right after
  it is seen too (and one the pass already took costs nothing twice: its version matches).
- A folder round plans only the files its events name, so one new file in a folder of a million
  is not a listing of the million; files gone leave the collection. A path gone that was no file
  of a known kind (a folder renamed or removed whole) makes the round a whole pass, since which
  points it held is known only by listing.
- Bursts: events are gathered until ``delay_s`` passes without a new one (at most ten times that
  in all), and one round takes them all.
- A file still being written is not read half-done: it is read once its size and modification
  time have held still for ``settle_s``, and waits for a later round until then. (A whole pass
  lists what is there; a file it caught half-written is read again once it settles, and one that
  failed to decode is retried by the next round, as a new run retries its dead letters.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import watchfiles

from mmembed.config import Settings
from mmembed.jobs.ingest import Changes, Ingest, IngestOptions, Summary
from mmembed.loaders.sources import SourceError, folder_items, kind_of


@dataclass(frozen=True)
class WatchOptions:
    delay_s: float = 1.0  # a burst ends when no change came for this long
    settle_s: float = 1.0  # a file is read once its size and mtime held this long
    poll_s: float = 30.0  # an S3 prefix is listed this often


@dataclass(frozen=True)
class Round:
    summary: Summary
    whole: bool  # a pass over the whole source (the first round, a folder gone whole, every S3 poll)
    waiting: tuple[str, ...] = ()  # files still being written, left for a later round


@dataclass
class _Settling:
    """Changed files until their size and mtime hold still for ``settle_s``."""

    settle_s: float
    seen: dict[Path, tuple[tuple[int, int] | None, float]] = field(default_factory=dict)

    def changed(self, path: Path, now: float) -> None:
        self.seen[path] = (_stat(path), now)

    def ready(self, now: float) -> list[Path]:
        """Files that held still long enough, taken out; a file that moved on starts its wait again."""
        out = []
        for path, (stat, since) in list(self.seen.items()):
            current = _stat(path)
            if current != stat:
                self.seen[path] = (current, now)
            elif now - since >= self.settle_s:
                out.append(path)
                del self.seen[path]
        return out


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class Watch:
    def __init__(
        self,
        options: IngestOptions,
        settings: Settings,
        watch: WatchOptions = WatchOptions(),
        stop: threading.Event | None = None,
        ingest: Ingest | None = None,
    ) -> None:
        """``stop``: set it to end the watch after the round in progress. ``ingest``: the job to run
        rounds of (tests hand in one with their own stores); by default one over ``options`` with --sync."""
        self.options, self.watch = options, watch
        self.stop = stop or threading.Event()
        self.ingest = ingest or Ingest(replace(options, sync=True), settings)

    def rounds(self) -> Iterator[Round]:
        """Each round's outcome as it ends, until ``stop`` is set."""
        if self.options.source.startswith("s3://"):
            yield self._whole()
            while not self.stop.wait(self.watch.poll_s):
                yield self._whole()
            return
        root = Path(self.options.source).expanduser().resolve()
        if not root.is_dir():
            raise SourceError(
                f"{self.options.source}: watch mode follows a folder or an S3 prefix", "unsupported_source"
            )
        settling = _Settling(self.watch.settle_s)
        removed: set[Path] = set()
        quiet_ms = max(int(self.watch.delay_s * 1000), 1)
        events = watchfiles.watch(
            root,
            step=quiet_ms,  # a burst ends after this long without a change...
            debounce=max(10 * quiet_ms, 1600),  # ...or after this long in all, so a steady stream still gets rounds
            stop_event=self.stop,
            yield_on_timeout=True,  # wakes with no change, to look at files still settling
            rust_timeout=max(int(self.watch.settle_s * 1000 / 2), 50),
            raise_interrupt=False,
        )
        watching = False
        for batch in events:
            if not watching:  # the watcher runs from its first answer on: the whole pass misses nothing after it
                watching = True
                yield self._whole()
                continue
            now = time.monotonic()
            for change, name in batch:
                path = Path(name)
                if any(part.startswith(".") for part in path.relative_to(root).parts):
                    continue  # hidden: never an item, as in a listing
                if change == watchfiles.Change.deleted and not path.exists():
                    removed.add(path)
                    settling.seen.pop(path, None)
                else:
                    removed.discard(path)
                    settling.changed(path, now)
            ready = settling.ready(now)
            waiting = tuple(sorted(p.as_uri() for p in settling.seen))
            # A folder that settled lists its files; one of them may still be settling itself.
            items = {i.uri: i for i in folder_items(root, ready) if i.uri not in waiting}
            if not items and not removed:
                continue
            if any(not kind_of(p.name) for p in removed):  # a folder, maybe: its items are known by listing
                yield self._whole(waiting)
            else:
                changes = Changes(tuple(items.values()), tuple(p.as_uri() for p in sorted(removed)))
                plan = self.ingest.plan(calibrate=False, changes=changes)
                yield Round(self.ingest.run(plan, progress=False), False, waiting)
            removed.clear()

    def _whole(self, waiting: tuple[str, ...] = ()) -> Round:
        return Round(self.ingest.run(self.ingest.plan(calibrate=False), progress=False), True, waiting)
