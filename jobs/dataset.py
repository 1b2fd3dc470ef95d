"""The worker-side step of a bulk job: read, hash, decode and preprocess each listed item in
DataLoader worker processes, turning every failure into a ``Loaded`` with an error code instead
of an exception: one unreadable object must never stop a run of millions.

It lives in ``jobs`` rather than ``loaders`` because it joins the two: bytes from ``loaders``,
preprocessors from the encoders, torch's DataLoader for workers and pinned memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import boto3.session
import torch
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mmembed.encoders.base import Prepared
from mmembed.encoders.device import pick_device
from mmembed.loaders.audio import SUPPORTED_FORMATS, AudioLimits, sniff_format
from mmembed.loaders.images import DecodeLimits, decode_image
from mmembed.loaders.sources import SourceError, SourceItem, read_item
from mmembed.loaders.url_policy import STRICT_POLICY, PolicyClient, UrlPolicy


@dataclass
class Loaded:
    index: int
    uri: str
    content_hash: str | None
    prepared: Prepared | None
    error: tuple[str, str] | None
    read_ms: float
    decode_ms: float
    data: bytes | None = None  # the bytes read, for the job to store the object it embedded

    def pin_memory(self) -> Loaded:
        """Called by the DataLoader's pin thread (``pin_memory=True``); without it the loader would
        pass this object through untouched and nothing would be pinned."""
        return self.replaced(_pinned)

    def inputs(self) -> list[Prepared]:
        """Its prepared inputs: none (a failure, or read only), one, or one per model (a job with
        several models of one modality)."""
        if isinstance(self.prepared, dict):
            return list(self.prepared.values())
        return [] if self.prepared is None else [self.prepared]

    def replaced(self, change: Callable[[Prepared], Prepared]) -> Loaded:
        """This item with ``change`` applied to each of its prepared inputs."""
        if isinstance(self.prepared, dict):
            return dataclasses.replace(self, prepared={k: change(p) for k, p in self.prepared.items()})
        return self if self.prepared is None else dataclasses.replace(self, prepared=change(self.prepared))


def _pinned(prepared: Prepared) -> Prepared:
    if not isinstance(prepared.data, torch.Tensor):
        return prepared
    return Prepared(prepared.data.pin_memory(), prepared.info)


Preprocessor = Callable[[Any], Prepared]


class SourceDataset(Dataset[Loaded]):
    """Items -> ``Loaded``, one per index, never an exception.

    Images are decoded here (``decode_image``) and handed to ``preprocessors['image']`` as RGB
    Pillow images; audio goes to ``preprocessors['audio']`` as the bytes read, since the audio
    encoders decode (and resample) bytes themselves. A kind whose preprocessor is None is only read
    and hashed (``prepared`` None): the encoder deployments of a server job decode it next to the
    model. Each read is capped at the decoder's own ``max_bytes`` for the item's kind, so nothing
    larger than it would accept is ever buffered.
    S3 and HTTP clients are made lazily in each worker process: they hold sockets and cannot be
    pickled or shared across a fork. URLs are read under ``url_policy`` (``loaders.url_policy``;
    default: public addresses only).
    """

    def __init__(
        self,
        items: Sequence[SourceItem],
        preprocessors: Mapping[str, Preprocessor | None],
        image_limits: DecodeLimits = DecodeLimits(),
        audio_limits: AudioLimits = AudioLimits(),
        s3_config: Mapping[str, Any] | None = None,
        timeout_s: float = 30,
        url_policy: UrlPolicy = STRICT_POLICY,
        file_roots: Sequence[Path] | None = None,
    ) -> None:
        self.items = list(items)
        self.preprocessors = dict(preprocessors)
        self.image_limits, self.audio_limits = image_limits, audio_limits
        self.s3_config = dict(s3_config or {})
        self.timeout_s = timeout_s
        self.url_policy = url_policy
        self.file_roots = tuple(file_roots) if file_roots is not None else None
        self._pid: int | None = None
        self._s3: Any = None
        self._http: PolicyClient | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        """Spawned workers get the dataset pickled: clients stay behind and are made anew there."""
        return self.__dict__ | {"_pid": None, "_s3": None, "_http": None}

    def __getitem__(self, index: int) -> Loaded:
        item = self.items[index]
        if item.kind not in self.preprocessors:  # known before any I/O: no reason to fetch what cannot be encoded
            message = f"this job encodes {', '.join(self.preprocessors) or 'nothing'}, not {item.kind}"
            return Loaded(index, item.uri, None, None, ("unsupported_kind", message), 0.0, 0.0)
        started = time.perf_counter()
        try:
            data = _retry_transient(self._read, item)
        except Exception as exc:  # a worker that raises ends the whole run
            return Loaded(index, item.uri, None, None, _failure(exc), _ms_since(started), 0.0)
        read_ms = _ms_since(started)
        content_hash = hashlib.sha256(data).hexdigest()
        started = time.perf_counter()
        try:
            prepared = self._prepare(item, data, self.preprocessors[item.kind])
        except Exception as exc:
            return Loaded(index, item.uri, content_hash, None, _failure(exc), read_ms, _ms_since(started))
        return Loaded(index, item.uri, content_hash, prepared, None, read_ms, _ms_since(started), data)

    def _read(self, item: SourceItem) -> bytes:
        if self._pid != os.getpid():  # first use in this process, or inherited through a fork
            self._pid, self._s3, self._http = os.getpid(), None, None
        s3 = None
        if (item.location or item.uri).startswith("s3://"):
            if self._s3 is None:
                self._s3 = boto3.session.Session().client("s3", **self.s3_config)
            s3 = self._s3
        elif (item.location or item.uri).startswith(("http://", "https://")) and self._http is None:
            self._http = PolicyClient(self.url_policy)
        max_bytes = self.image_limits.max_bytes if item.kind == "image" else self.audio_limits.max_bytes
        return read_item(
            item, s3, max_bytes=max_bytes, timeout_s=self.timeout_s, http_client=self._http, file_roots=self.file_roots
        )

    def _prepare(self, item: SourceItem, data: bytes, preprocess: Preprocessor | None) -> Prepared | None:
        if item.kind == "image":
            return preprocess(decode_image(data, self.image_limits)) if preprocess else None
        if item.kind == "text":
            return preprocess(data.decode("utf-8")) if preprocess else None
        # Any audio encoder, built-in or registered, sees only a container it could decode.
        if sniff_format(data) is None:
            raise SourceError(
                f"not a supported audio format (supported: {', '.join(SUPPORTED_FORMATS)})", "unsupported_format"
            )
        return preprocess(data) if preprocess else None


# Worth another try after a pause: the network or the S3 endpoint, not the item itself.
TRANSIENT_CODES = {"url_unreachable", "url_timeout", "s3_error"}
_retry_transient = retry(
    retry=retry_if_exception(lambda e: isinstance(e, SourceError) and e.code in TRANSIENT_CODES),
    stop=stop_after_attempt(4),
    wait=wait_random_exponential(multiplier=0.2, max=5),
    reraise=True,
)(lambda read, item: read(item))


def _failure(exc: Exception) -> tuple[str, str]:
    """Every error this project raises on purpose has a ``code``; anything else is a bug worth
    seeing by its type, recorded rather than raised."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code, str(exc)
    return "internal_error", f"{type(exc).__name__}: {exc}"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _as_list(batch: list[Loaded]) -> list[Loaded]:
    """Collate that keeps a batch as its items: their ``prepared`` data differ in shape and type,
    and failures have none, so stacking is the encoder's job on the good ones. In a worker, the
    batch's tensors become views of one buffer per dtype first (``_one_storage``)."""
    return _one_storage(batch) if get_worker_info() is not None else batch


