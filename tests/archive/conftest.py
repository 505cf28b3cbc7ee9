"""The delivery test world (DNS fixture, recipient MTAs on 127.0.0.x) for archive tests."""

from tests.delivery.conftest import world  # noqa: F401 - a fixture, used by name
