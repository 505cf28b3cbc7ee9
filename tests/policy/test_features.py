"""Reading the message once, and removing subject tags from the copy delivered."""

from __future__ import annotations

import email
import email.policy

from gateway.policy.features import message_features, strip_subject_tags
from gateway.policy.language import load_policy_text

POLICY = load_policy_text(
    "version: 1\nrules:\n  - name: t\n    when: {subject_tag: '[secure]'}\n    then: {minimum: end-to-end}\n"
)


def test_headers_are_read_by_lower_case_name_and_decoded():
    data = b"Subject: =?utf-8?q?R=C3=A9sultats?= [secure]\r\nX-A: 1\r\nX-a: 2\r\n\r\nbody\r\n"
    f = message_features(POLICY, data)
    assert f.subject == "Résultats [secure]"
    assert f.headers["x-a"] == ("1", "2")
    assert f.content == {}  # no rule reads the content: the classifiers did not run


def test_a_tag_is_removed_and_the_rest_is_byte_identical():
    head = b"From: a@b.test\r\nSubject: [SECURE]  Lab results\r\nTo: c@d.test\r\n\r\n"
    body = b"line 1\r\n[secure] stays in the body\r\n"
    out = strip_subject_tags(head + body, ("[secure]",))
    assert out == b"From: a@b.test\r\nSubject: Lab results\r\nTo: c@d.test\r\n\r\n" + body


def test_a_subject_in_bytes_that_are_not_utf8_keeps_them_without_the_tag():
    # raw Latin-1 (no RFC 2047): once an error at every attempt, the message retried
    # until it expired
    data = b"Subject: [secure] Befund f\xfcr Herrn M\xfcller\r\nTo: c@d.test\r\n\r\nbody\r\n"
    out = strip_subject_tags(data, ("[secure]",))
    assert out == b"Subject: Befund f\xfcr Herrn M\xfcller\r\nTo: c@d.test\r\n\r\nbody\r\n"


def test_a_folded_encoded_subject_is_decoded_stripped_and_encoded_again():
    data = (
        b"Subject: =?utf-8?q?R=C3=A9sultats_de?=\r\n =?utf-8?q?_labo_=5Bsecure=5D?=\r\n"
        b"From: a@b.test\r\n\r\nbody\r\n"
    )
    out = strip_subject_tags(data, ("[secure]",))
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["subject"] == "Résultats de labo"
    assert msg["from"] == "a@b.test" and out.endswith(b"\r\n\r\nbody\r\n")


def test_no_subject_or_no_tags_leaves_the_message_alone():
    data = b"From: a@b.test\r\n\r\nSubject: [secure]\r\n"
    assert strip_subject_tags(data, ("[secure]",)) is data
