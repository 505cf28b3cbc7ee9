"""Deployment files keep the properties the README promises."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config import load_config_text
from gateway.config_check import check_references

ROOT = Path(__file__).resolve().parent.parent


def _directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_systemd_unit_is_confined_and_restarts_except_on_config_errors():
    unit = _directives((ROOT / "systemd" / "sealgate.service").read_text())
    assert unit["User"] == "sealgate"
    assert unit["Type"] == "notify"
    assert unit["ProtectSystem"] == "strict"
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["ReadWritePaths"] == "/var/lib/sealgate"
    assert unit["StateDirectory"] == "sealgate"
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == "78"
    assert "--state-dir ${STATE_DIRECTORY}" in unit["ExecStart"]
    assert unit["ExecStart"].split()[1] == "run"


def test_dockerfile_runs_unprivileged_with_a_state_volume_and_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER sealgate$", text, re.M)
    assert re.search(r'^VOLUME \["/var/lib/sealgate"\]$', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*http://127\.0\.0\.1:10080/healthz", text, re.M)


def test_the_configuration_built_into_the_image_is_valid(tmp_path):
    lines = re.findall(r"^    '(.*)' \\$", (ROOT / "Dockerfile").read_text(), re.M)
    text = "\n".join(lines) + "\n"
    config = load_config_text(text.replace("/var/lib/sealgate", str(tmp_path)), "Dockerfile")
    check_references(config, "Dockerfile")
    assert str(config.listen.smtp) == "0.0.0.0:10025"
    assert str(config.listen.http) == "0.0.0.0:10080"
