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
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray import serve

from mmembed.serve.app import build_app, logical_cpus

IMPORT_PATH = "mmembed.serve.app:build_app"


def data_plane_env(ingress: str) -> dict[str, str]:
    """What a cluster must start with for ``ingress``: Serve reads these once, in each process it
    starts. ``haproxy``: HAProxy answers HTTP and hands each request to an ingress replica's own
    HTTP server, with no Python proxy actor in between, and replicas run their user code on their
    main loop (Serve's throughput-optimized mode; small calls between them go over gRPC whatever
    the mode, ``serve.handles``): 1.7x the single-text
    throughput and p50 25 ms against 41 ms on 2 cores (docs/benchmarks.md, "Serving data plane").
    Ray scopes HAProxy's files by node; its stats and metrics ports are fixed, so a second cluster
    on the machine (a test session's, a second server) would fail to start: each gets free ones."""
    if ingress == "proxy":
        return {}
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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
    urls: dict[str, str]  # each application's, by name, in the file's order
    dashboard_url: str
    joined: bool  # a cluster someone else started: stopping removes only these apps

    @property
    def url(self) -> str:
        return next(iter(self.urls.values()))


def start(
    config: Path | None,
    address: str | None,
    host: str | None,
    port: int | None,
    quiet: bool = False,
    dashboard_host: str = "127.0.0.1",
    metrics_export_port: int | None = None,
    ingress: str = "haproxy",
) -> Running:
    """Every application in ``config`` (one default app without it), as ``serve run`` would.
    ``quiet``: replicas' logs stay in Ray's log folder instead of this terminal.
    ``metrics_export_port``: a fixed port for Ray's Prometheus metrics (random otherwise), so a
    Prometheus outside the process can scrape Serve's series; a joined cluster keeps its own."""
    spec = yaml.safe_load(config.read_text()) if config else {}
    http = spec.get("http_options", {}) | {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    http = {"host": "127.0.0.1", "port": 8000} | http
    applications = spec.get("applications") or [{"name": "mmembed", "route_prefix": "/"}]
    for application in applications:
        if application.get("import_path", IMPORT_PATH) != IMPORT_PATH:
            message = f"application {application.get('name')!r}: import_path must be {IMPORT_PATH} (use `serve run`)"
            raise ValueError(message)
    local = address is None
    apps = [dict(application.get("args") or {}) for application in applications]
    if not local:
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(("MMEMBED_", "AWS_")) and k not in SECRETS}
        for args in apps:
            args["env"] = forwarded | (args.get("env") or {})
    cpus = logical_cpus(apps, os.cpu_count() or 1) if local else None
    if local:  # the operator's own RAY_SERVE_* settings win
        os.environ.update({k: v for k, v in data_plane_env(ingress).items() if k not in os.environ})
    if metrics_export_port is not None and not local:
        raise ValueError("--metrics-export-port applies to a cluster started here, not one joined with --address")
    context = ray.init(
        address=address,
        num_cpus=cpus,
        dashboard_host=dashboard_host,
        include_dashboard=local,
        log_to_driver=not quiet,
        _metrics_export_port=metrics_export_port,
    )
    # A dashboard bound to every interface is still opened on this machine's loopback.
    dashboard = "http://" + (context.dashboard_url or "127.0.0.1:8265").replace("0.0.0.0", "127.0.0.1")
    # HeadOnly where several nodes share one machine's ports (serve-cluster.yaml); Serve's default else.
    serve.start(http_options=http, **({"proxy_location": spec["proxy_location"]} if "proxy_location" in spec else {}))
    urls = {}
    for n, (application, args) in enumerate(zip(applications, apps, strict=True)):
        args.setdefault("dashboard_url", dashboard)
        name, prefix = application.get("name", f"app{n + 1}"), application.get("route_prefix", "/")
        serve.run(build_app(args), name=name, route_prefix=prefix)
        urls[name] = f"http://{http['host']}:{http['port']}{prefix.rstrip('/')}"
    return Running(urls, apps[0]["dashboard_url"], joined=not local)


def wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


def stop(running: Running) -> None:
    if running.joined:
        for name in running.urls:
            serve.delete(name)
    else:
        serve.shutdown()
    ray.shutdown()
