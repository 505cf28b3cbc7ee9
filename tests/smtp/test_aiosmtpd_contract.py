"""What the listener takes from aiosmtpd's internals, checked against the installed
release: `GatewaySMTP.__init__` sets up the state `aiosmtpd.smtp.SMTP.__init__`
would (without its per-connection scans), and reaches private names, hooks and
helpers.  When aiosmtpd changes them, this fails before a connection does; then
re-read `gateway/smtp/server.py` against the new release and move the pin in
pyproject.toml."""

from __future__ import annotations

import asyncio
import inspect

import aiosmtpd
import aiosmtpd.smtp as aio
from aiosmtpd.smtp import SMTP

from gateway.smtp.server import GatewaySMTP
from tests.conftest import RawSmtp

# names of aiosmtpd.smtp the listener imports or calls
MODULE_NAMES = (
    "MISSING",
    "TLSSetupException",
    "_AuthMechAttr",
    "_Missing",
    "login_always_fail",
    "syntax",
)
# methods of SMTP the listener overrides or calls (super(), or from its own code)
METHODS = (
    "_handle_client",
    "_getaddr",
    "_timeout_cb",
    "_reset_timeout",
    "_set_post_data_state",
    "_set_rset_state",
    "_cb_client_connected",
    "check_helo_needed",
    "challenge_auth",
    "handle_exception",
    "push",
    "smtp_EHLO",
    "smtp_HELO",
    "smtp_STARTTLS",
    "smtp_DATA",
    "connection_made",
    "connection_lost",
    "data_received",
)


def test_the_pinned_release_series_is_installed():
    assert aiosmtpd.__version__.startswith("1.4."), aiosmtpd.__version__


def test_the_private_names_the_listener_uses_exist():
    missing = [n for n in MODULE_NAMES if not hasattr(aio, n)]
    missing += [m for m in METHODS if not callable(getattr(SMTP, m, None))]
    assert missing == []
    assert list(inspect.signature(SMTP.challenge_auth).parameters) == [
        "self",
        "challenge",
        "encode_to_b64",
        "log_client_response",
    ]
    assert inspect.signature(aio._AuthMechAttr).parameters.keys() == {"method", "is_builtin"}


class _Handler:
    pass


async def test_the_listener_sets_up_every_attribute_aiosmtpd_would(gateway_factory):
    gw = await gateway_factory()
    theirs = SMTP(_Handler(), enable_SMTPUTF8=True, decode_data=False)
    ours = GatewaySMTP(gw.smtp.ctx)
    set_by_aiosmtpd = set(vars(theirs))
    assert set_by_aiosmtpd - set(vars(ours)) == set()  # nothing aiosmtpd needs is missing
    assert asyncio.iscoroutinefunction(SMTP._handle_client)


def test_aiosmtpd_reads_the_table_of_smtp_methods_only_by_get_and_items():
    # GatewaySMTP's table (_Verbs) binds a method when asked and offers only these two
    source = inspect.getsource(SMTP)
    uses = source.count("self._smtp_methods")
    assert uses == 1 + source.count("self._smtp_methods.get(") + source.count(
        "self._smtp_methods.items()"
    )  # the one more is its assignment in __init__


async def test_commands_and_help_reach_the_listeners_own_methods(gateway_factory):
    gw = await gateway_factory({"relay.require_tls": False})
    s = await RawSmtp.open(gw)
    assert (await s.command("EHLO client.test")).startswith("250")
    listed = await s.command("HELP")
    assert listed.startswith("250 2.0.0 Supported commands: "), listed
    # the commands the listener overrides as well as those it inherits
    assert {"DATA", "EHLO", "MAIL", "NOOP", "QUIT", "RCPT", "STARTTLS"} <= set(listed.split()[4:])
    assert (await s.command("HELP MAIL")).startswith("250 2.0.0 Syntax: MAIL FROM: <address>")
    assert (await s.command("HELP FROB")).startswith("501 ")
    assert (await s.command("FROB")).startswith("500 ")
    assert (await s.command("QUIT")).startswith("221")
    await s.close()
