"""Canonical JSON with parts made once (`gateway.canonical`): the archive's attempt
record holds the decision and evidence the queue state wrote, and its bytes must be
those of encoding the whole in place."""

from __future__ import annotations

import json

import pytest

from gateway.canonical import _MARK, Encoded, canonical_text, encoded

DECISION = {
    "mode": "tls",
    "reasons": ["tls: level verify (Überweisung) reaches verify", 'a "quoted" \\ reason'],
    "facts": {"mx": [{"host": "mx.dest.test", "port": 25, "pkix_valid": None}], "at": 1.5e9},
    "rule": "defaults",
}
EVIDENCE = {"mx_host": "mx.dest.test", "reused": 0, "tls_version": None, "verification": "pkix"}


def _attempt(decision: object, evidence: object, diagnostic: str = "250 2.0.0 Ok") -> dict:
    return {
        "queue_id": "Q1",
        "kind": "attempt",
        "at": 1796563904.8280358,
        "recipients": [
            {"idx": i, "address": f"r{i}@dest.test", "diagnostic": diagnostic,
             "decision": decision, "evidence": evidence}
            for i in range(3)
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    "value",
    [DECISION, EVIDENCE, {}, [], None, "δοκιμή", 0.1, {"z": {"b": [1, {"y": 2, "a": 3}]}}],
    ids=["decision", "evidence", "empty-object", "empty-list", "null", "text", "float", "nested"],
)
def test_a_part_made_once_is_written_as_encoding_it_in_place_would(value):
    whole = canonical_text(_attempt(value, EVIDENCE))
    assert canonical_text(_attempt(encoded(value), encoded(EVIDENCE))) == whole
    assert whole == json.dumps(
        _attempt(value, EVIDENCE), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def test_text_from_outside_that_looks_like_a_stand_in_is_left_as_it_is():
    # what a stand-in looks like, but for another process's secret (and this one's
    # without its number): a server could send either
    lookalikes = ["\x000123456789abcdef:0", _MARK, f"{_MARK}x"]
    for text in lookalikes:
        value = _attempt(encoded(DECISION), encoded(EVIDENCE), diagnostic=text)
        assert json.loads(canonical_text(value))["recipients"][0]["diagnostic"] == text
        assert canonical_text(value) == canonical_text(_attempt(DECISION, EVIDENCE, text))


def test_bytes_that_were_not_utf8_are_escaped_so_the_record_can_be_stored():
    part = encoded({"diagnostic": "250 re\udce7u"})  # surrogateescape's way to keep \xe7
    assert part.text == '{"diagnostic":"250 re\\udce7u"}'
    assert canonical_text({"a": part}).encode() == b'{"a":{"diagnostic":"250 re\\udce7u"}}'


def test_a_part_made_of_parts_is_spliced_whole():
    inner = encoded(DECISION)
    outer = encoded({"decision": inner, "n": 1})
    assert outer.text == canonical_text({"decision": DECISION, "n": 1})
    assert canonical_text([outer, inner]) == canonical_text(
        [{"decision": DECISION, "n": 1}, DECISION]
    )


def test_what_is_no_json_value_is_still_refused():
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        canonical_text({"a": {1, 2}})
    assert isinstance(encoded(1), Encoded)
