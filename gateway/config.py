"""Typed configuration: every option, its default and its documentation in one place.

A configuration file is YAML.  Every key is declared below as a field of a frozen
dataclass; the field's ``doc`` metadata is what ``config.example.yaml`` documents (a
test keeps the two in sync).  Loading is strict:

- an unknown or duplicated key is an error, with a "did you mean" hint;
- every value is converted to its declared type (durations such as ``5m``, sizes
  such as ``25MiB``, ``host:port`` listen addresses, CIDR networks);
- an error names the exact key (``relay.networks[1]``) and the line of the file.

This module checks the *shape* of the configuration only; `gateway.config_check`
checks what the configuration refers to (files, directories, certificates).

Failure: `ConfigError` (see `gateway.errors`); nothing is started on a bad config.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import re
import types
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from gateway.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def doc(text: str) -> dict[str, str]:
    """Field metadata: the documentation shown in config.example.yaml."""
    return {"doc": text}


# --- value types ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostPort:
    """A listen or connect address: ``127.0.0.1:10025``, ``[::1]:25``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NameServer(HostPort):
    """A resolver address: ``ip`` or ``ip:port`` (port 53 when omitted)."""


@dataclass(frozen=True)
class NextHopAddress(HostPort):
    """A route's next hop: ``host`` or ``host:port``; port 0 means ``delivery.port``."""

    def __str__(self) -> str:
        return self.host if self.port == 0 else super().__str__()


class Duration(float):
    """Seconds; written as a number or with a unit: ``30s``, ``5m``, ``1h``, ``2d``."""


class Size(int):
    """Bytes; written as a number or with a unit: ``512KiB``, ``25MiB``, ``10MB``."""


class DomainPattern(str):
    """A domain (``example.org``: that domain only) or, with a leading dot
    (``.example.org``), every subdomain of it; lower case, A-labels."""

    __slots__ = ()

    def matches(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if self.startswith("."):
            return domain.endswith(self) and len(domain) > len(self)
        return domain == self


class TenantId(str):
    """A Microsoft 365 tenant id: a GUID, lower case."""

    __slots__ = ()


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (write e.g. 30s, 5m, 1h, 2d)")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return Duration(seconds)


def parse_size(value: Any) -> Size:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 25MiB")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size (write e.g. 512KiB, 25MiB, 10MB)")
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return Size(size)


def parse_hostport(value: Any, default_port: int | None = None, listen: bool = False) -> HostPort:
    """``host:port``; ``listen``: an address to listen on, where port 0 means any free
    port (the one taken is logged at start, ``app.ready``)."""
    text = str(value).strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?", text) or re.fullmatch(
        r"([^:\[\]\s]+)(?::(\d+))?", text
    )
    if not m:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:25)")
    host, port_text = m.group(1), m.group(2)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (write host:port)")
        port = default_port
    else:
        port = int(port_text)
    if not (0 if listen else 1) <= port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")
    return HostPort(host, port)


def parse_nameserver(value: Any) -> NameServer:
    text = str(value).strip()
    try:  # a bare IPv6 address has colons but no port
        ipaddress.IPv6Address(text)
        text = f"[{text}]"
    except ValueError:
        pass
    hp = parse_hostport(text, default_port=53)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        raise ValueError(
            f"{hp.host!r} is not an IP address (nameservers are ip or ip:port)"
        ) from None
    return NameServer(hp.host, hp.port)


def parse_next_hop(value: Any) -> NextHopAddress:
    text = str(value).strip()
    if text.count(":") == 0 or (text.startswith("[") and text.endswith("]")):
        hp = parse_hostport(text, default_port=1)
        return NextHopAddress(hp.host, 0)
    hp = parse_hostport(text)
    return NextHopAddress(hp.host, hp.port)


def parse_domain_pattern(value: Any) -> DomainPattern:
    text = str(value).strip().rstrip(".")
    dot, name = (".", text[1:]) if text.startswith(".") else ("", text)
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        name = ""
    if not name or not _DOMAIN.fullmatch(name) or "." not in name:
        raise ValueError(
            f"{value!r} is not a domain ('example.org', or '.example.org' for its subdomains)"
        )
    return DomainPattern(dot + name)


def parse_tenant_id(value: Any) -> TenantId:
    try:
        return TenantId(str(uuid.UUID(str(value).strip())))
    except ValueError:
        raise ValueError(
            f"{value!r} is not a tenant id (a GUID such as 72f988bf-86f1-41af-91ab-2d7cd011db47)"
        ) from None


def parse_network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a network in CIDR form ({e})") from None


# --- the schema ----------------------------------------------------------------------


@dataclass(frozen=True)
class ListenConfig:
    smtp: HostPort = field(
        default=HostPort("127.0.0.1", 10025),
        metadata=doc(
            "Address and port of the SMTP listener (STARTTLS on the same port). Port 0 on "
            "any listener: a free port, named in the app.ready log line."
        ),
    )
    http: HostPort = field(
        default=HostPort("127.0.0.1", 10080),
        metadata=doc("Address and port of the ops HTTP listener: /metrics, /healthz, /readyz."),
    )


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path | None = field(
        default=None,
        metadata=doc(
            "PEM certificate (chain) for STARTTLS. null: a self-signed certificate is "
            "generated on first start under <state_dir>/tls/."
        ),
    )
    key_file: Path | None = field(
        default=None,
        metadata=doc("PEM private key for cert_file. Set both or neither."),
    )
    ca_file: Path | None = field(
        default=None,
        metadata=doc(
            "Extra PEM CA certificates trusted when verifying recipients' servers, "
            "besides the system store."
        ),
    )
    min_version: Literal["1.2", "1.3"] = field(
        default="1.2", metadata=doc("Lowest TLS version accepted from clients: 1.2 or 1.3.")
    )


