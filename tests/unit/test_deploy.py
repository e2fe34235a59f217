"""The monitoring files in deploy/ and the compose profile that runs them.

The alert rules are checked and unit-tested by ``promtool`` (Debian's ``prometheus`` package);
the compose file cannot be run here (no Docker), so it is read: every file it mounts exists and
the addresses in the Prometheus and Grafana files agree with the services it defines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "milestones.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("MILESTONES_REQUIRE_TOOLS") == "1":
            pytest.fail("promtool not found (apt-get install prometheus) and MILESTONES_REQUIRE_TOOLS=1")
        pytest.skip("promtool not found: apt-get install prometheus")
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"]
            for rule in group["rules"] if "alert" in rule]


def metric_names(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bmilestones_[a-z0-9_]+", text):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)].endswith("_seconds"):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in run_promtool("test", "rules", "alerts.test.yml")


def test_prometheus_config_passes_promtool_check() -> None:
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")


def test_every_alert_has_a_firing_unit_test_and_a_line_in_the_operations_guide() -> None:
    tests = load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case.get("exp_alerts")}
    silent = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if not case.get("exp_alerts")}
    guide = (ROOT / "docs" / "operations.md").read_text()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) >= 5
    for name in names:
        assert name in fired, f"{name}: no test sees it fire"
        assert name in silent, f"{name}: no test sees it stay silent"
        assert re.search(rf"^### {name}\n\n\S", guide, re.M), f"{name}: no entry in docs/operations.md"
        rule = next(rule for rule in alerts() if rule["alert"] == name)
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"


def test_dashboard_and_rules_name_only_metrics_the_engine_exports() -> None:
    referenced = metric_names(DASHBOARD.read_text()) | metric_names(
        (PROMETHEUS / "alerts.yml").read_text())
    assert referenced - set(Metrics.names()) == set()
    # The list: throughput, lag, latencies, dead letters by reason, pending age, retries.
    for name in ("milestones_events_total", "milestones_consumer_lag",
                 "milestones_counting_latency_seconds", "milestones_notification_latency_seconds",
                 "milestones_dead_letters_total", "milestones_oldest_pending_age_seconds",
                 "milestones_batch_retries_total"):
        assert name in referenced, name


def test_dashboard_panels_read_the_datasource_variable_and_have_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["expr"] for target in panel["targets"])


def test_compose_monitoring_profile_mounts_existing_files_and_addresses_agree() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    monitoring = {name for name, spec in services.items() if "monitoring" in spec.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    mounts: dict[str, dict[str, Path]] = {}
    for name in monitoring:
        mounts[name] = {}
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
                mounts[name][target] = ROOT / source
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"

    # Prometheus: its config and rules where the image's default flags read them.
    prometheus_dir = mounts["prometheus"]["/etc/prometheus"]
    config = load_yaml(prometheus_dir / "prometheus.yml")
    assert all((prometheus_dir / rules).exists() for rules in config["rule_files"])
    port = services["engine"]["environment"]["MILESTONES_METRICS_PORT"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"engine:{port}"]
    assert config["scrape_configs"][0]["job_name"] in json.dumps(alerts())  # MilestonesEngineDown

    # Grafana: the datasource is the prometheus service; the provider reads the mounted JSON.
    datasources = mounts["grafana"]["/etc/grafana/provisioning/datasources"]
    (source,) = load_yaml(datasources / "prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert services["prometheus"]["ports"] == ["9090:9090"]
    providers = mounts["grafana"]["/etc/grafana/provisioning/dashboards"]
    (provider,) = load_yaml(providers / "milestones.yml")["providers"]
    dashboards = mounts["grafana"][provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).read_text() == DASHBOARD.read_text()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
