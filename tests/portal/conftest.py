"""The delivery test world for portal tests."""

from tests.delivery.conftest import world  # noqa: F401 - a fixture, used by name
