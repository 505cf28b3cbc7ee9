"""SMTP AUTH cannot be brute-forced across connections: failures count per client
address and per user name over smtp.auth_failure_window, and once over the limit an
attempt is refused (454 4.7.0) before any password is hashed - the right password
included."""

from __future__ import annotations

import aiosmtplib
import pytest

from gateway.smtp.auth import hash_password
from tests.conftest import smtp_client
from tests.support.clock import Clock


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"m365:{hash_password('correct horse')}\nother:{hash_password('x')}\n")
    return path


def count(gw, result: str) -> float:
    return gw.metrics.auth.labels(result)._value.get()


async def guess(gw, source: str, user: str, password: str) -> int:
    """One AUTH PLAIN on a new connection; the reply code."""
    async with smtp_client(gw, source=source) as client:
        try:
            response = await client.auth_plain(user, password)
        except aiosmtplib.SMTPAuthenticationError as e:
            return e.code
        except aiosmtplib.SMTPResponseException as e:
            return e.code
        return response.code


async def test_failures_from_one_address_over_many_connections_are_throttled(
    gateway_factory, users_file
):
    gw = await gateway_factory(
        {
            "relay.users_file": str(users_file),
            "smtp.max_auth_failures_per_ip": 5,
            "smtp.max_auth_failures_per_user": 100,
        }
    )
    codes = [await guess(gw, "127.0.0.2", "m365", f"wrong {n}") for n in range(8)]
    assert codes == [535] * 5 + [454] * 3
    # the right password too: nobody learns whether the guess was right
    assert await guess(gw, "127.0.0.2", "m365", "correct horse") == 454
    assert count(gw, "failure") == 5  # no password was hashed after the fifth
    assert count(gw, "throttled") == 4
    # another address is not affected
    assert await guess(gw, "127.0.0.3", "m365", "correct horse") == 235


async def test_failures_for_one_user_from_many_addresses_are_throttled(gateway_factory, users_file):
    gw = await gateway_factory(
        {
            "relay.users_file": str(users_file),
            "smtp.max_auth_failures_per_ip": 100,
            "smtp.max_auth_failures_per_user": 4,
        }
    )
    codes = [await guess(gw, f"127.0.0.{10 + n}", "m365", "wrong") for n in range(6)]
    assert codes == [535] * 4 + [454] * 2
    assert await guess(gw, "127.0.0.30", "m365", "correct horse") == 454
    assert await guess(gw, "127.0.0.30", "other", "x") == 235  # another user is not


async def test_the_count_forgets_failures_after_the_window(gateway_factory, users_file):
    gw = await gateway_factory(
        {
            "relay.users_file": str(users_file),
            "smtp.max_auth_failures_per_ip": 2,
            "smtp.auth_failure_window": "1s",
        }
    )
    clock = Clock.install(gw.smtp.ctx.auth_throttle)
    assert [await guess(gw, "127.0.0.2", "m365", "wrong") for _ in range(3)] == [535, 535, 454]
    clock.advance(1.2)
    assert await guess(gw, "127.0.0.2", "m365", "correct horse") == 235