@dataclass(frozen=True)
class RelayConfig:
    networks: tuple[IPNetwork, ...] = field(
        default=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        metadata=doc(
            "Client networks (CIDR) allowed to relay. Microsoft 365 and Google Workspace "
            "addresses are shared by all tenants: bind them with dkim_domains."
        ),
    )
    client_certs: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "TLS client certificates allowed to relay, one pattern each: "
            "'sha256:<fingerprint>', 'cn:<subject common name>' or 'san:<DNS name>' "
            "('*.' matches one left-most label). The certificate must also chain to a "
            "trusted CA (system store plus client_ca_file). Empty: no certificate is asked for."
        ),
    )
    client_ca_file: Path | None = field(
        default=None,
        metadata=doc(
            "Extra PEM CA certificates for verifying client certificates (a self-signed "
            "client certificate pinned by sha256 goes here too)."
        ),
    )
    users_file: Path | None = field(
        default=None,
        metadata=doc(
            "SMTP AUTH users: one 'user:hash' per line, hashes made by "
            "'sealgate hash-password', optionally ':senders' - a comma-separated list of "
            "the envelope senders the user may use (alice@example.org, example.org, "
            ".example.org for subdomains); others get 550 5.7.1 at MAIL. AUTH is offered "
            "only after STARTTLS. null: no AUTH."
        ),
    )
    require_tls: bool = field(
        default=True,
        metadata=doc("Refuse MAIL before STARTTLS with 530 5.7.0."),
    )
    sender_domains: tuple[DomainPattern, ...] = field(
        default=(),
        metadata=doc(
            "Your own sender domains. When set, a relayed message's envelope sender must "
            "be at one of them ('.example.org' for its subdomains; the domain itself is "
            "listed separately), else 550 5.7.1 at MAIL. The null sender <> passes only "
            "when dkim_domains binds the message. Empty: any sender."
        ),
    )
    dkim_domains: tuple[DomainPattern, ...] = field(
        default=(),
        metadata=doc(
            "Binds relaying to your tenant when it is authorized by a shared client "
            "certificate or shared networks (Microsoft 365, Google Workspace): the message "
            "must carry a valid DKIM signature whose d= is exactly one of these domains "
            "(your own and your <tenant>.onmicrosoft.com) and equals the From domain "
            "('.example.org': From at a subdomain of a d=example.org signature). Every "
            "signature is checked; From must be signed; l= is refused; rsa-sha1 and keys "
            "under 1024 bits are refused. Else 550 5.7.1 after DATA, nothing kept; no "
            "answer from DNS for the key: 451 4.4.3. Empty: not checked."
        ),
    )
    m365_tenant_ids: tuple[TenantId, ...] = field(
        default=(),
        metadata=doc(
            "Your Microsoft 365 tenant id(s) (GUID). When set, a message relayed by a "
            "client certificate or relay.networks must carry at least one "
            "X-MS-Exchange-CrossTenant-Id header and every one must be among these, else "
            "550 5.7.1 after DATA. Exchange Online stamps it but does not document it as "
            "guaranteed: a second check beside dkim_domains, not instead of it."
        ),
    )


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str | None = field(
        default=None,
        metadata=doc("Name in the greeting, EHLO and Received header. null: the host's FQDN."),
    )
    workers: int = field(
        default=0,
        metadata=doc(
            "SMTP worker processes sharing the listener. 0: one per CPU core; 1: SMTP runs "
            "in the main process. Connection limits apply per worker, divided evenly."
        ),
    )
    worker_nice: int = field(
        default=0,
        metadata=doc(
            "Scheduling niceness added to the SMTP worker processes (0-19). Above 0, "
            "delivery comes first when the CPU is saturated: senders wait longer for "
            "250 instead of the queue growing. 0: the same priority as delivery."
        ),
    )
    max_message_size: Size = field(
        default=Size(50 * 1024**2),
        metadata=doc("Largest message accepted (advertised as SIZE); larger gets 552 5.3.4."),
    )
    max_recipients: int = field(
        default=1000,
        metadata=doc("Recipients per message; more get 452 4.5.3 (the client sends them later)."),
    )
    max_line_length: int = field(
        default=1000,
        metadata=doc(
            "Longest line of message data in octets, CRLF included (RFC 5321 4.5.3.1.6: "
            "1000). A longer line rejects the message with 500 5.5.2."
        ),
    )
    max_connections: int = field(
        default=500, metadata=doc("Concurrent SMTP connections in total; more get 421 4.7.0.")
    )
    max_connections_per_ip: int = field(
        default=50, metadata=doc("Concurrent SMTP connections from one client IP address.")
    )
    command_timeout: Duration = field(
        default=Duration(300),
        metadata=doc("Idle time allowed between commands before 421 4.4.2 and disconnect."),
    )
    data_timeout: Duration = field(
        default=Duration(300),
        metadata=doc("Idle time allowed while receiving message data."),
    )
    max_received_headers: int = field(
        default=50,
        metadata=doc("A message with more Received headers is a mail loop: 554 5.4.6."),
    )
    max_auth_failures: int = field(
        default=3, metadata=doc("Failed AUTH attempts on one connection before it is closed.")
    )
    max_auth_failures_per_ip: int = field(
        default=10,
        metadata=doc(
            "Failed AUTH attempts from one client address, over all its connections, "
            "within auth_failure_window; further attempts get 454 4.7.0 before any "
            "password is checked. Divided among SMTP workers like the connection limits."
        ),
    )
    max_auth_failures_per_user: int = field(
        default=10,
        metadata=doc(
            "Failed AUTH attempts for one user name, from any address, within "
            "auth_failure_window; then 454 4.7.0 until the window has passed."
        ),
    )
    auth_failure_window: Duration = field(
        default=Duration(900),
        metadata=doc("How long a failed AUTH attempt counts against its address and user."),
    )
    marker_header: str = field(
        default="X-Sealgate-Processed",
        metadata=doc(
            "Header added to every accepted message. Exclude it in the Microsoft 365 / "
            "Google mail-flow rule that routes mail to Sealgate, so mail is never looped."
        ),
    )


@dataclass(frozen=True)
class SpoolConfig:
    io_threads: int = field(
        default=2,
        metadata=doc(
            "Threads (per SMTP worker) writing and fsyncing spool files: large messages, "
            "and small ones while the disk is slow (small ones are otherwise fsynced on "
            "the worker's event loop). More overlap fsyncs on slow disks but contend for "
            "the interpreter lock."
        ),
    )
    min_free_space: Size = field(
        default=Size(64 * 1024**2),
        metadata=doc(
            "Free space the spool's file system keeps for the queue state and the "
            "archive: with less (plus the message's SIZE), MAIL gets 452 4.3.1 and "
            "/readyz answers 503, so a full disk never stops results being recorded."
        ),
    )


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[NameServer, ...] = field(
        default=(),
        metadata=doc("Resolvers for delivery lookups, 'ip' or 'ip:port'. Empty: the system's."),
    )
    dnssec: Literal["ignore", "trust-ad"] = field(
        default="ignore",
        metadata=doc(
            "'trust-ad': the resolvers validate DNSSEC and are reached over a trusted path "
            "(e.g. unbound on loopback), so their AD bit is believed and DANE (TLSA) "
            "applies to MX hosts. 'ignore': the AD bit means nothing, no DANE."
        ),
    )


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = field(default=25, metadata=doc("TCP port of recipients' mail servers."))
    smart_host: NextHopAddress | None = field(
        default=None,
        metadata=doc(
            "Send everything not in 'routes' to this host or host:port (no MX lookup). "
            "null: look up MX records."
        ),
    )
    max_mx_hosts: int = field(
        default=5, metadata=doc("MX hosts tried per delivery attempt, lowest preference first.")
    )
    connect_timeout: Duration = field(
        default=Duration(15), metadata=doc("Time allowed to connect and get the greeting.")
    )
    command_timeout: Duration = field(
        default=Duration(300), metadata=doc("Time allowed for each SMTP command's reply.")
    )
    concurrency: int = field(
        default=100,
        metadata=doc(
            "Delivery sessions open at once, in total. Destinations whose last attempt "
            "was slow (10 s or more; quick again after one under 2.5 s) share a quarter "
            "of them (and borrow what the others leave idle of three quarters once none "
            "of theirs has waited for a place for 30 s), destinations not tried yet "
            "another quarter; quick ones keep the rest. A session that has waited a "
            "minute on its server (a tarpit) gives up its place."
        ),
    )
    concurrency_per_destination: int = field(
        default=10,
        metadata=doc(
            "Delivery sessions open at once to one recipient domain. A slow one (10 s "
            "or more an attempt) starts at 2, one more for each attempt that delivers."
        ),
    )
    retry_schedule: tuple[Duration, ...] = field(
        default=tuple(Duration(s) for s in (60, 300, 900, 1800, 3600, 7200, 14400)),
        metadata=doc(
            "Waits between attempts for a deferred recipient; the last repeats. "
            "Each wait varies by up to 10% so retries do not come in bursts. A "
            "destination none of whose hosts can be reached waits the same way after "
            "as many failures in a row, its other recipients deferred without a "
            "connection each."
        ),
    )
    max_queue_lifetime: Duration = field(
        default=Duration(5 * 86400),
        metadata=doc(
            "A recipient still deferred after this long fails, and the sender gets "
            "a delivery status notification."
        ),
    )
    delay_warning: Duration = field(
        default=Duration(4 * 3600),
        metadata=doc(
            "A sender whose message still has recipients waiting after this long is "
            "told once: a delivery status notification with 'Action: delayed' and no "
            "content (as Postfix's delay_warning_time). As long as max_queue_lifetime "
            "or longer: never."
        ),
    )
    reuse_idle_time: Duration = field(
        default=Duration(2),
        metadata=doc(
            "An outbound session is kept open this long after its message, for the "
            "next message to the same server at the same TLS level - or as long as it "
            "took to open (a slow server), up to a minute."
        ),
    )
    reuse_max_age: Duration = field(
        default=Duration(300), metadata=doc("An outbound session is not reused once this old.")
    )
    reuse_max_messages: int = field(
        default=100, metadata=doc("Messages sent over one outbound session; 1: no reuse.")
    )
    copy_memory: Size = field(
        default=Size(512 * 1024**2),
        metadata=doc(
            "Memory the recipients' own copies (S/MIME, PGP) being made and sent may "
            "hold at once, each counted as seven times the message; an attempt whose "
            "copy does not fit waits its turn, and one larger than this goes alone."
        ),
    )
    history_retention: Duration = field(
        default=Duration(7 * 86400),
        metadata=doc(
            "Finished messages' recipient states, attempts and evidence stay in the queue "
            "database ('sealgate queue show') this long after the last recipient is final "
            "(longer while a message's spool file waits for the archive to take it)."
        ),
    )


