"""MAIL and RCPT parameters aiosmtpd does not know: the DSN extension's (RFC 3461)
``RET`` and ``ENVID`` on MAIL, ``NOTIFY`` and ``ORCPT`` on RCPT, and ``REQUIRETLS``
on MAIL (RFC 8689) - taken out of the command before aiosmtpd reads it (it refuses
them, and upper-cases what it keeps: ENVID and ORCPT are case-sensitive), checked,
and kept in the envelope's options as the client wrote them, where delivery and
the reports read them."""

from __future__ import annotations

import re

MAIL_DSN_KEYS = ("RET", "ENVID")
MAIL_KEYS = (*MAIL_DSN_KEYS, "REQUIRETLS")
REQUIRETLS = "REQUIRETLS"  # a keyword without a value
RCPT_KEYS = ("NOTIFY", "ORCPT")
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")

# xtext (RFC 3461 4): printable ASCII but "+" and "=", or "+" and two hex digits
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class ParameterError(ValueError):
    """A parameter the client got wrong; the message is the reply's text."""


def take(arg: str, keys: tuple[str, ...]) -> tuple[str, list[str]]:
    """``arg`` (``FROM:<a@b> SIZE=10 RET=HDRS``) without the parameters named by
    ``keys``, and those parameters as written, each checked (`ParameterError`)."""
    close = arg.rfind(">")
    head, tail = (arg[: close + 1], arg[close + 1 :]) if close >= 0 else (arg, "")
    kept, taken, seen = [], [], set()
    for token in tail.split():
        key, sep, value = token.partition("=")
        name = key.upper()
        if name not in keys:
            kept.append(token)
            continue
        if name in seen:
            raise ParameterError(f"{name} given twice")
        seen.add(name)
        check(name, value if sep else None)
        taken.append(name if name == REQUIRETLS else f"{name}={value}")
    return " ".join([head, *kept]), taken


def check(name: str, value: str | None) -> None:
    if name == REQUIRETLS:
        if value is not None:
            raise ParameterError("REQUIRETLS takes no value")
        return
    if value is None or value == "":
        raise ParameterError(f"{name} needs a value")
    if name == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            raise ParameterError("RET is FULL or HDRS")
    elif name == "ENVID":
        if len(value) > 100 or not _XTEXT.fullmatch(value):
            raise ParameterError("ENVID is xtext of at most 100 characters")
    elif name == "NOTIFY":
        _check_notify(value)
    elif name == "ORCPT":
        kind, sep, address = value.partition(";")
        if not sep or not _ADDRESS_TYPE.fullmatch(kind) or not _XTEXT.fullmatch(address):
            raise ParameterError("ORCPT is address-type;xtext")
        if len(value) > 500:
            raise ParameterError("ORCPT is too long")


def _check_notify(value: str) -> None:
    values = value.upper().split(",")
    if values != ["NEVER"] and (
        not set(values) <= set(NOTIFY_VALUES) or len(set(values)) != len(values)
    ):
        raise ParameterError("NOTIFY is NEVER, or SUCCESS, FAILURE and DELAY")


def option(options: tuple[str, ...] | list[str], name: str) -> str | None:
    """The value of the DSN parameter ``name`` among these options, if given."""
    prefix = name + "="
    for o in options:
        if o.upper().startswith(prefix):
            return o[len(prefix) :]
    return None


def notify(options: tuple[str, ...] | list[str]) -> frozenset[str] | None:
    """What a recipient's sender asked to hear of (``NOTIFY``), or None when it
    did not say (then failures and delays are reported, as without the extension)."""
    value = option(options, "NOTIFY")
    if value is None:
        return None
    values = frozenset(value.upper().split(","))
    return frozenset() if values == {"NEVER"} else values


def wants(options: tuple[str, ...] | list[str], event: str) -> bool:
    """Whether the sender is to hear of this recipient's ``event`` (SUCCESS,
    FAILURE, DELAY)."""
    asked = notify(options)
    return event in ("FAILURE", "DELAY") if asked is None else event in asked


def xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
