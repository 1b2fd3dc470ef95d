"""The Serve application: one encoder deployment per configured model behind the ingress, and the
catalogue, whose server jobs send their items to the same encoder deployments.

``build_app`` is a Serve application builder, so the same YAML works three ways:
``mmembed serve --config serve.yaml``, ``serve run serve.yaml`` and ``serve deploy serve.yaml``
(``import_path: mmembed.serve.app:build_app``, the ServeConfig fields under ``args``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from mmembed.serve.catalog import build_catalog
from mmembed.serve.config import ServeConfig, replica_settings
from mmembed.serve.deployments import build_encoder
from mmembed.serve.ingress import Ingress


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The one place the app reads ``Settings``: every replica gets them from here."""
    config = ServeConfig.model_validate(args or {})
    settings = replica_settings(config.env)
    share = cpu_share(config)
    models = [m.model_copy(update={"num_cpus": m.num_cpus * share}) for m in config.models]
    encoders = {m.name: build_encoder(m, settings, config.env) for m in models}
    options: dict[str, Any] = {
        "max_ongoing_requests": config.ingress_max_ongoing_requests,
        "max_queued_requests": config.ingress_max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
        **config.ingress_replicas(),
        "ray_actor_options": {"num_cpus": share, "resources": config.ingress_resources}
        | ({"runtime_env": {"env_vars": config.env}} if config.env else {}),
    }
    catalog = build_catalog(settings, config.env, encoders, num_cpus=share, resources=config.ingress_resources)
    return Ingress.options(**options).bind(encoders, catalog, config.model_dump(), settings)


def replica_cpus(config: ServeConfig) -> float:
    """The CPUs the app's replicas reserve as configured: one for the catalogue, one per ingress
    replica it starts with, and each model's ``num_cpus`` per replica it starts with."""
    return 1 + config.ingress_min_replicas + sum(m.num_cpus * max(m.min_replicas, 1) for m in config.models)


def logical_cpus(apps: list[dict[str, Any]], physical: int) -> int:
    """CPUs to give a local Ray so the replicas of these apps (their ``args``) can all start:
    Serve reserves one CPU per replica by default, and five small models must not wait for a
    bigger machine. They are logical reservations: a model replica's forward pass uses every core
    unless its ``cpu_threads`` says otherwise."""
    needed = sum(replica_cpus(ServeConfig.model_validate(args)) for args in apps)
    return max(physical, math.ceil(needed))


def cpu_share(config: ServeConfig) -> float:
    """The share of its configured CPUs each replica reserves: all of them, except on a one-node
    cluster with fewer CPUs than the replicas reserve (``serve run serve.yaml`` on a laptop starts
    Ray with the machine's cores), where every reservation shrinks by the same factor so that
    every replica starts instead of waiting for CPUs that will never come. Reservations are not
    limits: the replicas share the cores either way. A cluster of several nodes, which may be
    waiting for its autoscaler, keeps the configured figures."""
    if not ray.is_initialized():
        return 1.0
    needed, cpus = replica_cpus(config), ray.cluster_resources().get("CPU", 0.0)
    if cpus >= needed or cpus <= 0 or len([n for n in ray.nodes() if n["Alive"]]) != 1:
        return 1.0
    share = math.floor(cpus / needed * 1000) / 1000
    logging.getLogger(__name__).warning(
        "the replicas reserve %.1f CPUs and this one-node cluster has %.1f: each reserves %.3f of its num_cpus",
        needed,
        cpus,
        share,
    )
    return share
