"""client - deliver one message to one destination, enforcing the TLS level per MX.

For each next hop in routing order, and each of its addresses, `deliver` opens an
SMTP session (aiosmtplib), or takes an idle one to the same host at the same level
from the `SessionCache`, and applies the `TlsLevel` *on that connection*:

- ``may``: STARTTLS when offered, certificate not checked; plaintext otherwise;
- ``encrypt``: STARTTLS required, TLS 1.2 or later; not offered → 4.7.4, next host;
- ``verify`` and above: the certificate must chain to a trusted CA (system store plus
  ``ca_file``) and name the MX host (SNI = MX host); failure → 4.7.5, next host.

A level that requires TLS never falls back to plaintext, on any host.  A host that
fails (connection, greeting, TLS) is a `HostFailure` and the next host is tried; once
a session reaches MAIL FROM, each recipient gets its own result from the server's
replies (2xx delivered, 4xx deferred, 5xx bounced).

Evidence: every session records the MX host, IP, port, level, TLS version, cipher,
SHA-256 of the peer certificate and how it was verified, and the remote replies; a
reused session's evidence says how many transactions it carried before.

Failures are values (`RecipientResult`, `HostFailure`); exceptions escape only for
programming errors.
"""

from __future__ import annotations

import _ssl
import dataclasses
import datetime
import enum
import hashlib
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from gateway.delivery.pipelining import pipelined
from gateway.delivery.results import HostFailure, Outcome, RecipientResult, SessionEvidence
from gateway.delivery.router import NextHop, Routed
from gateway.delivery.sessions import Session, SessionCache, SessionKey, quit_session
from gateway.delivery.tls_policy import TlsLevel
from gateway.events import Event, TlsFailure
from gateway.headers import header_is_ascii
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.probe.dane import Tlsa, TlsaStatus, lookup_tlsa
from gateway.probe.dane import verify as verify_tlsa
from gateway.probe.dns import LookupStatus, Resolver
from gateway.tls import client_context
from gateway.tlsrpt.model import Failure, Observation, ResultType, result_type_of, tlsa_policy
from gateway.tlsrpt.verify import check as would_verify

log = get_logger("gateway.delivery")


@dataclass(frozen=True)
class ClientSettings:
    helo_name: str
    ca_file: Path | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    dane: bool = False  # the resolver validates DNSSEC: TLSA records are believed


class _Stale(enum.Enum):
    """A cached session the server has closed meanwhile: nothing was sent."""

    STALE = 0


@dataclass
class _Message:
    sender: str
    recipients: list[str]
    data: bytes
    smtputf8: bool = False
    eightbit: bool = False
    requiretls: bool = False  # RFC 8689: only to a verified server that offers it
    # RFC 3461 6.2.1: passed on to a server that offers DSN - RET and ENVID on MAIL,
    # each recipient's NOTIFY and ORCPT on its RCPT
    dsn_mail: tuple[str, ...] = ()
    dsn_rcpt: dict[str, tuple[str, ...]] = field(default_factory=dict)
    results: dict[str, RecipientResult] = field(default_factory=dict)
    head: bytes = b""  # header lines of ours before the message (trace headers)
    data_is_wire: bool = False  # (`wire_form`)
    wire: tuple[bytes, ...] = ()  # head and data as DATA sends them, made once per delivery

    def __post_init__(self) -> None:
        self.wire = wire_form(self.data, self.head, self.data_is_wire)


_END = b".\r\n"  # after the message's last CRLF
_BARE_LINE_ENDING = re.compile(rb"\r\n|\n|\r(?!\n)")


