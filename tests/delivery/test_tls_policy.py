"""TLS levels are ordered and answer delivery's questions."""

from __future__ import annotations

import pytest

from gateway.delivery.tls_policy import TlsLevel


def test_levels_are_ordered_weakest_first():
    assert TlsLevel.NONE < TlsLevel.MAY < TlsLevel.ENCRYPT < TlsLevel.VERIFY
    assert TlsLevel.VERIFY < TlsLevel.MTA_STS < TlsLevel.DANE


def test_predicates():
    assert TlsLevel.MAY.allows_plaintext and TlsLevel.MAY.attempts_tls
    assert not TlsLevel.NONE.attempts_tls
    assert TlsLevel.ENCRYPT.requires_tls and not TlsLevel.ENCRYPT.verifies_certificate
    assert TlsLevel.VERIFY.verifies_certificate and not TlsLevel.VERIFY.allows_plaintext
    assert TlsLevel.DANE.requires_tls


def test_parse_accepts_labels_and_names_the_choices_when_wrong():
    assert TlsLevel.parse("mta-sts") is TlsLevel.MTA_STS
    assert TlsLevel.parse(" Verify ") is TlsLevel.VERIFY
    with pytest.raises(ValueError, match="'secure' is not a TLS level .*none, may, encrypt"):
        TlsLevel.parse("secure")
