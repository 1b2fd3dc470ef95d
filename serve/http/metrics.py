"""Prometheus metrics of one app (one ingress replica), labelled by model and modality."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmembed.contracts import EncodedItem, JobView


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ("model", "modality")
        self.requests = Counter("mmembed_requests", "Encode requests", ("endpoint", "status"), registry=r)
        self.items = Counter("mmembed_items", "Items encoded", labels, registry=r)
        self.errors = Counter("mmembed_item_errors", "Items refused", (*labels, "code"), registry=r)
        self.cache_hits = Counter("mmembed_cache_hits", "Items answered by the embedding cache", labels, registry=r)
        buckets = (1, 2, 4, 8, 16, 32, 64, 128)
        self.batch = Histogram("mmembed_batch_size", "Batch an item ran in", labels, buckets=buckets, registry=r)
        self.queue = Histogram("mmembed_queue_wait_seconds", "Wait for a batch", labels, registry=r)
        self.encode = Histogram("mmembed_encode_seconds", "Forward pass of the batch", labels, registry=r)

    def observe(self, model: str, modality: str, results: list[EncodedItem]) -> None:
        for r in results:
            if r.error is not None:
                self.errors.labels(model, modality, r.error.code).inc()
                continue
            self.items.labels(model, modality).inc()
            if r.cached:
                self.cache_hits.labels(model, modality).inc()
                continue
            if r.batch_size is not None:
                self.batch.labels(model, modality).observe(r.batch_size)
            self.queue.labels(model, modality).observe(r.queue_ms / 1000)
            self.encode.labels(model, modality).observe(r.encode_ms / 1000)

    def exposition(self, jobs: list[JobView]) -> bytes:
        """This app's figures, and the bulk jobs' (they live in the catalogue: read per scrape)."""
        registry = CollectorRegistry()
        items = Gauge("mmembed_job_items", "Items of a bulk job by state", ("job", "state"), registry=registry)
        progress = Gauge("mmembed_job_progress", "Share of a bulk job's items finished", ("job",), registry=registry)
        for job in jobs:
            progress.labels(job.id).set(job.progress)
            for state, count in job.items.items():
                items.labels(job.id, state).set(count)
        return generate_latest(self.registry) + generate_latest(registry)
