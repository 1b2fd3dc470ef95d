"""The monitoring that docker/ ships: Prometheus alert rules run through `promtool` (Debian's
`prometheus` package) against input series that fire them and series that must not, and every
series the rules and the Grafana dashboard read is one mmembed really exports: its own, from
the app's real `/metrics`, or Ray Serve's, from the metric definitions in the installed Ray.
A rule on a misspelt or renamed series would otherwise stay silent forever."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_backend import FakeBackend
from http_app import client_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "docker" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mmembed.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus writes for each scrape target itself
# The bullet's list: each concern has an alert.
CONCERNS = {
    "replica down": {"MmembedTargetDown", "MmembedDeploymentUnhealthy", "MmembedReplicasBelowTarget"},
    "queue saturated / 429 rate": {"MmembedQueueSaturated", "MmembedShedding429"},
    "item error ratio": {"MmembedItemErrorRatio"},
    "dead letters growing": {"MmembedDeadLettersGrowing"},
    "a job stalled": {"MmembedJobStalled"},
    "cache hit rate collapsing": {"MmembedCacheHitRateCollapsed"},
    "p99 over budget": {"MmembedLatencyP99OverBudget"},
}


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def _dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard's panels."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels += [inner for p in panels for inner in p.get("panels", [])]  # inside collapsed rows
    return [target["expr"] for p in panels for target in p.get("targets", [])]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (Debian's package has it; .ci/run installs it)")
    return path


def _run(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_the_rules(promtool: str) -> None:
    output = _run(promtool, "check", "rules", RULES.name)
    assert f"SUCCESS: {len(_rules())} rules found" in output, output


def test_the_rules_fire_on_their_cases_and_stay_silent_on_the_others(promtool: str) -> None:
    output = _run(promtool, "test", "rules", RULE_TESTS.name)
    assert "SUCCESS" in output and "FAILED" not in output, output


def test_every_alert_has_a_firing_case_and_a_silent_one() -> None:
    """promtool only checks the cases written; this checks that every alert has both kinds."""
    spec = yaml.safe_load(RULE_TESTS.read_text())
    assert spec["rule_files"] == [RULES.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = set(_alerts())
    assert not alerts - fires, f"alerts no case fires: {sorted(alerts - fires)}"
    assert not alerts - silent, f"alerts with no case where they stay silent: {sorted(alerts - silent)}"
    assert not (fires | silent) - alerts, f"cases for alerts that do not exist: {sorted((fires | silent) - alerts)}"


def test_every_concern_has_an_alert_with_severity_and_a_runbook() -> None:
    alerts = _alerts()
    for concern, names in CONCERNS.items():
        assert names <= set(alerts), f"{concern}: {sorted(names - set(alerts))} missing"
    assert set(alerts) == set().union(*CONCERNS.values()), "an alert outside the concerns: add it to CONCERNS"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert re.fullmatch(r"\d+m", rule.get("for", "")), f"{name}: no `for:`, so one bad scrape pages"
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert len(rule["annotations"]["description"].split()) >= 20, f"{name}: say what to do"


def test_the_rules_read_the_scrape_jobs_prometheus_yml_defines() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    jobs = {scrape["job_name"] for scrape in config["scrape_configs"]}
    named = {j for rule in _rules() for m in re.findall(r'job=~?"([^"]+)"', rule["expr"]) for j in m.split("|")}
    assert named and named <= jobs, f"rules name jobs {sorted(named - jobs)} that prometheus.yml does not scrape"


def test_the_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses them as recording rules (Grafana's $__rate_interval as a fixed range)."""
    queries = _dashboard_queries()
    assert len(queries) >= 10
    fixed = [q.replace("$__rate_interval", "5m") for q in queries]
    rules = [{"record": f"dashboard:query{n}", "expr": q} for n, q in enumerate(fixed)]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(queries)} rules found" in _run(promtool, "check", "rules", "dashboard.yml", cwd=tmp_path)


# --- the series exist --------------------------------------------------------------------------

FUNCTIONS_AND_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
FUNCTIONS_AND_KEYWORDS |= {"offset", "bool", "inf", "nan"}