@dataclass(frozen=True)
class MtaStsConfig:
    enabled: bool = field(
        default=True,
        metadata=doc(
            "Apply recipient domains' MTA-STS policies (RFC 8461) to deliveries by MX: "
            "under 'enforce', only the policy's MX hosts, over verified TLS."
        ),
    )
    port: int = field(
        default=443,
        metadata=doc("HTTPS port of mta-sts.<domain> policy hosts (443; another for a proxy)."),
    )
    fetch_timeout: Duration = field(
        default=Duration(60), metadata=doc("Time allowed to fetch one policy over HTTPS.")
    )


@dataclass(frozen=True)
class SmimeConfig:
    signing_cert_file: Path | None = field(
        default=None,
        metadata=doc(
            "PEM certificate of the organisation: S/MIME copies are signed with it "
            "(detached, SHA-256) before they are encrypted. null: not signed."
        ),
    )
    signing_key_file: Path | None = field(
        default=None, metadata=doc("Unencrypted PEM private key of signing_cert_file.")
    )
    subject: str | None = field(
        default=None,
        metadata=doc(
            "Subject of every S/MIME copy, e.g. 'Secure message' (the subject is not "
            "encrypted and can carry PHI). null: the original subject."
        ),
    )


@dataclass(frozen=True)
class PgpConfig:
    signing_key_file: Path | None = field(
        default=None,
        metadata=doc(
            "The organisation's OpenPGP secret key (unprotected, armored or binary): PGP "
            "copies are signed with it before they are encrypted. null: not signed."
        ),
    )


@dataclass(frozen=True)
class DkimDomainKeyConfig:
    selector: str = field(
        metadata=doc(
            "Selector (s=): the public key is the TXT record <selector>._domainkey.<domain>."
        )
    )
    key_file: Path = field(
        metadata=doc("Unencrypted PEM private key: RSA (2048 bits or more advised) or Ed25519.")
    )


@dataclass(frozen=True)
class DkimConfig:
    domain: str | None = field(
        default=None,
        metadata=doc(
            "Signing domain (d=) of the one key for every From domain (see keys for one "
            "key per domain). null: only keys applies; with neither, copies are not "
            "signed (a changed copy still loses the original signature)."
        ),
    )
    selector: str | None = field(
        default=None,
        metadata=doc(
            "Selector (s=): the public key is the TXT record <selector>._domainkey.<domain>."
        ),
    )
    key_file: Path | None = field(
        default=None,
        metadata=doc("Unencrypted PEM private key: RSA (2048 bits or more advised) or Ed25519."),
    )
    keys: dict[str, DkimDomainKeyConfig] = field(
        default_factory=dict,
        metadata=doc(
            "Signing keys per From domain, '<domain>: {selector, key_file}'. A changed copy "
            "is signed with the key of its From domain, or of the nearest parent domain "
            "listed (DMARC's relaxed alignment accepts it); a From domain with neither "
            "uses domain/selector/key_file above when set (a signature not aligned with "
            "From) or goes unsigned - counted in sealgate_dkim_copies_total and logged; "
            "the policy's fact dkim_key is false for such a message."
        ),
    )
    sign: Literal["changed", "all"] = field(
        default="changed",
        metadata=doc(
            "'changed': sign only the copies the gateway changed (encrypted, subject tag "
            "removed); copies sent as received keep their original signature untouched. "
            "'all': sign every copy (the original signature stays too)."
        ),
    )


@dataclass(frozen=True)
class WkdConfig:
    enabled: bool = field(
        default=True,
        metadata=doc(
            "Ask a recipient's domain for their OpenPGP key (Web Key Directory) when the "
            "key directory has none; the policy decides whether such a key is used "
            "(discovered_keys)."
        ),
    )
    port: int = field(
        default=443, metadata=doc("HTTPS port of WKD hosts (443; another for a proxy).")
    )
    timeout: Duration = field(default=Duration(10), metadata=doc("Time allowed for one lookup."))
    cache_ttl: Duration = field(
        default=Duration(86400), metadata=doc("A key found (or a 404) is trusted this long.")
    )
    negative_ttl: Duration = field(
        default=Duration(3600), metadata=doc("A lookup that failed is tried again after this long.")
    )


@dataclass(frozen=True)
class PolicyConfig:
    file: Path | None = field(
        default=None,
        metadata=doc(
            "The policy that decides, per recipient, how mail is protected (verified TLS, "
            "S/MIME, PGP or the portal): see policies/README.md. null: the embedded "
            "default (policies/default.yaml)."
        ),
    )


@dataclass(frozen=True)
class ProbeConfig:
    cache_ttl: Duration = field(
        default=Duration(3600),
        metadata=doc("What probing learned about a recipient domain is used this long."),
    )
    negative_ttl: Duration = field(
        default=Duration(300),
        metadata=doc(
            "A probe that reached no server of a domain (or failed in DNS) is repeated "
            "after this long."
        ),
    )
    connect_timeout: Duration = field(
        default=Duration(10),
        metadata=doc("Time allowed to connect to a server and get its greeting."),
    )
    timeout: Duration = field(
        default=Duration(30), metadata=doc("Time allowed to probe one server, start to QUIT.")
    )
    concurrency: int = field(default=100, metadata=doc("Probe connections open at once, in total."))


