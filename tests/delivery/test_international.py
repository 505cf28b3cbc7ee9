"""Mail Sealgate writes itself to or about an address that is not ASCII (RFC 6531):
the portal's notification and code to such a recipient, a DSN to such a sender.  Each
goes out with SMTPUTF8 and names the address as UTF-8 (RFC 6532, RFC 6533) - before,
the queue set every one of them aside, as the listener refuses a non-ASCII address
without SMTPUTF8, and the recipient never heard of the message."""

from __future__ import annotations

from email import message_from_string
from email.policy import SMTPUTF8

from gateway.delivery.dsn import ReportedRecipient, build_dsn
from gateway.spool.submit import mail_options_for
from tests.conftest import make_message, smtp_client
from tests.support.delivery import refusing_and_sender
from tests.support.portal import code_in, request_code
from tests.support.world import wait_until

PATIENT = "patiënt@plain.test"


def _quarantined(gw) -> list[str]:
    return sorted(p.name for p in gw.spool.quarantine_dir.iterdir())


async def test_a_portal_recipient_whose_address_is_not_ascii_gets_the_notice_and_the_code(
    portal,
):
    gw, plain, link, http, _ = await portal(recipient=PATIENT)
    notice = plain.received[0]
    assert notice.rcpt_tos == [PATIENT] and "SMTPUTF8" in notice.mail_options
    parsed = message_from_string(notice.data.decode(), policy=SMTPUTF8)
    assert parsed["To"].addresses[0].addr_spec == PATIENT
    assert f"To: {PATIENT}\r\n".encode() in notice.data  # as UTF-8, not an encoded word
    assert b"Biopsy" not in notice.data

    csrf, code = await request_code(http, link, plain)
    message = plain.received[1]
    assert message.rcpt_tos == [PATIENT] and "SMTPUTF8" in message.mail_options
    assert f"To: {PATIENT}\r\n".encode() in message.data
    assert code == code_in(message.data)
    async with http.post(link + "/login", data={"csrf": csrf, "code": code}) as r:
        assert "Biopsy" in await r.text()
    assert _quarantined(gw) == []


async def test_a_bounce_to_a_sender_whose_address_is_not_ascii_reaches_the_sender(
    gateway_factory, world
):
    _, clinic = await refusing_and_sender(world, "127.0.0.96", "127.0.0.97")
    gw = await gateway_factory(world.config())
    async with smtp_client(gw) as client:
        await client.sendmail(
            "ärztin@clinic.test",
            ["gone@plain.test"],
            make_message("Biopsy"),
            mail_options=["SMTPUTF8"],
        )
    await wait_until(lambda: clinic.received, what="the DSN at the sender's server")
    (dsn,) = clinic.received
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["ärztin@clinic.test"]
    assert "SMTPUTF8" in dsn.mail_options
    text = dsn.data.decode()
    assert "To: <ärztin@clinic.test>" in text and "5.1.1" in text and "Biopsy" not in text
    assert _quarantined(gw) == []


def test_a_report_naming_an_address_that_is_not_ascii_is_a_global_delivery_status():
    def report(address: str) -> str:
        return build_dsn(
            sender="doctor@clinic.test",
            failed=[ReportedRecipient(address, "5.1.1", "550 5.1.1 No such user")],
            reporting_mta="gw.example",
            queue_id="Q1",
            arrival="2026-12-06T01:00:00+00:00",
            original=make_message(),
        ).decode()

    utf8 = report(PATIENT)
    assert "report-type=global-delivery-status" in utf8
    assert "Content-Type: message/global-delivery-status" in utf8
    assert f"Final-Recipient: utf-8; {PATIENT}" in utf8
    ascii_only = report("patient@plain.test")
    assert "report-type=delivery-status" in ascii_only
    assert "Content-Type: message/delivery-status" in ascii_only


def test_sealgate_s_own_mail_asks_for_what_its_addresses_and_bytes_need():
    assert mail_options_for("", ["a@b.test"], b"ascii") == ()
    assert mail_options_for("", [PATIENT], b"ascii") == ("SMTPUTF8",)
    assert mail_options_for("ärztin@clinic.test", ["a@b.test"], b"x") == ("SMTPUTF8",)
    assert mail_options_for("", ["a@b.test"], "\r\n\r\nGrüße".encode()) == ("BODY=8BITMIME",)
    # (an API message may end its lines with LF alone: its body is still its body)
    assert mail_options_for("", ["a@b.test"], "S: x\n\nGrüße".encode()) == ("BODY=8BITMIME",)
    # a header naming such an address (a portal reply's Reply-To) needs SMTPUTF8 too
    head = f"Reply-To: {PATIENT}\r\n\r\nDanke\r\n".encode()
    assert mail_options_for("", ["a@b.test"], head) == ("SMTPUTF8", "BODY=8BITMIME")
