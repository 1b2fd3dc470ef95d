"""What the server runs, in one typed place: which models, how each batches, its
replicas and accelerator share. The Serve config YAML carries these same fields as the
application's arguments, so `mmembed serve` and `serve run/deploy` read one file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, model_validator

from mmembed.config import Settings


class BatchConfig(BaseModel):
    max_batch_size: int = Field(default=32, ge=1, description="Most items in one forward pass.")
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="How long a batch waits to fill when the model is idle. While a batch runs the next one "
        "fills anyway, and after a run of several items an idle model waits about as long as they took, so under "
        "load batches are large without any wait set here.",
    )
    # Caps by cost, besides the count: a batch of 32 long texts or long clips is not a batch of 32 short ones.
    max_batch_tokens: int | None = Field(default=4096, ge=1, description="Text: tokens in one batch.")
    max_batch_audio_seconds: float | None = Field(default=240.0, gt=0, description="Audio: seconds in one batch.")
    text_sort_batches: int = Field(
        default=4,
        ge=1,
        description="Text: up to this many batches' worth of queued texts are sorted by length and run as batches "
        "of similar lengths, each answered as it finishes: less padding (1: first come, first batched).",
    )


class ModelConfig(BaseModel):
    name: str = Field(description="A registry name (see `mmembed models list`).")
    batch: BatchConfig = BatchConfig()
    num_cpus: float = Field(
        default=1.0, ge=0, description="CPUs each replica reserves (a one-node cluster short of CPUs scales them down)."
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPU share per replica; fractions pack models on one GPU.")
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch threads of each replica's forward pass on the CPU. None: every core of its node, as a "
        "one-process server uses them (Ray alone would give it its num_cpus, rounded down).",
    )
    concurrent_batches: int = Field(
        default=1,
        ge=1,
        description="Forward passes each replica runs at once, each on its own thread; on the CPU each gets "
        "cpu_threads, by default its share of the cores.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description='Custom Ray resources each replica needs, e.g. {"encoder": 0.25}: replicas go only to nodes '
        "started with them (`ray start --resources`), such as a cluster's encoder workers.",
    )
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling floor (equal to max_replicas: a fixed count).")
    max_replicas: int = Field(default=1, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(default=32, gt=0, description="Autoscaling target per replica.")
    max_queued_requests: int = Field(default=512, ge=1, description="Beyond this the caller gets 429 + Retry-After.")

    @model_validator(mode="after")
    def _replicas(self) -> ModelConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"{self.name}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    @property
    def max_ongoing_requests(self) -> int:
        """A batch for each pass run at once and one more: a full batch can form while they run.
        Fewer than ``max_batch_size`` would silently cap every batch below its setting."""
        return (self.concurrent_batches + 1) * self.batch.max_batch_size

    def deployment_options(self, env: dict[str, str] | None = None) -> dict:
        options: dict = {
            "name": deployment_name(self.name),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                "resources": self.resources,
                # OpenMP threads spin for 3,000 turns (a few µs) between torch ops, then sleep:
                # a traced forward's ops follow each other closer than that, while under load the
                # idle threads leave the CPU to the request path. Against OMP_WAIT_POLICY=PASSIVE
                # (no spin): 1.2x single texts at concurrency 1 (p50 19 -> 14 ms), 1.1x CLIP texts
                # and images under load (docs/benchmarks.md, "One model thread").
                # glibc gives each thread its own malloc arena; with the replica's preprocessing
                # threads that grew RSS by ~250 MB/min under load (bench/load_test.py). Two cap it.
                "runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "3000", "MALLOC_ARENA_MAX": "2", **(env or {})}},
            },
        }
        return options | replica_options(self.min_replicas, self.max_replicas, self.target_ongoing_requests)


def replica_options(min_replicas: int, max_replicas: int, target_ongoing_requests: float) -> dict[str, Any]:
    """A fixed count when the floor is the ceiling, Serve's autoscaling between them otherwise."""
    if min_replicas == max_replicas:
        return {"num_replicas": max_replicas}
    return {
        "autoscaling_config": {
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
        }
    }