@dataclass(frozen=True)
class MasterKeyConfig:
    id: str = field(metadata=doc("Key id, recorded with every record sealed under it."))
    file: Path = field(metadata=doc("32 random bytes (raw, or 64 hex digits), mode 0600."))


@dataclass(frozen=True)
class RetentionRuleConfig:
    days: int = field(metadata=doc("Keep matching messages this many days."))
    sender: str | None = field(default=None, metadata=doc("Envelope sender address."))
    sender_domain: str | None = field(default=None, metadata=doc("Envelope sender domain."))
    recipient_domain: str | None = field(
        default=None, metadata=doc("Domain of any envelope recipient.")
    )
    mode: str | None = field(
        default=None, metadata=doc("Delivery mode of any recipient: tls, smime, pgp, portal.")
    )


@dataclass(frozen=True)
class ApiTokenConfig:
    name: str = field(metadata=doc("Who holds the token: recorded with every access."))
    role: Literal["auditor", "investigator", "admin"] = field(metadata=doc("What it may do."))
    token_sha256: str = field(metadata=doc("SHA-256 (hex) of the token: 'sealgate archive token'."))


@dataclass(frozen=True)
class ArchiveConfig:
    enabled: bool = field(
        default=True,
        metadata=doc(
            "Journal every accepted message (as received, with its envelope including "
            "Bcc), each recipient's decision and delivery evidence, and the copies the "
            "gateway changed, encrypted at rest, into a tamper-evident log. A message's "
            "spool file stays until its archived copy is on disk; at start, whatever the "
            "spool holds that the archive lacks is journaled."
        ),
    )
    master_keys: tuple[MasterKeyConfig, ...] = field(
        default=(),
        metadata=doc(
            "Master keys that wrap each record's data key, as a list of {id, file}: the "
            "first seals new records, the others stay to read older ones (rotation). "
            "Empty: one is made in <state_dir>/archive/keys on first start (back it up: "
            "without it the archive cannot be read)."
        ),
    )
    signing_key_file: Path | None = field(
        default=None,
        metadata=doc(
            "Ed25519 private key (PEM, PKCS#8) that signs checkpoints of the log. null: "
            "made in <state_dir>/archive/keys on first start. Publish its public key "
            "('sealgate archive verify' prints where it is) to auditors."
        ),
    )
    origin: str | None = field(
        default=None,
        metadata=doc("The log's name in its checkpoints. null: '<hostname>/sealgate-archive'."),
    )
    checkpoint_interval: Duration = field(
        default=Duration(300),
        metadata=doc("Sign a checkpoint of the log this often when it has grown."),
    )
    retention_days: int = field(
        default=2192,
        metadata=doc("Keep messages this many days (2192: six years) unless a rule says longer."),
    )
    retention_floor_days: int = field(
        default=2192,
        metadata=doc(
            "No message is kept less than this. Recorded in the archive: it can be raised "
            "later, never lowered (the daemon refuses to start)."
        ),
    )
    retention_rules: tuple[RetentionRuleConfig, ...] = field(
        default=(),
        metadata=doc(
            "Longer retention for some messages: a list of {days, and any of sender, "
            "sender_domain, recipient_domain, mode}; every condition given must hold. "
            "The longest of the default and every matching rule wins."
        ),
    )
    index_subjects: bool = field(
        default=False,
        metadata=doc(
            "Index subjects for 'archive search --subject' (full text). Subjects can carry "
            "PHI: the index is not encrypted like the archived messages are."
        ),
    )
    api_tokens: tuple[ApiTokenConfig, ...] = field(
        default=(),
        metadata=doc(
            "Bearer tokens for the archive API on the HTTPS API listener (api.listen, "
            "/archive/...), as a list of {name, role, token_sha256}. Roles: 'auditor' "
            "(search, metadata, evidence, proofs), 'investigator' (also content and "
            "exports), 'admin' (also holds and purge; no content). Empty: the API "
            "answers 404."
        ),
    )


API_SCOPES = (
    "send",
    "read-status",
    "archive:read",
    "archive:content",
    "archive:manage",
    "archive:*",
    "admin",
)


@dataclass(frozen=True)
class ApiKeyConfig:
    name: str = field(metadata=doc("Who holds the key: recorded with every call."))
    scopes: tuple[str, ...] = field(metadata=doc(f"What it may do, of: {', '.join(API_SCOPES)}."))
    key_sha256: str = field(metadata=doc("SHA-256 (hex) of the key: 'sealgate api key'."))
    expires: str | None = field(
        default=None, metadata=doc("Last day it works (YYYY-MM-DD, UTC). null: never.")
    )


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = field(
        default=True,
        metadata=doc(
            "Run the HTTPS API listener: the message API (/api/v1, api.keys) and the "
            "archive API (/archive, archive.api_tokens). false: no API at all."
        ),
    )
    listen: HostPort = field(
        default=HostPort("127.0.0.1", 10444),
        metadata=doc(
            "Where the API listens, HTTPS only (a plaintext request gets no HTTP answer). "
            "Keep it on loopback or a management network."
        ),
    )
    cert_file: Path | None = field(
        default=None,
        metadata=doc("PEM certificate chain for the API's HTTPS. null: tls.cert_file."),
    )
    key_file: Path | None = field(
        default=None, metadata=doc("Its private key (PEM). null: tls.key_file.")
    )
    keys: tuple[ApiKeyConfig, ...] = field(
        default=(),
        metadata=doc(
            "Keys for the message API (/api/v1), each {name, scopes, key_sha256, expires}: "
            "'send' submits messages and revokes the portal items of its own, "
            "'read-status' reads a message's state and evidence and explains the policy, "
            "'admin' also acts on the queue and the key directory; 'archive:read', "
            "'archive:content', 'archive:manage' (or 'archive:*') open the archive API as "
            "its auditor, investigator and admin roles do. Make one with 'sealgate api "
            "key'. Empty: /api/v1 answers 401 to every call."
        ),
    )


