"""Configuration: strict schema, precise errors, and the example kept in sync."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from gateway.config import Config, HostPort, load_config, load_config_text, schema_paths
from gateway.config_check import check_references
from gateway.errors import ConfigError
from gateway.smtp.auth import hash_password
from tests.conftest import run_sealgate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"


def test_embedded_defaults_are_the_documented_ones():
    cfg = Config()
    assert cfg.state_dir == Path("./var")
    assert cfg.listen.smtp == HostPort("127.0.0.1", 10025)
    assert cfg.listen.http == HostPort("127.0.0.1", 10080)
    assert cfg.delivery.port == 25
    assert cfg.relay.require_tls is True
    assert cfg.relay.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_example_file_loads_to_exactly_the_embedded_defaults():
    assert load_config(EXAMPLE) == Config()


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in schema_paths():
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_example_file_documents_every_option_in_the_schema_and_nothing_else():
    in_example = _leaf_keys(yaml.safe_load(EXAMPLE.read_text()))
    assert sorted(in_example) == sorted(schema_paths())


def test_every_option_in_the_example_has_a_comment_above_it():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert lines[i - 1].strip().startswith("#"), f"undocumented option: {line}"


def test_every_schema_field_has_documentation():
    for path, f in schema_paths().items():
        assert len(f.metadata.get("doc", "")) > 10, path


def test_unknown_key_is_rejected_with_its_path_line_and_a_hint():
    text = "listen:\n  smtp: 127.0.0.1:2525\nrelay:\n  netwroks: [10.0.0.0/8]\n"
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "gw.yaml")
    assert str(e.value) == "gw.yaml:4: relay.netwroks: unknown key (did you mean 'networks'?)"


def test_duplicate_key_is_rejected():
    with pytest.raises(ConfigError, match=r"gw.yaml:3: relay.require_tls: key appears twice"):
        load_config_text("relay:\n  require_tls: true\n  require_tls: false\n", "gw.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "relay:\n  networks: [10.0.0.0/8, 10.0.0.1/33]\n",
            r"gw.yaml:2: relay.networks\[1\]: '10.0.0.1/33' is not a network in CIDR form",
        ),
        (
            "relay:\n  networks:\n    - 192.168.1.1/24\n",
            r"gw.yaml:3: relay.networks\[0\]: .*has host bits set",
        ),
        (
            "listen:\n  smtp: 127.0.0.1:99999\n",
            r"gw.yaml:2: listen.smtp: port 99999 is out of range",
        ),
        ("listen:\n  http: localhost\n", r"listen.http: 'localhost' has no port"),
        (
            "smtp:\n  command_timeout: 5 minutes\n",
            r"smtp.command_timeout: '5 minutes' is not a duration",
        ),
        ("smtp:\n  max_message_size: 10 potatoes\n", r"smtp.max_message_size: .* is not a size"),
        ("smtp:\n  max_recipients: 0\n", r"smtp.max_recipients: must be at least 1"),
        (
            "archive:\n  retention_rules: [{days: 10, mode: fax}]\n",
            r"archive.retention_rules\[0\].mode: 'fax' is not a mode",
        ),
        (
            "archive:\n  retention_rules: [{mode: tls}]\n",
            r"archive.retention_rules\[0\]: .*days",
        ),
        (
            "archive:\n  api_tokens: [{name: x, role: auditor, token_sha256: abc}]\n",
            r"archive.api_tokens\[0\].token_sha256: must be 64 lower-case hex digits",
        ),
        (
            "archive:\n  api_tokens: [{name: x, role: root, token_sha256: abc}]\n",
            r"archive.api_tokens\[0\].role: 'root' is not one of",
        ),
        ("smtp:\n  max_recipients: many\n", r"smtp.max_recipients: 'many' is not a whole number"),
        ("smtp:\n  max_line_length: 500\n", r"smtp.max_line_length: must be at least 1000"),
        (
            "relay:\n  require_tls: yes please\n",
            r"relay.require_tls: 'yes please' is not true or false",
        ),
        ("tls:\n  min_version: '1.1'\n", r"tls.min_version: '1.1' is not one of: 1.2, 1.3"),
        (
            "dns:\n  nameservers: [ns1.example]\n",
            r"dns.nameservers\[0\]: 'ns1.example' is not an IP",
        ),
        (
            "relay:\n  sender_domains: [clinic.test, 'not a domain']\n",
            r"gw.yaml:2: relay.sender_domains\[1\]: 'not a domain' is not a domain",
        ),
        (
            "relay:\n  dkim_domains: [localhost]\n",
            r"relay.dkim_domains\[0\]: 'localhost' is not a domain",
        ),
        (
            "relay:\n  m365_tenant_ids: [contoso]\n",
            r"relay.m365_tenant_ids\[0\]: 'contoso' is not a tenant id \(a GUID",
        ),
        ("portal:\n  auth: oidc\n", r"portal.auth: 'oidc' needs at least one entry"),
        (
            "portal:\n  oidc_providers: [{name: x, issuer: 'http://idp.example', client_id: c}]\n",
            r"portal.oidc_providers\[0\].issuer: 'http://idp.example' is not an https://",
        ),
        (
            "relay:\n  client_certs: ['CN=foo']\n",
            r"relay.client_certs\[0\]: 'CN=foo' is not a certificate pattern",
        ),
        (
            "relay:\n  client_certs: ['sha256:abcd']\n",
            r"client_certs\[0\]: a sha256 fingerprint has 64 hex digits",
        ),
        (
            "tls:\n  cert_file: /etc/x.pem\n",
            r"tls.key_file: set tls.cert_file and tls.key_file together",
        ),
        (
            "smtp:\n  marker_header: 'X Bad'\n",
            r"smtp.marker_header: 'X Bad' is not a valid header field name",
        ),
        ("relay: [1, 2]\n", r"relay: expected a mapping of keys"),
        ("- a\n- b\n", r"the configuration must be a mapping"),
        ("relay:\n  networks: [\n", r"gw.yaml:\d+: not valid YAML"),
    ],
)
def test_bad_values_name_the_exact_key(text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config_text(text, "gw.yaml")


def test_values_with_units_are_converted():
    cfg = load_config_text(
        "smtp:\n  command_timeout: 5m\n  max_message_size: 25MiB\n"
        "  data_timeout: 90\ndns:\n  nameservers: ['127.0.0.1:5353', '::1']\n"
    )
    assert cfg.smtp.command_timeout == 300
    assert cfg.smtp.data_timeout == 90
    assert cfg.smtp.max_message_size == 25 * 1024 * 1024
    assert [str(n) for n in cfg.dns.nameservers] == ["127.0.0.1:5353", "[::1]:53"]


# -- what the configuration refers to ------------------------------------------------


def _cfg(tmp_path: Path, text: str) -> Config:
    return load_config_text(f"state_dir: {tmp_path / 'state'}\n" + text, "gw.yaml")


def test_missing_certificate_file_is_named(tmp_path, pki):
    cfg = _cfg(tmp_path, f"tls:\n  cert_file: {tmp_path}/nope.pem\n  key_file: {pki.server_key}\n")
    with pytest.raises(ConfigError, match=r"tls.cert_file: .*nope.pem does not exist"):
        check_references(cfg, "gw.yaml")


def test_certificate_that_does_not_match_the_key_is_refused(tmp_path, pki):
    other = pki.ca.issue_cert("other.test")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    cfg = _cfg(tmp_path, f"tls:\n  cert_file: {pki.server_cert}\n  key_file: {other_key}\n")
    with pytest.raises(ConfigError, match=r"tls.key_file: .* does not match the certificate"):
        check_references(cfg, "gw.yaml")


def test_a_non_pem_certificate_is_refused(tmp_path, pki):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    cfg = _cfg(tmp_path, f"tls:\n  cert_file: {junk}\n  key_file: {pki.server_key}\n")
    with pytest.raises(ConfigError, match=r"tls.cert_file: .*junk.pem holds no PEM certificate"):
        check_references(cfg, "gw.yaml")


def test_state_dir_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = load_config_text(f"state_dir: {blocker}/state\n", "gw.yaml")
    with pytest.raises(ConfigError, match=r"state_dir: .*file is not a directory"):
        check_references(cfg, "gw.yaml")


def test_users_file_with_a_bad_line_is_refused_with_its_line_number(tmp_path):
    users = tmp_path / "users"
    users.write_text(f"ok:{hash_password('pw')}\nbroken-line\n")
    cfg = _cfg(tmp_path, f"relay:\n  users_file: {users}\n")
    with pytest.raises(
        ConfigError, match=r"relay.users_file: .*users: line 2: expected 'user:hash'"
    ):
        check_references(cfg, "gw.yaml")


def test_users_file_with_a_plaintext_password_is_refused(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    cfg = _cfg(tmp_path, f"relay:\n  users_file: {users}\n")
    with pytest.raises(ConfigError, match=r"line 1: the hash for 'alice' is not"):
        check_references(cfg, "gw.yaml")


def test_a_good_configuration_passes_every_check(tmp_path, pki):
    users = tmp_path / "users"
    users.write_text(f"m365:{hash_password('pw')}\n")
    cfg = _cfg(
        tmp_path,
        f"tls:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"relay:\n  users_file: {users}\n  client_ca_file: {pki.ca_file}\n",
    )
    check_references(cfg, "gw.yaml")


# -- the command line ----------------------------------------------------------------


def test_check_config_accepts_the_example():
    result = run_sealgate("check-config", "--config", str(EXAMPLE), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_config_warns_when_a_shared_certificate_relays_with_no_binding(tmp_path):
    config = tmp_path / "exo.yaml"
    config.write_text(
        f"state_dir: {tmp_path}/s\nrelay:\n  client_certs: ['cn:mail.protection.outlook.com']\n"
    )
    result = run_sealgate("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning: relaying is authorized by relay.client_certs" in result.stderr
    assert "every tenant" in result.stderr and "relay.dkim_domains" in result.stderr
    config.write_text(config.read_text() + "  dkim_domains: [clinic.test]\n")
    result = run_sealgate("check-config", "--config", str(config))
    assert result.returncode == 0 and "warning" not in result.stderr
    # shared address ranges too; the organisation's own private ranges are not shared
    config.write_text(f"state_dir: {tmp_path}/s\nrelay:\n  networks: [40.92.0.0/15]\n")
    assert (
        "relay.networks (40.92.0.0/15)"
        in run_sealgate("check-config", "--config", str(config)).stderr
    )
    config.write_text(f"state_dir: {tmp_path}/s\nrelay:\n  networks: [10.0.0.0/8]\n")
    assert "warning" not in run_sealgate("check-config", "--config", str(config)).stderr


def test_check_config_exits_78_naming_the_key_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp:\n  max_recipients: -4\n")
    result = run_sealgate("check-config", "--config", str(bad))
    assert result.returncode == 78
    assert result.stderr.strip() == (
        f"sealgate: configuration error: {bad}:2: smtp.max_recipients: must be at least 1"
    )


def test_check_config_reports_a_missing_config_file(tmp_path):
    result = run_sealgate("check-config", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 78
    assert "cannot read the configuration file: No such file or directory" in result.stderr


def test_run_refuses_to_start_on_a_bad_config_with_the_same_message(tmp_path, pki):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"state_dir: {tmp_path}/s\ntls:\n  cert_file: {pki.server_cert}\n"
        f"  key_file: {tmp_path}/missing.key\n"
    )
    check = run_sealgate("check-config", "--config", str(bad))
    run = run_sealgate("run", "--config", str(bad))
    assert run.returncode == check.returncode == 78
    assert run.stderr == check.stderr
    assert "tls.key_file:" in run.stderr and "missing.key does not exist" in run.stderr
    assert not (tmp_path / "s").exists()  # nothing was started or created