def deployment_name(model: str) -> str:
    """Serve deployment names allow no '/' or ':'; registry names can have both."""
    return "encoder-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


DEFAULT_MODELS = ("demo-clip", "all-MiniLM-L6-v2", "whisper-base", "bind")


class ServeConfig(BaseModel):
    """The application's arguments in the Serve config YAML (``applications[].args``)."""

    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name=n) for n in DEFAULT_MODELS],
        description="The models to serve, one encoder deployment each.",
    )
    max_body_bytes: int = Field(default=64_000_000, ge=1, description="Larger requests get 413.")
    max_items_per_request: int = Field(
        default=2048, ge=1, description="Larger requests get 413 (400 on /v1/embeddings); OpenAI's own limit."
    )
    items_per_call: int = Field(
        default=256, ge=1, description="A request's items go to the model in calls of at most this many, concurrently."
    )
    token_ids_encoding: str | None = Field(
        default="cl100k_base",
        description="The tiktoken encoding of token ids sent to /v1/embeddings (what OpenAI clients and LangChain "
        "send); they are decoded to text for the model's own tokenizer. None: ids are refused.",
    )
    max_text_chars: int = Field(
        default=100_000,
        ge=1,
        description="Longer texts are refused (text_too_long) before tokenising; the token "
        "limit and MMEMBED_TOKEN_POLICY apply below it.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of every replica of this app: MMEMBED_* settings (collection, Qdrant URL, "
        "S3 bucket) and credentials such as AWS_ACCESS_KEY_ID.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After on 429 when a queue is full.")
    ingress_max_ongoing_requests: int = Field(default=256, ge=1, description="HTTP requests the ingress works on.")
    ingress_max_queued_requests: int = Field(
        default=1024,
        ge=1,
        description="HTTP requests waiting for the ingress; past it Serve's proxy answers 429 with Retry-After "
        "(plain text), so overload is refused instead of queued without bound.",
    )
    ingress_min_replicas: int = Field(
        default=1,
        ge=1,
        description="Autoscaling floor of the ingress, which parses every HTTP request (equal to the ceiling: a "
        "fixed count).",
    )
    ingress_max_replicas: int = Field(
        default=1,
        ge=1,
        description="Autoscaling ceiling of the ingress. One ingress spends 1.5-3 ms of CPU per request, so it "
        "caps a server at a few hundred requests/s however many cores and GPUs the encoders have.",
    )
    ingress_target_ongoing_requests: float = Field(
        default=64, gt=0, description="Autoscaling target of HTTP requests in the works per ingress replica."
    )
    ingress_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources the ingress and the catalogue need, to keep them off the encoder nodes "
        '(e.g. {"node:__internal_head__": 0.01}: the head node).',
    )
    dashboard_url: str = Field(
        default="http://127.0.0.1:8265",
        description="The Ray dashboard the search page links to; `mmembed serve` fills in the running cluster's.",
    )

    @model_validator(mode="after")
    def _unique(self) -> ServeConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"a model is listed twice: {names}")
        if self.ingress_min_replicas > self.ingress_max_replicas:
            raise ValueError(
                f"ingress_min_replicas {self.ingress_min_replicas} > ingress_max_replicas {self.ingress_max_replicas}"
            )
        return self

    def ingress_replicas(self) -> dict[str, Any]:
        return replica_options(
            self.ingress_min_replicas, self.ingress_max_replicas, self.ingress_target_ongoing_requests
        )


def replica_settings(env: Mapping[str, str]) -> Settings:
    """The settings the app's replicas run with: this process's environment with the app's
    ``env`` over it, as each replica's runtime env has it. Read once, where the app is built,
    and handed to every replica as a constructor argument (Ray logs runtime envs, not those).
    ``env`` is laid over ``os.environ`` only while ``Settings`` reads it: the one reader of the
    environment stays ``Settings``."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings()
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
