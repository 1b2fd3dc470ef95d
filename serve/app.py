"""The Serve application: one encoder deployment per configured model behind the ingress.

``build_app`` is a Serve application builder, so the same YAML works three ways:
``mmembed serve --config serve.yaml``, ``serve run serve.yaml`` and ``serve deploy serve.yaml``
(``import_path: serve.app:build_app``, the ServeConfig fields under ``args``).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve.config import ServeConfig
from serve.deployments import build_encoder
from serve.ingress import Ingress


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    config = ServeConfig.model_validate(args or {})
    encoders = {m.name: build_encoder(m) for m in config.models}
    return Ingress.bind(encoders, config.model_dump())