def series_names(query: str) -> set[str]:
    """The series a PromQL query reads: identifiers that are not functions, keywords, label
    names (inside {} or by/without/on/ignoring lists), strings, durations or Grafana variables."""
    query = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)  # strings (label values, printf formats)
    query = re.sub(r"\{[^}]*\}", "", query)  # label matchers
    query = re.sub(r"\[[^\]]*\]", "", query)  # ranges and subqueries
    query = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", query)
    query = re.sub(r"\$\w+", "", query)  # Grafana variables
    query = re.sub(r"\boffset\s+\w+", " ", query)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", query):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(name)
    return names


def test_series_names_finds_the_series_and_only_them() -> None:
    query = (
        'sum by (model, le) (rate(mmembed_items_total{model="a b", code!~"x|y"}[5m] offset 1h))'
        " / on (model) group_left (code) max without (instance) (ray_serve_x_bucket) > bool 0.5"
        ' and histogram_quantile(0.99, up{job="ray"}) or vector(1) * $__rate_interval'
    )
    assert series_names(query) == {"mmembed_items_total", "ray_serve_x_bucket", "up"}


def _app_exposition(tmp_path: Path) -> str:
    """The app's real /metrics after requests, refusals and bulk jobs (one with dead letters)."""
    backend = FakeBackend()
    client = client_for(tmp_path, backend)
    client.post("/encode/text", json={"model": "all-MiniLM-L6-v2", "texts": ["a", ""]})
    job = client.post("/ingest", json={"source": "/data/photos"}).json()["id"]
    backend.jobs[job] = replace(backend.jobs[job], items={"done": 3, "failed": 1, "pending": 2})
    answer = client.get("/metrics")
    assert answer.status_code == 200
    return answer.text


def _exported(text: str) -> set[str]:
    """Every series name an exposition's families produce, by their type (a counter's family
    ``x`` is scraped as ``x_total``), so families with no sample yet count too."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    suffixes |= {"summary": ("", "_sum", "_count"), "untyped": ("",)}
    families = list(text_string_to_metric_families(text))
    return {f.name + s for f in families for s in suffixes[f.type]} | {s.name for f in families for s in f.samples}


def _ray_serve_series() -> set[str]:
    """The series Ray Serve's metrics export as Prometheus names, from their definitions in the
    installed Ray (``ray_`` prefixed; counters gain ``_total``, histograms ``_bucket``, ...)."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    serve = Path(next(iter(spec.submodule_search_locations))) / "serve"
    defined = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?f?\"(serve_[^\"]+)\"")
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for path in serve.rglob("*.py"):
        for kind, name in defined.findall(path.read_text()):
            for protocol in ("http", "grpc"):
                base = "ray_" + name.replace("{protocol_name}", protocol)
                names |= {base if base.endswith(s) and s else base + s for s in suffixes[kind]}
    assert "ray_serve_deployment_queued_queries" in names and "ray_serve_num_http_requests_total" in names
    return names


def test_every_series_the_rules_and_the_dashboard_read_is_exported(tmp_path: Path) -> None:
    mmembed = _exported(_app_exposition(tmp_path))
    assert {"mmembed_dead_letters", "mmembed_cache_hits_total", "mmembed_requests_total"} <= mmembed
    ray = _ray_serve_series()
    read = {name: "alerts.yml" for rule in _rules() for name in series_names(rule["expr"])}
    read |= {name: "the dashboard" for query in _dashboard_queries() for name in series_names(query)}
    assert any(n.startswith("mmembed_") for n in read) and any(n.startswith("ray_serve_") for n in read)
    unknown = sorted(f"{name} ({where})" for name, where in read.items() if name not in mmembed | ray | PROMETHEUS_OWN)
    assert not unknown, f"series nothing exports: {unknown}"


def test_a_misspelt_series_would_be_caught(tmp_path: Path) -> None:
    """The check above on names it must refuse: a typo, and a counter read without `_total`."""
    known = _exported(_app_exposition(tmp_path)) | _ray_serve_series()
    wrong = ("mmembed_item_error_total", "ray_serve_num_http_requests", "ray_serve_deployment_queued_queries_total")
    for name in wrong:
        assert name not in known, name
