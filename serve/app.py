"""The Serve application: one encoder deployment per configured model behind the ingress, and the
catalogue, whose server jobs send their items to the same encoder deployments.

``build_app`` is a Serve application builder, so the same YAML works three ways:
``mmembed serve --config serve.yaml``, ``serve run serve.yaml`` and ``serve deploy serve.yaml``
(``import_path: mmembed.serve.app:build_app``, the ServeConfig fields under ``args``).
"""

from __future__ import annotations

import math
from typing import Any

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
    encoders = {m.name: build_encoder(m, settings, config.env) for m in config.models}
    options: dict[str, Any] = {
        "max_ongoing_requests": config.ingress_max_ongoing_requests,
        "max_queued_requests": config.ingress_max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
    }
    if config.env:
        options["ray_actor_options"] = {"runtime_env": {"env_vars": config.env}}
    catalog = build_catalog(settings, config.env, encoders)
    return Ingress.options(**options).bind(encoders, catalog, config.model_dump(), settings)


def logical_cpus(args: dict[str, Any] | None, physical: int) -> int:
    """CPUs to give a local Ray so the configured replicas can all start: Serve reserves one
    CPU per replica by default, and five small models must not wait for a bigger machine.
    They are logical reservations; each replica's torch threads follow its ``num_cpus``."""
    config = ServeConfig.model_validate(args or {})
    needed = 2 + sum(m.num_cpus * max(m.min_replicas, 1) for m in config.models)  # 2: the ingress and the catalogue
    return max(physical, math.ceil(needed))