def wire_form(data: bytes, head: bytes = b"", data_is_wire: bool = False) -> tuple[bytes, ...]:
    """``head`` and the message ``data`` as sent after DATA (RFC 5321 4.5.2): CRLF
    line endings, a dot doubled where a line starts with one, and the end marker
    CRLF "." CRLF - in pieces, sent one after the other.  A piece is the very
    object it came from when it needs no change (no line starts with a dot), so a
    large message is not copied for every attempt to send it.

    Accepted mail has CRLF line endings only (bare CR and LF are refused at
    acceptance), so the common case is four C-speed scans; ``data_is_wire``: none,
    the SMTP listener saw that ``data`` needs no change (`Envelope.data_is_wire`: at
    50 KB a tenth of a millisecond a delivery, in the process that delivers).  Its
    last line must be ended still (else it is looked at after all)."""
    if head and not head.endswith(b"\r\n"):
        data, head = head + data, b""  # (ours end their last line: never)
        data_is_wire = False
    body = data if data_is_wire and data.endswith(b"\r\n") else _stuffed(data)
    pieces = [piece for piece in (_stuffed(head), body) if piece]
    ends_line = bool(pieces) and pieces[-1].endswith(b"\r\n")
    return (*pieces, _END if ends_line else b"\r\n" + _END)


def _stuffed(text: bytes) -> bytes:
    crlf = text.count(b"\r\n")
    if text.count(b"\n") != crlf or text.count(b"\r") != crlf:
        text = _BARE_LINE_ENDING.sub(b"\r\n", text)
    stuffed = text.replace(b"\r\n.", b"\r\n..")  # (the same object when none is)
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def tls_context(level: TlsLevel, ca_file: Path | None) -> ssl.SSLContext:
    """The client context for ``level``: verifying against the system's CAs and
    ``ca_file`` (PKIX levels), or not (opportunistic, and DANE, which checks the
    chain itself); one shared by every connection (`gateway.tls.client_context`)."""
    return client_context(ca_file, verify=level.verifies_certificate and not level.uses_dane)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def server_text(text: str) -> str:
    """What a server said (a reply, or an error holding one) as the records keep it.
    aiosmtplib keeps the bytes of a reply that are not UTF-8 - a server's Latin-1,
    say - as lone surrogates, which neither SQLite, PostgreSQL nor the archive's
    UTF-8 can store: the queue's record of a delivery failed, and the message went
    out again at every retry.  They are written as ``\\xNN`` here, and so is NUL,
    which PostgreSQL's text cannot hold."""
    if not text.isascii():
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def failure_text(error: BaseException) -> str:
    """An error of a session as the records keep it: a refusal as the server said it
    ("554 5.7.1 ..."; aiosmtplib's own text is a tuple's), anything else as raised."""
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return f"{error.code} {server_text(error.message)}"
    return server_text(str(error))


def _status_of(code: int, message: str, fallback: str) -> str:
    head = message.split(" ", 1)[0]
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] == str(code)[0]:
        return head
    return fallback


def _outcome(code: int) -> Outcome:
    return "delivered" if code < 400 else "deferred" if code < 500 else "bounced"


async def addresses_of(hop: NextHop, resolver: Resolver) -> list[str] | HostFailure:
    try:
        ipaddress.ip_address(hop.host)
        return [hop.host]
    except ValueError:
        pass
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        lookup = await resolver.lookup(hop.host, rdtype)
        if lookup.status is LookupStatus.ERROR:
            return HostFailure("4.4.3", f"address lookup for {hop.host} failed")
        found += [r.to_text() for r in lookup.records]
    if not found:
        return HostFailure("4.4.4", f"{hop.host} has no address")
    return found


