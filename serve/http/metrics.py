"""Prometheus metrics of one app (one ingress replica), by Prometheus's conventions: counters
end in ``_total``, no label is one Prometheus reserves (``job``, ``instance``), and every label
has a bounded set of values (route templates, not paths; running jobs only).

Batch sizes, batch waits and forward-pass times are not here: Ray Serve exports them per
deployment (one per model) and ``@serve.batch`` method (``_batch_<modality>``) as
``ray_serve_actual_batch_size``, ``ray_serve_batch_wait_time_ms`` and
``ray_serve_batch_execution_time_ms``, and its proxy counts requests per application as
``ray_serve_num_http_requests_total``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.routing import Match

from mmembed.contracts import EncodedItem, JobView

ACTIVE_JOBS = ("planned", "running")
DEAD_LETTERED = "failed"  # the item state of a dead letter in the job store (mmembed.jobs.state.FAILED)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ("model", "modality")
        route = ("method", "endpoint", "status")
        self.requests = Counter("mmembed_requests", "HTTP requests answered, by route and status", route, registry=r)
        self.items = Counter("mmembed_items", "Items encoded", labels, registry=r)
        self.errors = Counter("mmembed_item_errors", "Items refused", (*labels, "code"), registry=r)
        self.cache_hits = Counter("mmembed_cache_hits", "Items answered by the embedding cache", labels, registry=r)

    def observe(self, model: str, modality: str, results: list[EncodedItem]) -> None:
        for r in results:
            if r.error is not None:
                self.errors.labels(model, modality, r.error.code).inc()
                continue
            self.items.labels(model, modality).inc()
            if r.cached:
                self.cache_hits.labels(model, modality).inc()

    def exposition(self, jobs: list[JobView]) -> bytes:
        """This app's figures, and the bulk jobs' (they live in the catalogue: read per scrape).
        A finished job leaves the per-job gauges and is counted in ``mmembed_jobs`` by status;
        its dead letters stay in ``mmembed_dead_letters``, which an alert watches grow."""
        r = CollectorRegistry()
        by_status = Gauge("mmembed_jobs", "Bulk jobs by status", ("status",), registry=r)
        dead = Gauge("mmembed_dead_letters", "Items bulk jobs gave up on, over every job in the store", registry=r)
        items = Gauge("mmembed_job_items", "Items of a running job by state", ("job_id", "state"), registry=r)
        progress = Gauge("mmembed_job_progress", "Share of a running job's items finished", ("job_id",), registry=r)
        for job in jobs:
            by_status.labels(job.status).inc()
            dead.inc(job.items.get(DEAD_LETTERED, 0))
            if job.status not in ACTIVE_JOBS:
                continue
            progress.labels(job.id).set(job.progress)
            for state, count in job.items.items():
                items.labels(job.id, state).set(count)
        return generate_latest(self.registry) + generate_latest(r)


class CountRequests:
    """Counts every answer, refusals included (401s before routing, 413s before the body is
    read, 5xx), by its route's template. A plain ASGI middleware, outermost."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        api = getattr(scope["app"].state, "api", None) if scope["type"] == "http" and "app" in scope else None
        if api is None:
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes every handler is answered 500 by the server

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            api.metrics.requests.labels(scope["method"], _endpoint(scope), str(status)).inc()


def _endpoint(scope: dict[str, Any]) -> str:
    """The route template that answered, or would have (a request refused before routing)."""
    route = scope.get("route")
    if route is None:
        routes = getattr(scope["app"].state, "routes", ())  # the app's routes, flat (bare_app)
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", "unmatched")
