"""context - what every SMTP connection shares, and how it is made from the
configuration: relay authorization, TLS, limits, the way into the queue.

Imported by SMTP worker processes: it must stay light (nothing of delivery, the
archive, the portal or the web stack).
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from gateway.crypto.dkim_verify import KeyCache
from gateway.layout import StateLayout
from gateway.observability.logging import AddressRedactor, load_or_create_key
from gateway.observability.metrics import Metrics
from gateway.probe.dns import Resolver
from gateway.smtp.auth import AuthThrottle, RelayPolicy, load_users
from gateway.smtp.binding import Binding, dns_key_fetch
from gateway.smtp.handler import Handler
from gateway.spool.submit import Submitter
from gateway.tls import self_signed_paths, server_context


@dataclass
class SmtpContext:
    """What every connection shares: configuration, policy, the way into the queue,
    observability."""

    config: Config
    hostname: str
    relay: RelayPolicy
    binding: Binding
    submitter: Submitter
    metrics: Metrics
    redact: AddressRedactor
    tls_context: ssl.SSLContext | None
    # this process's share of smtp.max_connections / max_connections_per_ip
    max_connections: int = 0
    max_connections_per_ip: int = 0
    # failed AUTH attempts across connections (this process's share of the limits)
    auth_throttle: AuthThrottle | None = None
    handler: Handler = field(init=False)
    hooks: dict[str, Any] = field(init=False)
    connections: Counter[str] = field(default_factory=Counter)
    sessions: set[Any] = field(default_factory=set)  # the open GatewaySMTP connections
    stopping: bool = False
    _free: int = 0
    _free_checked: float = -1e9

    def free_space(self) -> int:
        """Free bytes on the spool's file system, read at most every second."""
        now = time.monotonic()
        if now - self._free_checked >= 1.0:
            try:
                self._free = self.submitter.spool.free_space()
            except OSError:
                self._free = 0  # no spool directory: nothing can be accepted
            self._free_checked = now
        return self._free

    def __post_init__(self) -> None:
        self.max_connections = self.max_connections or self.config.smtp.max_connections
        self.max_connections_per_ip = (
            self.max_connections_per_ip or self.config.smtp.max_connections_per_ip
        )
        if self.auth_throttle is None:
            smtp = self.config.smtp
            self.auth_throttle = AuthThrottle(
                smtp.max_auth_failures_per_ip,
                smtp.max_auth_failures_per_user,
                smtp.auth_failure_window,
            )
        self.handler = Handler(self)
        self.hooks = {
            name[7:]: getattr(self.handler, name)
            for name in dir(Handler)
            if name.startswith("handle_")
        }


def smtp_hostname(config: Config) -> str:
    return config.smtp.hostname or socket.getfqdn()


def make_redactor(config: Config) -> AddressRedactor:
    lc = config.logging
    if lc.addresses == "hash":
        key_file = lc.address_hash_key_file or StateLayout(config.state_dir).address_hash_key
        return AddressRedactor("hash", load_or_create_key(key_file))
    return AddressRedactor(lc.addresses)


def make_binding(config: Config) -> Binding:
    keys = None
    if config.relay.dkim_domains:
        keys = KeyCache(dns_key_fetch(Resolver(config.dns.nameservers, timeout=5.0)))
    return Binding(config.relay, keys)


@dataclass(frozen=True)
class Edge:
    """What decides who may send and how they are met - read again on SIGHUP."""

    relay: RelayPolicy
    binding: Binding
    tls_context: ssl.SSLContext


def make_edge(config: Config) -> Edge:
    """The relay rules, the binding and the TLS context of ``config``; raises (an
    `OSError`, `ssl.SSLError` or `ValueError`) when a file they name cannot be used."""
    cert, key = config.tls.cert_file, config.tls.key_file
    if cert is None or key is None:
        cert, key = self_signed_paths(config.state_dir)
    relay = RelayPolicy(
        config.relay.networks,
        config.relay.client_certs,
        load_users(config.relay.users_file) if config.relay.users_file else {},
    )
    tls_context = server_context(
        cert,
        key,
        config.tls.min_version,
        config.relay.client_ca_file,
        ask_client_cert=relay.asks_client_cert,
    )
    return Edge(relay, make_binding(config), tls_context)


def apply_edge(ctx: SmtpContext, config: Config, edge: Edge) -> None:
    """SIGHUP: connections from now on use the new certificate, relay rules and
    binding; those already open keep what they started with.  Limits divided among
    workers stay until a restart."""
    ctx.config, ctx.relay, ctx.binding, ctx.tls_context = (
        config,
        edge.relay,
        edge.binding,
        edge.tls_context,
    )


def make_smtp_context(
    config: Config,
    submitter: Submitter,
    metrics: Metrics,
    *,
    divide_limits_by: int = 1,
) -> SmtpContext:
    """Everything an SMTP listener needs; the TLS material must exist already."""
    edge = make_edge(config)
    redact = make_redactor(config)
    sc = config.smtp
    throttle = AuthThrottle(
        math.ceil(sc.max_auth_failures_per_ip / divide_limits_by),
        math.ceil(sc.max_auth_failures_per_user / divide_limits_by),
        sc.auth_failure_window,
    )
    ctx = SmtpContext(
        config,
        smtp_hostname(config),
        edge.relay,
        edge.binding,
        submitter,
        metrics,
        redact,
        edge.tls_context,
        max_connections=math.ceil(config.smtp.max_connections / divide_limits_by),
        max_connections_per_ip=math.ceil(config.smtp.max_connections_per_ip / divide_limits_by),
        auth_throttle=throttle,
    )
    return ctx