async def deliver(
    routed: Routed,
    level: TlsLevel,
    sender: str,
    recipients: list[str],
    data: bytes,
    settings: ClientSettings,
    resolver: Resolver,
    *,
    smtputf8: bool = False,
    eightbit: bool = False,
    requiretls: bool = False,
    dsn_mail: tuple[str, ...] = (),
    dsn_rcpt: dict[str, tuple[str, ...]] | None = None,
    head: bytes = b"",
    sessions: SessionCache | None = None,
    metrics: Metrics | None = None,
    relaxed: bool = False,
    observed: Observation | None = None,
    data_is_wire: bool = False,
) -> list[RecipientResult]:
    """Try the hops in order until one session takes the message.  A message sent
    with REQUIRETLS that no host would take under it (RFC 8689: 5.7.30, 5.7.10,
    soft per host) fails when the last host was tried.  ``relaxed``: no TLS policy
    of the domain applies, not even DANE (RFC 8689 5: ``TLS-Required: No``).
    ``observed``: new sessions are counted for TLS-RPT.  ``head``: header lines sent
    before ``data`` (the trace headers: not joined to a copy of the message).
    ``data_is_wire``: ``data`` is sent as it is (`wire_form`)."""
    message = _Message(
        sender,
        list(recipients),
        data,
        smtputf8,
        eightbit,
        requiretls,
        dsn_mail,
        dsn_rcpt or {},
        head=head,
        data_is_wire=data_is_wire,
    )
    last = HostFailure("4.4.1", "no host could be reached")
    for hop in routed.hops:
        tlsa = await _dane(hop, routed, level, settings, resolver, relaxed, observed)
        if isinstance(tlsa, HostFailure):
            last = tlsa
            continue
        hop_level, records = tlsa
        key = SessionKey(hop.host, hop.port, hop_level.label, _digest(records))
        while sessions is not None and (cached := sessions.take(key)) is not None:
            if metrics is not None:
                metrics.delivery_connections.labels("reused").inc()
            outcome = await _use(cached, key, message, sessions, reused=True)
            if outcome is None:
                return [message.results[r] for r in message.recipients]
            if not isinstance(outcome, _Stale):
                last = outcome
        addresses = await addresses_of(hop, resolver)
        if isinstance(addresses, HostFailure):
            last = addresses
            continue
        for ip in addresses:
            opened = await _open(hop, ip, hop_level, settings, metrics, records, observed)
            if isinstance(opened, HostFailure):
                last = opened
                continue
            outcome = await _use(opened, key, message, sessions, reused=False)
            if outcome is None:
                return [message.results[r] for r in message.recipients]
            if not isinstance(outcome, _Stale):
                last = outcome
    # REQUIRETLS's 5.7.30 / 5.7.10 are soft per host and final once every host is tried
    final = requiretls and last.status in ("5.7.30", "5.7.10")
    ending: Outcome = "bounced" if final else "deferred"
    return [
        RecipientResult(r, ending, last.status, last.reason, last.evidence, last.tls_failure)
        for r in message.recipients
    ]


async def _dane(
    hop: NextHop,
    routed: Routed,
    level: TlsLevel,
    settings: ClientSettings,
    resolver: Resolver,
    relaxed: bool = False,
    observed: Observation | None = None,
) -> tuple[TlsLevel, tuple[Tlsa, ...]] | HostFailure:
    """The level for this MX host after its TLSA records (RFC 7672 §2.2): usable
    records make it ``dane`` (it outranks MTA-STS); records none of which is usable
    still require TLS; a failed lookup makes the host unusable (and is counted for
    TLS-RPT).  Only for a DNSSEC-secure MX answer from a resolver trusted to
    validate, and not ``relaxed``."""
    if relaxed or not settings.dane or not routed.mx_secure or hop.via != "mx":
        return level, ()
    found = await lookup_tlsa(resolver, hop.host, hop.port)
    if found.status is TlsaStatus.ERROR:
        if observed is not None:
            failure = Failure(ResultType.DNSSEC_INVALID, hop.host, "", "tlsa-lookup-failed")
            observed.count(tlsa_policy(observed.domain, ()), failure)
        return HostFailure("4.7.5", found.detail)
    if found.status is TlsaStatus.USABLE:
        return TlsLevel.DANE, found.records
    if found.status is TlsaStatus.UNUSABLE:
        return max(level, TlsLevel.ENCRYPT), ()
    return level, ()