@dataclass(frozen=True)
class PortalConfig:
    enabled: bool = field(
        default=True,
        metadata=doc(
            "Recipients decided 'portal' get a notification with a link; the message "
            "waits here, encrypted, until they prove they own the address with a "
            "one-time code sent to it. false: such recipients are held."
        ),
    )
    listen: HostPort = field(
        default=HostPort("127.0.0.1", 10443),
        metadata=doc("Where the portal's web server listens (HTTPS unless behind_proxy)."),
    )
    base_url: str | None = field(
        default=None,
        metadata=doc(
            "The portal's address as recipients reach it, e.g. 'https://secure.example.org' "
            "(links in notifications). null: https://<listen>."
        ),
    )
    cert_file: Path | None = field(
        default=None,
        metadata=doc("PEM certificate chain for the portal's HTTPS. null: tls.cert_file."),
    )
    key_file: Path | None = field(
        default=None, metadata=doc("Its private key (PEM). null: tls.key_file.")
    )
    behind_proxy: bool = field(
        default=False,
        metadata=doc(
            "Serve plain HTTP to a TLS-terminating reverse proxy on loopback, which must "
            "set X-Forwarded-For (client address, for rate limits and the access record) "
            "and X-Forwarded-Proto: https."
        ),
    )
    expiry: Duration = field(
        default=Duration(30 * 86400),
        metadata=doc("How long a message can be picked up; then it is deleted from the portal."),
    )
    organization: str = field(
        default="Sealgate",
        metadata=doc("The sender organisation's name, shown in notifications and pages."),
    )
    from_address: str | None = field(
        default=None,
        metadata=doc(
            "From and envelope sender of notifications and codes, and From of replies "
            "(with Reply-To: the recipient). null: no-reply@<smtp hostname>."
        ),
    )
    notification_subject: str = field(
        default="You have a secure message",
        metadata=doc("Subject of notifications: never the original subject."),
    )
    code_subject: str = field(
        default="Your access code", metadata=doc("Subject of the one-time code messages.")
    )
    code_ttl: Duration = field(
        default=Duration(600), metadata=doc("A one-time code is valid this long.")
    )
    max_code_attempts: int = field(
        default=5,
        metadata=doc("Wrong codes allowed for a link before it is locked for 'lockout'."),
    )
    lockout: Duration = field(default=Duration(900), metadata=doc("How long a link stays locked."))
    session_ttl: Duration = field(
        default=Duration(900), metadata=doc("A recipient's session lasts this long.")
    )
    requests_per_minute: int = field(
        default=60, metadata=doc("Requests allowed per client IP address per minute.")
    )
    logo_file: Path | None = field(
        default=None, metadata=doc("PNG logo shown on the portal's pages. null: none.")
    )
    colour: str = field(default="#1f4e79", metadata=doc("The pages' accent colour (#rrggbb)."))
    max_reply_size: Size = field(
        default=Size(10 * 1024 * 1024),
        metadata=doc("Largest reply a recipient may send, attachments included."),
    )
    auth: Literal["code", "password", "passphrase", "oidc"] = field(
        default="code",
        metadata=doc(
            "How a recipient signs in (a policy rule's portal_auth can ask for more; the "
            "strongest wins). 'code': a one-time code mailed to the recipient - the "
            "weakest: it stops a forwarded link, not someone who reads the recipient's "
            "mail path, which the link travels too. 'password': the first message is "
            "opened with a code and the recipient sets a password (Argon2id); later "
            "messages need it; a reset needs a code and is recorded and limited. "
            "'passphrase': the sender sets one per message in the passphrase_header "
            "and tells the recipient another way. 'oidc': the recipient signs in with "
            "one of oidc_providers, whose verified email must be the recipient address."
        ),
    )
    passphrase_header: str = field(
        default="X-Sealgate-Passphrase",
        metadata=doc(
            "Header in which a sender sets a message's passphrase. The gateway removes it "
            "on acceptance, before anything else sees the message, and keeps only an "
            "Argon2id hash for the portal; the notification says nothing of it."
        ),
    )
    oidc_providers: tuple[OidcProviderConfig, ...] = field(
        default=(),
        metadata=doc(
            "OpenID Connect providers recipients may sign in with (auth: oidc), each "
            "{name, issuer, client_id, client_secret_file, label, domains}. The redirect "
            "URI to register is <base_url>/oidc/callback. A token's email counts only "
            "when verified (email_verified; for Microsoft Entra ID the optional claims "
            "email and xms_edov) and, if domains is set, within them."
        ),
    )


@dataclass(frozen=True)
class OidcProviderConfig:
    name: str = field(metadata=doc("Short name used in the portal's URLs (letters, digits, -)."))
    issuer: str = field(metadata=doc("The issuer URL exactly as the provider names it (HTTPS)."))
    client_id: str = field(metadata=doc("The portal's client id at the provider."))
    client_secret_file: Path | None = field(
        default=None, metadata=doc("File holding the client secret. null: a public client.")
    )
    label: str | None = field(
        default=None, metadata=doc("Button text, e.g. 'Microsoft'. null: the name.")
    )
    domains: tuple[DomainPattern, ...] = field(
        default=(),
        metadata=doc(
            "Recipient domains this provider may vouch for ('.example.org' for "
            "subdomains). Empty: any address it has verified."
        ),
    )


CONSOLE_ROLES = ("auditor", "investigator", "admin")


@dataclass(frozen=True)
class RoleClaimConfig:
    claim: str = field(
        metadata=doc("The ID token claim, e.g. 'roles' (Entra app roles) or 'groups'.")
    )
    value: str = field(
        metadata=doc("The value that grants the role (a claim holding a list: one of them).")
    )
    role: Literal["auditor", "investigator", "admin"] = field(
        metadata=doc("The role it grants: auditor, investigator or admin.")
    )
    provider: str | None = field(
        default=None, metadata=doc("Only for this provider (its name). null: any of them.")
    )


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool = field(
        default=True,
        metadata=doc(
            "Run the compliance console: a web application where compliance officers "
            "search the archive, read a message's decisions and evidence, place holds and "
            "build exports. Every look is recorded in the archive's access record."
        ),
    )
    listen: HostPort = field(
        default=HostPort("127.0.0.1", 10445),
        metadata=doc(
            "Where the console listens, HTTPS only. Keep it on loopback or a management network."
        ),
    )
    base_url: str | None = field(
        default=None,
        metadata=doc(
            "The console's address as its users reach it, e.g. "
            "'https://sealgate-console.example.org' (the OpenID Connect redirect URI is "
            "<base_url>/oidc/callback). null: https://<listen>."
        ),
    )
    cert_file: Path | None = field(
        default=None,
        metadata=doc("PEM certificate chain for the console's HTTPS. null: tls.cert_file."),
    )
    key_file: Path | None = field(
        default=None, metadata=doc("Its private key (PEM). null: tls.key_file.")
    )
    idle_timeout: Duration = field(
        default=Duration(900),
        metadata=doc("A session ends after this long without a request (HIPAA automatic logoff)."),
    )
    session_lifetime: Duration = field(
        default=Duration(12 * 3600),
        metadata=doc("A session ends this long after sign-in, however active."),
    )
    max_failures: int = field(
        default=5,
        metadata=doc(
            "Failed sign-ins (wrong password or code) in a row before a local account is "
            "locked for 'lockout'."
        ),
    )
    lockout: Duration = field(
        default=Duration(900), metadata=doc("How long a locked local account stays locked.")
    )
    local_accounts: bool = field(
        default=True,
        metadata=doc(
            "Allow local accounts (Argon2id password and TOTP code; 'sealgate console user "
            "add'): for small sites and break-glass access when the identity provider is "
            "down. false: only oidc_providers sign in."
        ),
    )
    oidc_providers: tuple[OidcProviderConfig, ...] = field(
        default=(),
        metadata=doc(
            "OpenID Connect providers the organisation's people sign in with, each {name, "
            "issuer, client_id, client_secret_file, label, domains}: Microsoft Entra ID "
            "(a single-tenant issuer, https://login.microsoftonline.com/<tenant id>/v2.0), "
            "Google Workspace, any OIDC issuer. The redirect URI to register is "
            "<base_url>/oidc/callback. domains, if set: the token must carry a verified "
            "email within them. The person's roles come from role_claims."
        ),
    )
    role_claims: tuple[RoleClaimConfig, ...] = field(
        default=(),
        metadata=doc(
            "How an ID token's claims grant console roles, as a list of {claim, value, "
            "role, provider}, e.g. {claim: roles, value: Sealgate.Auditor, role: auditor}. "
            "Roles: 'auditor' (metadata, evidence, proofs, access record), "
            "'investigator' (also content and exports), 'admin' (also holds, retention "
            "and purge preview; no content). A person with no role is refused."
        ),
    )


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=doc("Lowest level written: debug, info, warning or error.")
    )
    addresses: Literal["hash", "plain", "omit"] = field(
        default="hash",
        metadata=doc(
            "How mail addresses appear in logs: 'hash' (keyed HMAC, look one up with "
            "'sealgate hash-address'), 'plain' or 'omit'."
        ),
    )
    address_hash_key_file: Path | None = field(
        default=None,
        metadata=doc(
            "Key for address hashes. null: <state_dir>/keys/address-hash.key (made on first start)."
        ),
    )


