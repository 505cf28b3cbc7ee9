"""Logs: one event per transaction outcome, never a subject or a body."""

from __future__ import annotations

import json

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from tests.conftest import RawSmtp, make_message, smtp_client

PHI_SUBJECT = "HIV test result for Jane Roe DOB 1970-01-02"
PHI_BODY = "SSN 123-45-6789, diagnosis B20\r\n"


async def test_accepted_transaction_is_one_event_with_the_documented_fields(gateway_factory):
    gw = await gateway_factory()
    with capture_logs() as logs:
        async with smtp_client(gw) as client:
            _, reply = await client.sendmail(
                "s@clinic.test", ["r@example.test"], make_message(PHI_SUBJECT, PHI_BODY)
            )
    (event,) = [e for e in logs if e["event"] == "smtp.message-accepted"]
    assert event["queue_id"] == reply.rsplit(" ", 1)[1]
    assert event["client_ip"] == "127.0.0.1"
    assert event["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert event["size"] == len(make_message(PHI_SUBJECT, PHI_BODY))
    assert event["result"] == "accepted"
    assert event["log_level"] == "info"


async def test_no_subject_or_body_reaches_the_logs_on_any_path(gateway_factory):
    gw = await gateway_factory({"smtp.max_message_size": "2KiB", "relay.require_tls": False})
    message = make_message(PHI_SUBJECT, PHI_BODY)
    with capture_logs() as logs:
        async with smtp_client(gw) as client:
            await client.sendmail("s@clinic.test", ["r@example.test"], message)
            with pytest.raises(aiosmtplib.SMTPSenderRefused):  # too big (declared SIZE)
                await client.sendmail(
                    "s@clinic.test", ["r@example.test"], message + b"x" * 3000 + b"\r\n"
                )
        s = await RawSmtp.start_data(gw)
        s.send(message.replace(b"diagnosis", b"diag\nnosis") + PHI_BODY.encode() + b".\r\n")
        assert (await s.reply()).startswith("554")
        await s.close()
    outcomes = {e["event"] for e in logs}
    assert {"smtp.message-accepted", "smtp.message-rejected"} <= outcomes
    dump = json.dumps(logs)
    for secret in ("HIV", "Jane Roe", "1970-01-02", "123-45-6789", "B20"):
        assert secret not in dump


@pytest.mark.parametrize(("mode", "shown"), [("plain", "r@example.test"), ("omit", None)])
async def test_address_logging_modes(gateway_factory, mode, shown):
    gw = await gateway_factory({"logging.addresses": mode})
    with capture_logs() as logs:
        async with smtp_client(gw) as client:
            await client.sendmail("s@clinic.test", ["r@example.test"], make_message())
    (event,) = [e for e in logs if e["event"] == "smtp.message-accepted"]
    assert event["rcpt"] == ([shown] if shown else None)
    if shown is None:
        assert "example.test" not in json.dumps(logs)


def test_the_redactor_keeps_hashes_it_made_and_each_is_the_addresses_own(monkeypatch):
    """An address seen before gives its hash again without an HMAC; a full store of
    them starts afresh; every answer is `hash_address`'s."""
    from gateway.observability import logging as sealgate_logging

    monkeypatch.setattr(sealgate_logging, "REDACTED_KEEP", 3)
    made: list[str] = []
    real = sealgate_logging.hash_address

    def counting(key: bytes, address: str) -> str:
        made.append(address)
        return real(key, address)

    monkeypatch.setattr(sealgate_logging, "hash_address", counting)
    redact = sealgate_logging.AddressRedactor("hash", b"k" * 32)
    addresses = ["a@x.test", "B@x.test", "a@x.test", "c@y.test", "d@y.test", "a@x.test"]
    assert [redact(a) for a in addresses] == [real(b"k" * 32, a) for a in addresses]
    # the third is kept; the fifth finds three kept, starts afresh; the sixth was dropped
    assert made == ["a@x.test", "B@x.test", "c@y.test", "d@y.test", "a@x.test"]
    assert redact("B@x.test") == real(b"k" * 32, "b@x.test") != redact("c@y.test")