def _observe(
    observed: Observation,
    records: tuple[Tlsa, ...],
    host: str,
    ip: str,
    opened: Session | HostFailure,
    ca_file: Path | None,
) -> None:
    """Count a new session for TLS-RPT under the policy that governed it: the MX
    host's TLSA records, else the domain's MTA-STS policy (none: not counted).  A
    connection that failed before TLS is not counted (RFC 8460 reports TLS
    negotiation); under an MTA-STS ``testing`` policy a session the policy engine let
    go unverified counts as what ``enforce`` would have found."""
    policy = tlsa_policy(observed.domain, records) if records else observed.sts
    if policy is None:
        return
    if isinstance(opened, HostFailure):
        if opened.tls_failure is not None:
            failed = result_type_of(opened.tls_failure)
            why = opened.tls_failure.value if failed is ResultType.VALIDATION_FAILURE else ""
            observed.count(policy, Failure(failed, host, ip, why))
        return
    evidence = opened.evidence
    result: ResultType | None = None
    if evidence.tls_version is None:
        result = ResultType.STARTTLS_NOT_SUPPORTED
    elif evidence.verification == "none" and not records:
        transport = opened.smtp.transport
        sslobj = transport.get_extra_info("ssl_object") if transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        chain = presented_chain(sslobj, der) if sslobj else []
        result = would_verify(chain, host, ca_file)
    observed.count(policy, Failure(result, host, ip) if result else None)


def _digest(records: tuple[Tlsa, ...]) -> str:
    """Sessions verified against other TLSA records are never reused (Postfix keys its
    connection cache on the TLSA RRset too)."""
    text = ";".join(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16] if records else ""


async def connect(ip: str, port: int, helo_name: str, timeout: float) -> aiosmtplib.SMTP:
    """An SMTP session with the greeting read (no STARTTLS yet); when connecting
    fails or is cancelled (shutting down), no socket is left behind."""
    smtp = aiosmtplib.SMTP(
        hostname=ip,
        port=port,
        local_hostname=helo_name,
        timeout=timeout,
        start_tls=False,
        use_tls=False,
    )
    try:
        await smtp.connect()
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _open(
    hop: NextHop,
    ip: str,
    level: TlsLevel,
    settings: ClientSettings,
    metrics: Metrics | None,
    tlsa: tuple[Tlsa, ...] = (),
    observed: Observation | None = None,
) -> Session | HostFailure:
    """Connect, EHLO and secure the session as ``level`` requires (counted for
    TLS-RPT when ``observed``)."""
    evidence = SessionEvidence(hop.host, ip, hop.port, level.label, started_at=_now())
    began = time.monotonic()
    try:
        smtp = await connect(ip, hop.port, settings.helo_name, settings.connect_timeout)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        why = f"connect to {hop.host}[{ip}]:{hop.port} failed: {failure_text(e)}"
        return HostFailure("4.4.1", why, evidence)
    if metrics is not None:
        metrics.delivery_connections.labels("new").inc()
    try:
        smtp.timeout = settings.command_timeout
        await smtp.ehlo()
        secured = await _secure(smtp, hop, level, evidence, settings, tlsa)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        why = f"session with {hop.host}[{ip}] failed: {failure_text(e)}"
        secured = HostFailure("4.4.2", why, evidence)
    except BaseException:  # cancelled (shutting down), or a bug: never leave the socket
        smtp.close()
        raise
    if isinstance(secured, HostFailure):
        if secured.tls_failure is not None:
            _tls_failed(secured, metrics)
        await quit_session(smtp)
    opened = (
        secured
        if isinstance(secured, HostFailure)
        else Session(smtp, secured, setup=time.monotonic() - began)
    )
    if observed is not None:
        _observe(observed, tlsa, hop.host, ip, opened, settings.ca_file)
    return opened