@dataclass(frozen=True)
class S3Config:
    endpoint: str | None = field(
        default=None,
        metadata=doc(
            "The object store's URL, e.g. https://s3.eu-central-1.amazonaws.com or a MinIO / "
            "Ceph gateway. null: AWS's endpoint for storage.s3.region."
        ),
    )
    region: str = field(default="us-east-1", metadata=doc("The bucket's region."))
    access_key_id: str | None = field(
        default=None,
        metadata=doc(
            "The access key id. null: the standard AWS environment and files "
            "(AWS_ACCESS_KEY_ID, ~/.aws/credentials, an instance role)."
        ),
    )
    secret_access_key_file: Path | None = field(
        default=None,
        metadata=doc("File holding the secret access key (never the key itself in this file)."),
    )
    object_lock: Literal["off", "governance", "compliance"] = field(
        default="off",
        metadata=doc(
            "Write every archived record with S3 Object Lock in this retention mode until "
            "its retention date (the bucket must have Object Lock enabled; 'compliance': "
            "not even the account's root can delete it early)."
        ),
    )


@dataclass(frozen=True)
class StorageConfig:
    database: str = field(
        default="sqlite",
        metadata=doc(
            "Where the queue state, archive index, portal, key directory and MTA-STS cache "
            "live: 'sqlite' (files under state_dir; one node) or a "
            "postgresql://user@host:port/database URL shared by several nodes (no password "
            "in the URL: storage.password_file or the PG* environment, e.g. PGPASSFILE)."
        ),
    )
    password_file: Path | None = field(
        default=None,
        metadata=doc(
            "File holding the PostgreSQL password. null: libpq's own (PGPASSWORD, ~/.pgpass)."
        ),
    )
    blobs: str = field(
        default="database",
        metadata=doc(
            "Where archived content goes: 'database' (in storage.database), 'files' "
            "(under state_dir/archive/blobs; one node), or s3://bucket/prefix (storage.s3)."
        ),
    )
    s3: S3Config = field(default_factory=S3Config)
    auto_migrate: bool = field(
        default=False,
        metadata=doc(
            "Bring PostgreSQL's tables up to this version at start. false: a node whose "
            "schema is older refuses to start until 'sealgate storage migrate' ran. "
            "(The embedded SQLite files are always brought up to date.)"
        ),
    )


@dataclass(frozen=True)
class ClusterConfig:
    node_id: str | None = field(
        default=None,
        metadata=doc("This node's name in the cluster (unique). null: the host name."),
    )
    ack: Literal["local", "shared"] = field(
        default="local",
        metadata=doc(
            "When a message is acknowledged (250): 'local', after it is fsynced on this "
            "node (recorded in storage.database just after, its content too if it is not "
            "delivered within 10 s); 'shared', only once it and its "
            "envelope are committed in storage.database (a node and its disk can be lost "
            "without losing an acknowledged message; needs PostgreSQL)."
        ),
    )
    lease_timeout: Duration = field(
        default=Duration(60),
        metadata=doc(
            "A node that has not renewed its leases for this long is taken for dead: the "
            "other nodes deliver its recipients (it renews every third of this)."
        ),
    )


@dataclass(frozen=True)
class NotifyConfig:
    sender_on: tuple[Literal["held", "portal"], ...] = field(
        default=(),
        metadata=doc(
            "Tell the sender, in a short notice without the message's subject or body, "
            "when a recipient is 'held' (the policy's mode cannot be used now: no key, no "
            "verified TLS, the portal off; once, when it becomes held) or was sent via "
            "the 'portal'. Empty: never."
        ),
    )


WEBHOOK_EVENTS = (
    "accepted",
    "delivered",
    "deferred",
    "bounced",
    "held",
    "portal.notified",
    "portal.opened",
    "portal.replied",
    "portal.expired",
    "revoked",
)


@dataclass(frozen=True)
class WebhookEndpointConfig:
    name: str = field(metadata=doc("Short name, in metrics and logs (letters, digits, -)."))
    url: str = field(metadata=doc("Where events are POSTed: an https:// URL."))
    secret_file: Path = field(
        metadata=doc(
            "File holding the endpoint's signing secret, whsec_<base64> (make one with "
            "'sealgate webhooks secret')."
        )
    )
    events: tuple[str, ...] = field(
        default=(),
        metadata=doc(f"The events it wants, of: {', '.join(WEBHOOK_EVENTS)}. Empty: all."),
    )


@dataclass(frozen=True)
class WebhooksConfig:
    endpoints: tuple[WebhookEndpointConfig, ...] = field(
        default=(),
        metadata=doc(
            "Endpoints told what became of each message, each {name, url, secret_file, "
            "events}: JSON events signed per the Standard Webhooks scheme (webhook-id, "
            "webhook-timestamp, webhook-signature: HMAC-SHA256), with ids, recipient, "
            "status and mode - never the subject or the body. Empty: none."
        ),
    )
    retry_schedule: tuple[Duration, ...] = field(
        default=tuple(Duration(s) for s in (5, 300, 1800, 7200, 18000, 36000)),
        metadata=doc(
            "Waits between attempts to post an event an endpoint did not take (no 2xx); "
            "the last repeats. A message's later events wait for its earlier ones. An "
            "endpoint that does not answer, or answers 429 or 503, is sent none of its "
            "other events until its next try (later if its Retry-After asks, up to an hour)."
        ),
    )
    max_age: Duration = field(
        default=Duration(3 * 86400),
        metadata=doc("An event not taken for this long is dropped (logged and counted)."),
    )


@dataclass(frozen=True)
class TlsRptConfig:
    enabled: bool = field(
        default=False,
        metadata=doc(
            "Count TLS sessions with the servers of domains that publish MTA-STS or DANE "
            "and send each domain that asks for it (a _smtp._tls TXT record) a daily "
            "report (RFC 8460: counts, policies, MX hosts and failure types; no "
            "addresses, no messages) by mail or HTTPS POST; every report is archived."
        ),
    )
    organization: str | None = field(
        default=None,
        metadata=doc("The organization named in reports. null: portal.organization."),
    )
    contact: str | None = field(
        default=None,
        metadata=doc(
            "Address for questions about the reports (contact-info; also the From and "
            "envelope sender of mailed ones; its domain is the report submitter). null: "
            "postmaster@<smtp hostname>."
        ),
    )


