"""Start the application on Ray Serve from a Serve config file, and stop it again: what
``mmembed serve`` and ``mmembed quickstart`` share.

A local cluster started here inherits this shell's environment. A cluster joined with
``--address`` was started by someone else's, so the app then carries this shell's
``MMEMBED_*`` settings and ``AWS_*`` variables to its replicas in its runtime env, all but the
secrets: Ray logs runtime envs (see SECURITY.md).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from mmembed.serve.app import build_app, logical_cpus

# Never put into a runtime env: Ray's runtime-env agent logs its environment variables. The
# MMEMBED_ ones reach the replicas in the Settings build_app reads here; AWS secrets come from
# the nodes' own environment.
SECRETS = frozenset(
    {
        "MMEMBED_API_KEYS_WRITE",
        "MMEMBED_API_KEYS_READ",
        "MMEMBED_QDRANT_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    }
)


@dataclass(frozen=True)
class Running:
    url: str
    dashboard_url: str
    app_name: str
    joined: bool  # a cluster someone else started: stopping removes only this app


def start(
    config: Path | None,
    address: str | None,
    host: str | None,
    port: int | None,
    quiet: bool = False,
    dashboard_host: str = "127.0.0.1",
) -> Running:
    """``quiet``: replicas' logs stay in Ray's log folder instead of this terminal."""
    spec = yaml.safe_load(config.read_text()) if config else {}
    http = spec.get("http_options", {}) | {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    http = {"host": "127.0.0.1", "port": 8000} | http
    application = (spec.get("applications") or [{}])[0]
    args: dict[str, Any] = dict(application.get("args") or {})
    local = address is None
    if not local:
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(("MMEMBED_", "AWS_")) and k not in SECRETS}
        args["env"] = forwarded | (args.get("env") or {})
    cpus = logical_cpus(args, os.cpu_count() or 1) if local else None
    context = ray.init(
        address=address, num_cpus=cpus, dashboard_host=dashboard_host, include_dashboard=local, log_to_driver=not quiet
    )
    # A dashboard bound to every interface is still opened on this machine's loopback.
    dashboard = "http://" + (context.dashboard_url or "127.0.0.1:8265").replace("0.0.0.0", "127.0.0.1")
    args.setdefault("dashboard_url", dashboard)
    serve.start(http_options=http)
    name = application.get("name", "mmembed")
    serve.run(build_app(args), name=name, route_prefix="/")
    return Running(f"http://{http['host']}:{http['port']}", args["dashboard_url"], name, joined=not local)


def wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


def stop(running: Running) -> None:
    if running.joined:
        serve.delete(running.app_name)
    else:
        serve.shutdown()
    ray.shutdown()