async def _use(
    session: Session,
    key: SessionKey,
    message: _Message,
    sessions: SessionCache | None,
    *,
    reused: bool,
) -> HostFailure | _Stale | None:
    """One transaction on an open session; the session goes back to the cache when
    the transaction ended cleanly."""
    evidence = session.evidence
    if reused:
        evidence = dataclasses.replace(evidence, reused=session.transactions)
    try:
        outcome = await _transaction(session.smtp, message, evidence, reused)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        session.smtp.close()
        host = f"{evidence.mx_host}[{evidence.ip}]"
        return HostFailure("4.4.2", f"session with {host} failed: {failure_text(e)}", evidence)
    except BaseException:  # cancelled mid-transaction (not recorded, retried), or a bug
        session.smtp.close()
        raise
    if outcome is None and sessions is not None:
        sessions.give(key, session)
    else:
        await quit_session(session.smtp)
    return outcome


async def _secure(
    smtp: aiosmtplib.SMTP,
    hop: NextHop,
    level: TlsLevel,
    evidence: SessionEvidence,
    settings: ClientSettings,
    tlsa: tuple[Tlsa, ...] = (),
) -> SessionEvidence | HostFailure:
    offered = smtp.supports_extension("starttls")
    if not level.attempts_tls or not offered:
        if level.requires_tls:
            return HostFailure(
                "4.7.4",
                f"TLS is required, but was not offered by host {hop.host}[{evidence.ip}]",
                evidence,
                TlsFailure.NOT_OFFERED,
            )
        return evidence
    try:
        await smtp.starttls(
            server_hostname=hop.host, tls_context=tls_context(level, settings.ca_file)
        )
    except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as e:
        what = (
            "Server certificate not verified" if level.verifies_certificate else "Cannot start TLS"
        )
        why = f"{what} for {hop.host}[{evidence.ip}]: {failure_text(e)}"
        return HostFailure("4.7.5", why, evidence, tls_failure_of(e))
    sslobj = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
    if sslobj is None:
        return HostFailure(
            "4.7.5", f"no TLS session with {hop.host}", evidence, TlsFailure.HANDSHAKE
        )
    der = sslobj.getpeercert(binary_form=True)
    cipher = sslobj.cipher()
    verification = "pkix" if level.verifies_certificate else "none"
    if level.uses_dane:
        how = verify_tlsa(tlsa, presented_chain(sslobj, der), hop.host)
        if how is None:
            return HostFailure(
                "4.7.5",
                f"DANE: no TLSA record of {hop.host}[{evidence.ip}] matches its certificate",
                evidence,
                TlsFailure.DANE_MISMATCH,
            )
        verification = how
    evidence = dataclasses.replace(
        evidence,
        tls_version=sslobj.version(),
        tls_cipher=cipher[0] if cipher else None,
        peer_cert_sha256=hashlib.sha256(der).hexdigest() if der else None,
        verification=verification,
    )
    await smtp.ehlo()  # RFC 3207: forget what was learned before TLS
    return evidence


def presented_chain(sslobj: ssl.SSLObject, leaf: bytes | None) -> list[bytes]:
    """The certificates the server sent, its own first (DANE-TA needs them all)."""
    get_chain = getattr(sslobj, "get_unverified_chain", None)  # public from Python 3.13
    if get_chain is None:
        get_chain = getattr(getattr(sslobj, "_sslobj", None), "get_unverified_chain", None)
    if get_chain is not None:
        chain = get_chain() or []
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    return [leaf] if leaf else []


# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that have a reason of their own.
_CERT_EXPIRED = {9, 10}  # not yet valid, expired
_HOSTNAME_MISMATCH = 62


def tls_failure_of(error: BaseException) -> TlsFailure:
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return TlsFailure.HANDSHAKE
    code = cause.verify_code
    if code in _CERT_EXPIRED:
        return TlsFailure.EXPIRED
    if code == _HOSTNAME_MISMATCH:
        return TlsFailure.NAME_MISMATCH
    return TlsFailure.UNTRUSTED


