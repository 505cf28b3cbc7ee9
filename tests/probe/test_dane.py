"""DANE (RFC 7672/7671): which TLSA records are usable and how certificates match."""

from __future__ import annotations

import hashlib
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.probe.dane import Tlsa, verify


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def tlsa_data(cert_der: bytes, selector: int, mtype: int) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    data = (
        cert_der
        if selector == 0
        else cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}[mtype]


@pytest.fixture(scope="module")
def chain():
    """A leaf for mx1.dest.test issued by an intermediate of a private root."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mx1.dest.test")
    pems = [p.bytes() for p in leaf.cert_chain_pems]  # leaf, intermediate
    return root, intermediate, leaf, [der(p) for p in pems]


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (Tlsa(3, 1, 1, b"x" * 32), True),
        (Tlsa(2, 0, 2, b"x" * 64), True),
        (Tlsa(3, 0, 0, b"anything"), True),
        (Tlsa(1, 1, 1, b"x" * 32), False),  # PKIX-EE: not for SMTP
        (Tlsa(0, 0, 1, b"x" * 32), False),  # PKIX-TA
        (Tlsa(3, 2, 1, b"x" * 32), False),  # unknown selector
        (Tlsa(3, 1, 3, b"x" * 32), False),  # unknown matching type
        (Tlsa(3, 1, 1, b"x" * 31), False),  # a SHA-256 is 32 octets
    ],
)
def test_only_dane_ta_and_dane_ee_with_known_selectors_and_digests_are_usable(record, usable):
    assert record.usable is usable


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_server_certificate_without_name_checks(chain, selector, mtype):
    *_, presented = chain
    record = Tlsa(3, selector, mtype, tlsa_data(presented[0], selector, mtype))
    assert verify((record,), presented, "any-other-name.test") == "dane-ee"


def test_dane_ta_matches_an_issuer_in_the_chain_and_checks_the_name(chain):
    _, _, _, presented = chain
    record = Tlsa(2, 0, 1, tlsa_data(presented[1], 0, 1))
    assert verify((record,), presented, "mx1.dest.test") == "dane-ta"
    assert verify((record,), presented, "mx2.dest.test") is None  # wrong name


def test_a_certificate_matching_no_record_fails(chain):
    _, _, _, presented = chain
    other = trustme.CA().issue_cert("mx1.dest.test")
    other_der = der(other.cert_chain_pems[0].bytes())
    assert verify((Tlsa(3, 1, 1, tlsa_data(other_der, 1, 1)),), presented, "mx1.dest.test") is None
    # a DANE-TA record for a CA the server does not present does not match either
    assert verify((Tlsa(2, 0, 1, tlsa_data(other_der, 0, 1)),), presented, "mx1.dest.test") is None