@dataclass(frozen=True)
class Config:
    state_dir: Path = field(
        default=Path("./var"),
        metadata=doc(
            "Directory for all state (spool, generated certificate and keys). "
            "'sealgate run --state-dir' overrides it; the systemd unit uses /var/lib/sealgate."
        ),
    )
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    routes: dict[str, NextHopAddress] = field(
        default_factory=dict,
        metadata=doc(
            "Static next hops by recipient domain, host or host:port (default port: "
            'delivery.port), e.g. {clinic.example: "10.1.2.3:25"}; used instead of MX records.'
        ),
    )
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    smime: SmimeConfig = field(default_factory=SmimeConfig)
    pgp: PgpConfig = field(default_factory=PgpConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    wkd: WkdConfig = field(default_factory=WkdConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --- semantic checks on single values ------------------------------------------------

_POSITIVE_INTS = {
    "delivery.max_mx_hosts",
    "delivery.concurrency",
    "delivery.concurrency_per_destination",
    "delivery.reuse_max_messages",
    "smtp.max_recipients",
    "smtp.max_connections",
    "smtp.max_connections_per_ip",
    "smtp.max_received_headers",
    "smtp.max_auth_failures",
    "smtp.max_auth_failures_per_ip",
    "smtp.max_auth_failures_per_user",
    "spool.io_threads",
    "probe.concurrency",
    "archive.retention_days",
    "portal.max_code_attempts",
    "portal.requests_per_minute",
    "archive.retention_floor_days",
    "console.max_failures",
}
_DOMAIN = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_CERT_PATTERN = re.compile(r"(sha256:[0-9a-fA-F:]+|cn:.+|san:(\*\.)?[A-Za-z0-9.-]+)")


def _check_value(path: str, value: Any) -> None:  # noqa: C901 - one check per option with a constraint, in one place
    if path == "smtp.workers" and not 0 <= value <= 64:
        raise ValueError("must be 0 (one per CPU core) to 64")
    if path == "smtp.worker_nice" and not 0 <= value <= 19:
        raise ValueError("must be 0 to 19")
    if path in _POSITIVE_INTS and value < 1:
        raise ValueError("must be at least 1")
    if path == "smtp.max_line_length" and value < 1000:
        raise ValueError("must be at least 1000 (RFC 5321 4.5.3.1.6)")
    if path in ("delivery.port", "mta_sts.port", "wkd.port") and not 0 < value < 65536:
        raise ValueError("must be a port number 1-65535")
    if path == "smtp.marker_header" and not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid header field name")
    if path.startswith("archive.retention_rules[") and path.endswith(".days") and value < 1:
        raise ValueError("must be at least 1")
    modes = ("tls", "smime", "pgp", "portal", "hold", "bounce")
    if (
        path.startswith("archive.retention_rules[")
        and path.endswith(".mode")
        and value not in modes
    ):
        raise ValueError(f"{value!r} is not a mode: {', '.join(modes)}")
    if path == "portal.colour" and not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        raise ValueError(f"{value!r} is not a colour (#rrggbb)")
    if (
        path in ("portal.base_url", "console.base_url")
        and value is not None
        and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value)
    ):
        raise ValueError(f"{value!r} is not an http(s) URL without query")
    if path.endswith(".token_sha256") and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be 64 lower-case hex digits (sealgate archive token)")
    if path.startswith(("portal.oidc_providers[", "console.oidc_providers[")):
        _check_oidc(path.rpartition(".")[2], value)
    if path == "portal.passphrase_header" and not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid header field name")
    if path == "storage.database" and not (
        value == "sqlite" or re.match(r"postgres(ql)?://", value)
    ):
        raise ValueError(f"{value!r}: 'sqlite' or a postgresql:// URL")
    if path == "storage.database" and re.match(r"postgres(ql)?://[^/@]*:[^/@]*@", value):
        raise ValueError("no password in the URL: put it in storage.password_file")
    if path == "storage.blobs" and not (
        value in ("database", "files")
        or re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", value)
    ):
        raise ValueError(f"{value!r}: 'database', 'files' or s3://bucket/prefix")
    if (
        path == "cluster.node_id"
        and value is not None
        and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value)
    ):
        raise ValueError(f"{value!r}: letters, digits, '.', '_' and '-' (at most 63)")
    if path == "cluster.lease_timeout" and value < 5:
        raise ValueError("must be at least 5s")
    if path.startswith("webhooks."):
        _check_webhooks(path, value)
    if path.startswith("api.keys["):
        _check_api_key(path, value)
    if (
        path == "tlsrpt.contact"
        and value is not None
        and not re.fullmatch(r"[^@\s<>\"]+@[A-Za-z0-9.-]+\.[A-Za-z0-9-]+", value)
    ):
        raise ValueError(f"{value!r} is not a mail address (local@domain)")
    if path.startswith("relay.client_certs["):
        if not _CERT_PATTERN.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a certificate pattern (sha256:<hex>, cn:<name>, san:<dns name>)"
            )
        if value.startswith("sha256:") and len(value[7:].replace(":", "")) != 64:
            raise ValueError("a sha256 fingerprint has 64 hex digits")


def _check_api_key(path: str, value: Any) -> None:
    if ".scopes[" in path and value not in API_SCOPES:
        raise ValueError(f"{value!r} is not a scope: {', '.join(API_SCOPES)}")
    if path.endswith(".key_sha256") and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be 64 lower-case hex digits (sealgate api key)")
    if path.endswith(".expires") and value is not None:
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _check_webhooks(path: str, value: Any) -> None:
    endpoint = path.startswith("webhooks.endpoints[")
    if endpoint and path.endswith(".name") and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", value):
        raise ValueError(f"{value!r}: lower-case letters, digits and - (at most 32)")
    if endpoint and path.endswith(".url"):
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{value!r} is not an https:// URL (events never go in plaintext)")
    if endpoint and ".events[" in path and value not in WEBHOOK_EVENTS:
        raise ValueError(f"{value!r} is not an event: {', '.join(WEBHOOK_EVENTS)}")
    if path == "webhooks.retry_schedule" and not value:
        raise ValueError("needs at least one wait")


def _check_oidc(key: str, value: Any) -> None:
    if key == "name" and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", value):
        raise ValueError(f"{value!r}: lower-case letters, digits and - (at most 32)")
    if key == "issuer":
        host = urlsplit(value).hostname or ""
        loopback = host in ("127.0.0.1", "::1", "localhost")
        if not (value.startswith("https://") or (value.startswith("http://") and loopback)):
            raise ValueError(f"{value!r} is not an https:// issuer URL")


# --- loading -------------------------------------------------------------------------