def _tls_failed(failure: HostFailure, metrics: Metrics | None) -> None:
    assert failure.tls_failure is not None
    if metrics is not None:
        metrics.delivery_tls_failures.labels(failure.tls_failure.value).inc()
    ev = failure.evidence
    log.warning(
        Event.DELIVERY_TLS_FAILED,
        mx=ev.mx_host if ev else None,
        ip=ev.ip if ev else None,
        tls_level=ev.level if ev else None,
        reason=failure.tls_failure.value,
        status=failure.status,
        error=failure.reason[:300],
    )


async def _transaction(  # noqa: C901 - MAIL, RCPT, DATA with their replies, as RFC 5321 orders them
    smtp: aiosmtplib.SMTP, message: _Message, evidence: SessionEvidence, reused: bool = False
) -> HostFailure | _Stale | None:
    commands = _commands(smtp, message, evidence)
    if isinstance(commands, HostFailure):
        return commands
    mail, rcpts, evidence = commands
    if not rcpts:
        return None  # nothing this server can take (RFC 6531 3.4): bounced, 5.6.7
    # RFC 2920: MAIL, every RCPT and DATA in one write when the server offers it
    # (``data_reply`` is then DATA's reply, read already)
    group = smtp.supports_extension("pipelining")
    data_reply: aiosmtplib.SMTPResponse | None = None
    try:
        if group:
            reply, *answers, data_reply = await pipelined(
                smtp, [mail, *(c for _, c in rcpts), b"DATA"]
            )
        else:
            reply = await smtp.execute_command(mail)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
        if reused:
            smtp.close()
            return _Stale.STALE
        raise
    if reused and reply.code == 421:  # the server timed out the idle session
        smtp.close()
        return _Stale.STALE
    if reply.code >= 400:
        # The sender was refused: that is about the whole message on this host.
        await _end_pipelined(smtp, data_reply)
        said = f"{reply.code} {server_text(reply.message)}"
        status = _status_of(reply.code, reply.message, f"{reply.code // 100}.0.0")
        if reply.code >= 500:
            for rcpt in message.recipients:
                message.results[rcpt] = RecipientResult(rcpt, "bounced", status, said, evidence)
            return None
        return HostFailure(status, f"MAIL FROM refused: {said}", evidence)
    accepted = []
    for i, (rcpt, command) in enumerate(rcpts):
        reply = answers[i] if group else await smtp.execute_command(command)
        if reply.code < 400:
            accepted.append(rcpt)
        else:
            status = _status_of(reply.code, reply.message, f"{reply.code // 100}.1.0")
            said = f"{reply.code} {server_text(reply.message)}"
            message.results[rcpt] = RecipientResult(
                rcpt, _outcome(reply.code), status, said, evidence
            )
    if not accepted:
        await _end_pipelined(smtp, data_reply)
        await smtp.rset()
        return None
    code, text = await _data(smtp, message.wire, data_reply)
    status = _status_of(code, text, f"{code // 100}.0.0")
    for rcpt in accepted:
        message.results[rcpt] = RecipientResult(
            rcpt, _outcome(code), status, f"{code} {text}", evidence
        )
    return None


