"""The sanitiser against script, event-handler, CSS and remote-content injection,
and what a stored message looks like in the portal."""

from __future__ import annotations

import pytest

from gateway.portal.render import part_bytes, render, sanitize

URLS = {"logo@x": "/m/T/part/3"}


@pytest.mark.parametrize(
    "attack, forbidden",
    [
        ("<script>alert(1)</script>", ["<script", "alert"]),
        ("<SCRIPT SRC=//evil.test/x.js></SCRIPT>", ["script", "evil.test"]),
        ('<img src=x onerror="alert(1)">', ["onerror", "alert"]),
        ('<p onclick="steal()">hi</p>', ["onclick", "steal"]),
        ('<a href="javascript:alert(1)">x</a>', ["javascript:"]),
        ('<a href="data:text/html;base64,PHNjcmlwdD4=">x</a>', ["data:"]),
        ("<svg><script>alert(1)</script></svg>", ["<svg", "<script", "alert"]),
        ("<style>body{background:url(//evil.test/t.gif)}</style>", ["<style", "evil.test"]),
        ('<div style="background:url(https://evil.test/t.gif)">x</div>', ["style=", "evil.test"]),
        ('<img src="https://tracker.test/pixel.gif">', ["tracker.test"]),
        ('<img src="data:image/png;base64,AAAA">', ["data:"]),
        ('<iframe src="https://evil.test/"></iframe>', ["<iframe", "evil.test"]),
        (
            '<form action="https://evil.test/"><input name=p></form>',
            ["<form", "<input", "evil.test"],
        ),
        ('<object data="x.swf"></object><embed src="x">', ["<object", "<embed"]),
        ('<meta http-equiv="refresh" content="0;url=https://evil.test/">', ["<meta", "evil.test"]),
        ('<base href="https://evil.test/">', ["<base", "evil.test"]),
        ('<link rel=stylesheet href="https://evil.test/x.css">', ["<link", "evil.test"]),
        ("<!--[if IE]><script>alert(1)</script><![endif]-->", ["script", "alert"]),
        ('<img src="cid:unknown@x">', ["cid:"]),
    ],
)
def test_the_sanitiser_removes(attack, forbidden):
    clean = sanitize(f"<p>before</p>{attack}<p>after</p>", URLS)
    for text in forbidden:
        assert text.lower() not in clean.lower(), clean
    assert "before" in clean and "after" in clean


def test_the_message_s_own_images_and_plain_markup_survive():
    clean = sanitize(
        '<p>Dear <b>J.</b>, see <a href="https://clinic.test/faq">the FAQ</a>.</p>'
        '<img src="cid:logo@x" alt="logo"><table><tr><td>1</td></tr></table>',
        URLS,
    )
    assert '<img src="/m/T/part/3" alt="logo">' in clean
    assert '<a href="https://clinic.test/faq" rel="noopener noreferrer nofollow">' in clean
    assert "<b>J.</b>" in clean and "<td>1</td>" in clean


MESSAGE = (
    b"From: Dr Who <dr@clinic.test>\r\nTo: p@dest.test\r\nSubject: Results\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b'--b1\r\nContent-Type: multipart/related; boundary="b2"\r\n\r\n'
    b"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<p>Hello <img src="cid:logo@x" onerror="x()"></p><script>bad()</script>\r\n'
    b"--b2\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"iVBORw0KGgo=\r\n--b2--\r\n"
    b'--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="lab.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
)


def test_a_message_renders_with_inline_image_and_attachment():
    shown = render(MESSAGE, "/m/T/part/{n}")
    assert shown.subject == "Results" and "dr@clinic.test" in shown.sender
    assert '<img src="/m/T/part/3">' in shown.body_html
    assert "bad()" not in shown.body_html and "onerror" not in shown.body_html
    (attachment,) = shown.attachments
    assert attachment.filename == "lab.pdf"
    part, data = part_bytes(MESSAGE, attachment.index)
    assert data == b"%PDF-1.4\n" and part.content_type == "application/pdf"


def test_plain_text_is_escaped():
    shown = render(b"Subject: x\r\n\r\n<script>alert(1)</script>\r\n", "/p/{n}")
    assert "&lt;script&gt;" in shown.body_html and "<script" not in shown.body_html