class _Located:
    """Line numbers of the keys of a YAML document, by dotted path."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0] if "." in path else ""
        return None


def _walk_nodes(node: yaml.Node, path: str, where: _Located, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(sub, "key appears twice", source, key_node.start_mark.line + 1)
            seen.add(key)
            where.lines[sub] = key_node.start_mark.line + 1
            _walk_nodes(value_node, sub, where, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where.lines[f"{path}[{i}]"] = item.start_mark.line + 1
            _walk_nodes(item, f"{path}[{i}]", where, source)


def _convert(tp: Any, value: Any, path: str, where: _Located, source: str) -> Any:  # noqa: C901 - one branch per type of the configuration schema
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and not issubclass(tp, HostPort):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of keys")
        return _build(tp, value, path, where, source)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, path, where, source)
        return _convert_scalar(tp, value)
    if origin is dict:
        item_tp = typing.get_args(tp)[1]
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of domain: value")
        converted = {}
        for key, item in value.items():
            domain = str(key).strip().lower().rstrip(".")
            if not _DOMAIN.fullmatch(domain):
                raise ConfigError(
                    f"{path}.{key}",
                    f"{key!r} is not a domain name",
                    source,
                    where.line(f"{path}.{key}"),
                )
            converted[domain] = _convert_item(item_tp, item, f"{path}.{key}", where, source)
        return converted
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ValueError("expected a list")
        items = []
        for i, item in enumerate(value):
            items.append(_convert_item(item_tp, item, f"{path}[{i}]", where, source))
        return tuple(items)
    return _convert_scalar(tp, value)


def _convert_item(tp: Any, value: Any, path: str, where: _Located, source: str) -> Any:
    try:
        result = _convert(tp, value, path, where, source)
        _check_value(path, result)
        return result
    except ValueError as e:
        raise ConfigError(path, str(e), source, where.line(path)) from None


def _convert_scalar(tp: Any, value: Any) -> Any:  # noqa: C901 - one branch per scalar type of the schema
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        text = str(value) if not isinstance(value, bool) else value
        if text not in choices:
            raise ValueError(f"{value!r} is not one of: {', '.join(map(str, choices))}")
        return text
    if tp is NameServer:
        return parse_nameserver(value)
    if tp is DomainPattern:
        return parse_domain_pattern(value)
    if tp is TenantId:
        return parse_tenant_id(value)
    if tp is NextHopAddress:
        return parse_next_hop(value)
    if tp is HostPort:
        return parse_hostport(value, listen=True)
    if tp is Duration:
        return parse_duration(value)
    if tp is Size:
        return parse_size(value)
    if set(typing.get_args(tp)) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
        return parse_network(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file or directory path")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not a whole number")
        return value
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2027-03-01 as a date
            return value.isoformat()
        if not isinstance(value, str) or not value:
            raise ValueError(f"{value!r} is not a non-empty string")
        return value
    raise TypeError(f"no converter for {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: dict[str, Any], path: str, where: _Located, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(sub, f"unknown key{suffix}", source, where.line(sub))
        kwargs[key] = _convert_item(hints[key], value, sub, where, source)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ConfigError(path, f"missing key '{name}'", source, where.line(path))
    return cls(**kwargs)


def load_config_text(text: str, source: str = "<config>") -> Config:
    """Parse and validate a YAML configuration document."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError("", f"not valid YAML: {problem}", source, line) from None
    where = _Located()
    if node is not None:
        _walk_nodes(node, "", where, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the configuration must be a mapping of keys", source, 1)
    config = _build(Config, data, "", where, source)
    _check_pairs(config, where, source)
    return typing.cast(Config, config)


def _check_pairs(config: Config, where: _Located, source: str) -> None:
    providers = [p.name for p in config.portal.oidc_providers]
    if config.portal.auth == "oidc" and not providers:
        raise ConfigError(
            "portal.auth",
            "'oidc' needs at least one entry in portal.oidc_providers",
            source,
            where.line("portal.auth"),
        )
    if len(set(providers)) != len(providers):
        raise ConfigError(
            "portal.oidc_providers",
            "two providers have the same name",
            source,
            where.line("portal.oidc_providers"),
        )
    _check_console(config, where, source)
    hooks = [e.name for e in config.webhooks.endpoints]
    if len(set(hooks)) != len(hooks):
        raise ConfigError(
            "webhooks.endpoints",
            "two endpoints have the same name",
            source,
            where.line("webhooks.endpoints"),
        )
    shared = config.storage.database != "sqlite"
    if config.cluster.ack == "shared" and not shared:
        raise ConfigError(
            "cluster.ack",
            "'shared' needs storage.database to be a postgresql:// URL",
            source,
            where.line("cluster.ack"),
        )
    if shared and config.storage.blobs == "files":
        raise ConfigError(
            "storage.blobs",
            "'files' keeps archived content on this node only; with a shared database use "
            "'database' or s3://bucket/prefix",
            source,
            where.line("storage.blobs"),
        )
    sections = (
        ("tls", config.tls),
        ("portal", config.portal),
        ("api", config.api),
        ("console", config.console),
    )
    for prefix, section in sections:
        if (section.cert_file is None) != (section.key_file is None):
            key = f"{prefix}.key_file" if section.key_file is None else f"{prefix}.cert_file"
            raise ConfigError(
                key,
                f"set {prefix}.cert_file and {prefix}.key_file together",
                source,
                where.line(key),
            )


def _check_console(config: Config, where: _Located, source: str) -> None:
    console = config.console
    names = [p.name for p in console.oidc_providers]
    if len(set(names)) != len(names):
        raise ConfigError(
            "console.oidc_providers",
            "two providers have the same name",
            source,
            where.line("console.oidc_providers"),
        )
    for i, rule in enumerate(console.role_claims):
        if rule.provider is not None and rule.provider not in names:
            key = f"console.role_claims[{i}].provider"
            raise ConfigError(
                key, f"{rule.provider!r} is not in console.oidc_providers", source, where.line(key)
            )
    if console.enabled and not console.local_accounts and not names:
        raise ConfigError(
            "console.local_accounts",
            "with local accounts off, console.oidc_providers must name a provider "
            "(else nobody can sign in)",
            source,
            where.line("console.local_accounts"),
        )
    if names and not console.role_claims:
        raise ConfigError(
            "console.role_claims",
            "console.oidc_providers are set but no role_claims grant a role (nobody "
            "signing in with them would get one)",
            source,
            where.line("console.role_claims"),
        )


def load_config(path: Path | None) -> Config:
    """Load the configuration file at ``path``; ``None`` means the embedded defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            "", f"cannot read the configuration file: {e.strerror}", str(path)
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("", "the configuration file is not UTF-8", str(path)) from None
    return load_config_text(text, str(path))


def config_digest(config: Config) -> str:
    """A short digest of what a node runs with, the same on nodes configured alike:
    everything but what is a node's own (its id and state directory)."""
    import hashlib
    import json

    mine = dataclasses.replace(
        config, state_dir=Path("."), cluster=dataclasses.replace(config.cluster, node_id=None)
    )
    text = json.dumps(dataclasses.asdict(mine), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def schema_paths(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field[Any]]:
    """Every leaf option as dotted path -> field, in declaration order."""
    out: dict[str, dataclasses.Field[Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and not issubclass(tp, HostPort):  # type: ignore[arg-type]
            out.update(schema_paths(tp, path + "."))  # type: ignore[arg-type]
        else:
            out[path] = f
    return out