def _commands(
    smtp: aiosmtplib.SMTP, message: _Message, evidence: SessionEvidence
) -> tuple[bytes, list[tuple[str, bytes]], SessionEvidence] | HostFailure:
    """MAIL with the parameters this server takes, and an RCPT per recipient it can
    take (the others are bounced in ``message.results``); the evidence noting
    REQUIRETLS and DSN parameters passed on."""
    options = []
    if message.smtputf8 and smtp.supports_extension("smtputf8"):
        options.append("SMTPUTF8")
    if message.eightbit and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(message.head) + len(message.data)}")
    if message.requiretls:
        host = f"{evidence.mx_host}[{evidence.ip}]"
        if evidence.verification == "none":
            why = f"Sender requested REQUIRETLS, but the certificate of {host} was not verified"
            return HostFailure("5.7.10", why, evidence)
        if not smtp.supports_extension("requiretls"):
            why = f"Sender requested REQUIRETLS, but it is not offered by host {host}"
            return HostFailure("5.7.30", why, evidence)
        options.append("REQUIRETLS")
        evidence = dataclasses.replace(evidence, requiretls=True)
    dsn = smtp.supports_extension("dsn") and bool(message.dsn_mail or message.dsn_rcpt)
    if dsn:
        options += message.dsn_mail
        evidence = dataclasses.replace(evidence, dsn_passed_on=True)
    encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
    message.results.clear()  # what counts is the transaction that completes
    if encoding == "ascii" and _needs_smtputf8(message, evidence):
        return b"", [], evidence
    sender = b"FROM:<" + message.sender.encode(encoding) + b">"
    mail = b" ".join([b"MAIL", sender, *(o.encode() for o in options)])
    rcpts = [
        (
            rcpt,
            b" ".join(
                [
                    b"RCPT",
                    b"TO:<" + rcpt.encode(encoding) + b">",
                    *(o.encode() for o in (message.dsn_rcpt.get(rcpt, ()) if dsn else ())),
                ]
            ),
        )
        for rcpt in message.recipients
        if rcpt not in message.results  # bounced already (non-ASCII, no SMTPUTF8 here)
    ]
    return mail, rcpts, evidence


async def _end_pipelined(smtp: aiosmtplib.SMTP, data_reply: aiosmtplib.SMTPResponse | None) -> None:
    """A pipelined DATA the server should have refused (no sender, no recipient)
    but answered 354: an empty message ends it, and its reply is not a delivery
    (RFC 2920 3.1).  (None: DATA was not sent.)"""
    if data_reply is not None and data_reply.code == 354 and smtp.protocol is not None:
        smtp.protocol.write(b".\r\n")
        await smtp.protocol.read_response(timeout=smtp.timeout)


def _needs_smtputf8(message: _Message, evidence: SessionEvidence) -> bool:
    """For a server without SMTPUTF8 (RFC 6531 3.4: an internationalized message is
    not sent to it): bounce (5.6.7) the recipients whose address is not ASCII - every
    one when the sender's is not, or when the message came with SMTPUTF8 and its
    header section holds UTF-8 (an address or a phrase in a header field, RFC 6532;
    as Postfix does).  True when none is left."""
    why = f"{evidence.mx_host} does not support SMTPUTF8 (RFC 6531), needed for "
    whose = ""
    if not message.sender.isascii():
        whose = "the sender's address"
    elif message.smtputf8 and not header_is_ascii(message.data):
        whose = "the message's header fields"
    for rcpt in message.recipients:
        if whose or not rcpt.isascii():
            because = why + (whose or "this address")
            message.results[rcpt] = RecipientResult(rcpt, "bounced", "5.6.7", because, evidence)
    return all(r in message.results for r in message.recipients)


_JOIN_BELOW = 256 * 1024  # a message's wire form up to this size goes in one write


async def _data(
    smtp: aiosmtplib.SMTP, wire: tuple[bytes, ...], reply: aiosmtplib.SMTPResponse | None = None
) -> tuple[int, str]:
    """DATA (unless ``reply`` is its reply already: pipelined), then the message in
    wire form; the final reply.

    aiosmtplib's ``SMTP.data`` would normalise line endings and dot-stuff with
    regular expressions at every attempt; the message is in wire form already, so it
    goes to the session's protocol as is."""
    if reply is None:
        reply = await smtp.execute_command(b"DATA")
    if reply.code != 354:
        return reply.code, server_text(reply.message)
    if smtp.protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost before the message")
    if sum(map(len, wire)) <= _JOIN_BELOW:
        smtp.protocol.write(b"".join(wire))  # one send
    else:  # no copy of a large message
        for piece in wire:
            smtp.protocol.write(piece)
    reply = await smtp.protocol.read_response(timeout=smtp.timeout)
    return reply.code, server_text(reply.message)