def _one_storage(batch: list[Loaded]) -> list[Loaded]:
    """Torch sends each tensor storage from a worker as its own shared-memory file, and the job's
    process fetches every file descriptor over a fresh, authenticated connection to the worker: 32
    handshakes a batch, each waiting for a worker that runs at the lowest priority. Copied into one
    buffer per dtype, a batch crosses as one storage (``bench/bulk_scale.py``'s ceiling part)."""
    tensors: dict[torch.dtype, list[torch.Tensor]] = {}
    for loaded in batch:
        for prepared in loaded.inputs():
            if isinstance(prepared.data, torch.Tensor):
                tensors.setdefault(prepared.data.dtype, []).append(prepared.data)
    views: dict[int, torch.Tensor] = {}
    for group in tensors.values():
        buffer = torch.cat([t.reshape(-1) for t in group])
        offset = 0
        for t in group:
            views[id(t)] = buffer[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
    if not views:
        return batch

    def moved(p: Prepared) -> Prepared:
        return Prepared(views[id(p.data)], p.info) if id(p.data) in views else p

    return [loaded.replaced(moved) for loaded in batch]


def make_loader(
    dataset: SourceDataset, batch_size: int, workers: int, device: str = "cpu", prefetch: int = 2
) -> DataLoader[Loaded]:
    """At most ``workers * prefetch`` batches are in flight, so memory stays bounded however large
    the source. Workers fork on Linux: the encoders' preprocessors are plain objects, and forking
    skips re-importing torch and pickling the dataset in every worker."""
    context = None
    if workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
    # The device's kind, as the models resolve it; a server job's catalogue replica runs no model, so
    # its setting is not parsed here (a device it does not have must not fail a job).
    kind = pick_device().type if device == "auto" else str(device).split(":", 1)[0]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
        pin_memory=kind == "cuda",
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=context,
        worker_init_fn=partial(_yield_to_the_model, forward_on_cpu=kind == "cpu"),
    )


def _yield_to_the_model(worker: int, forward_on_cpu: bool) -> None:
    """Workers yield the CPU to the process that runs the model. On a CPU its forward pass keeps every
    core busy, and a worker taking a core from one of its threads stalls all of them at the next
    barrier, so there workers run only on a core nothing else wants (``SCHED_IDLE``): they decode while
    the job writes, between batches and in the forward's waits. ``bench/bulk_scale.py``'s ceiling part:
    fp32, 0.89 of the raw forward at the same priority and 1.00 at nice 10; bf16, alternating runs,
    102-106 images/s at nice 10 against 112-114 idle. Beside an accelerator the job's process needs
    little CPU, and other busy processes could starve an idle worker, so there workers run at nice 10."""
    if forward_on_cpu:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(10)
