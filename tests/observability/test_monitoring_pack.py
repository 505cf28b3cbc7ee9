"""The monitoring pack in contrib/: the alerting rules pass Prometheus's own checks
and unit tests (promtool, Debian's prometheus package), and every query of the
rules and the Grafana dashboard reads metrics - and labels - the gateway exposes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.observability.metrics import Metrics

CONTRIB = Path(__file__).parents[2] / "contrib"
ALERTS = CONTRIB / "prometheus" / "alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "sealgate.json"
# labels Prometheus adds when it scrapes, and a histogram's buckets
ADDED = {"instance", "job", "le"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed() -> dict[str, set[str]]:
    """Every series name the gateway's /metrics can show -> its label names."""
    names: dict[str, set[str]] = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            base = value._name  # noqa: SLF001 - the name and labels as declared
            for suffix in SUFFIXES[value._type]:  # noqa: SLF001
                names[base + suffix] = set(value._labelnames)  # noqa: SLF001
    return names


def expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    found = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        found += [(f"panel {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
    return found


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and "SUCCESS: 16 rules found" in checked.stdout, checked
    tested = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"],
        cwd=ALERTS.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@pytest.mark.parametrize(("where", "expr"), expressions())
def test_every_query_reads_metrics_and_labels_the_gateway_exposes(where, expr):
    names = exposed()
    used = set(re.findall(r"\bsealgate_\w+", expr))
    assert used, f"{where}: reads no sealgate metric"
    assert used <= set(names), f"{where}: no such metric {used - set(names)}"
    known = set().union(*(names[n] for n in used)) | ADDED
    for name, matchers in re.findall(r"\b(sealgate_\w+)\{([^}]*)\}", expr):
        keys = set(re.findall(r"(\w+)\s*[=!~]", matchers))
        assert keys <= names[name] | ADDED, f"{where}: {name} has no label {keys - names[name]}"
    for grouped in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        keys = {k.strip() for k in grouped.split(",") if k.strip()}
        assert keys <= known, f"{where}: grouped by unknown labels {keys - known}"


def test_the_dashboard_covers_what_the_issue_names_and_loads_nothing_from_outside():
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard)
    for metric in (
        "sealgate_messages_accepted_total",  # acceptance
        "sealgate_delivery_attempts_total",  # delivery rates, TLS versions, verification
        "sealgate_policy_decisions_total",  # modes
        "sealgate_queue_recipients",  # queue by state
        "sealgate_queue_oldest_message_age_seconds",
        "sealgate_portal_pickups_total",
        "sealgate_archive_last_verify_ok",  # archive health
        "sealgate_certificate_expiry_timestamp_seconds",
        "sealgate_cluster_nodes",
    ):
        assert metric in text, metric
    assert "http://" not in text and "https://" not in text
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
