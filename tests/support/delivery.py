"""Helpers of the whole-gateway delivery tests: start a gateway in the delivery world,
send a message, read its recipients' states; publish DANE records."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import make_message, queued, smtp_client

SUBJECT = "Biopsy result for J. Roe"


BODY = "The margins are clear.\r\n"


async def start(gateway_factory, world, pki, policy=None, **overrides):
    return await gateway_factory(
        world.config({"delivery.retry_schedule": ["1s"], **overrides}, policy=policy)
    )


async def send(gw, rcpts, sender="doctor@clinic.test"):
    async with smtp_client(gw) as client:
        await client.sendmail(sender, rcpts, make_message(SUBJECT, BODY))
    (path,) = queued(gw)
    return path.name


async def refusing_and_sender(world, plain_ip: str, clinic_ip: str, **plain):
    """mx.plain.test, which refuses gone@plain.test (550 5.1.1), and the sender's own
    mx.clinic.test, where its DSNs arrive; both in DNS.  ``plain``: more of the
    first one's settings (``cert=None``: no STARTTLS)."""
    gone = await world.mta(
        "mx.plain.test",
        plain_ip,
        rcpt_replies={"gone@plain.test": "550 5.1.1 No such user"},
        **plain,
    )
    clinic = await world.mta("mx.clinic.test", clinic_ip)
    world.dns.add("plain.test", "MX", "10 mx.plain.test.")
    world.dns.add("clinic.test", "MX", "10 mx.clinic.test.")
    return gone, clinic


def done(gw, queue_id) -> bool:
    message = gw.queue.store.message(queue_id)
    return bool(message and message["done"])


def depth(gw, state: str) -> float:
    return gw.metrics.registry.get_sample_value("sealgate_queue_recipients", {"state": state})


def state(gw, queue_id):
    return {r.address: (r.state, r.status) for r in gw.queue.store.recipients(queue_id)}


def publish(world, host: str, record: str) -> None:
    name = f"_{world.port}._tcp.{host}"
    world.dns.add(name, "TLSA", record)
    world.dns.secure(name)


def spki_sha256(cert_der: bytes) -> str:
    spki = (
        x509.load_der_x509_certificate(cert_der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).hexdigest()
