"""Showing a stored message safely: its parts, the body as escaped plain text or as
HTML through an allow-list sanitiser (nh3, i.e. ammonia: no scripts, event handlers,
styles, forms, frames or remote content), inline images only from the message itself
(``cid:`` references rewritten to the portal's own part URLs), attachments listed for
download."""

from __future__ import annotations

import email
import email.policy
import html
import re
from dataclasses import dataclass
from email.message import EmailMessage

import nh3

TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "code", "dd", "div", "dl", "dt",
    "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "li", "ol", "p", "pre",
    "q", "s", "small", "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot",
    "th", "thead", "tr", "u", "ul",
}  # fmt: skip
ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
}
_CID_SRC = re.compile(r'src="cid:([^"]*)"')


@dataclass(frozen=True)
class Part:
    index: int
    content_type: str
    filename: str | None
    content_id: str | None
    size: int


@dataclass(frozen=True)
class Rendered:
    subject: str
    sender: str
    date: str
    body_html: str  # safe to put in the page
    attachments: list[Part]


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[tuple[Part, EmailMessage]]:
    out = []
    for index, part in enumerate(msg.walk()):
        if part.is_multipart():
            continue
        assert isinstance(part, EmailMessage)
        payload = part.get_payload(decode=True) or b""
        cid = part.get("Content-ID")
        out.append(
            (
                Part(
                    index,
                    part.get_content_type(),
                    safe_filename(part.get_filename()),
                    cid.strip().strip("<>") if cid else None,
                    len(payload) if isinstance(payload, bytes) else 0,
                ),
                part,
            )
        )
    return out


def _keep_cid_images_only(tag: str, attribute: str, value: str) -> str | None:
    if tag == "img" and attribute == "src" and not value.startswith("cid:"):
        return None  # remote or data: images never load (and the CSP agrees)
    return value


def sanitize(markup: str, cid_url: dict[str, str]) -> str:
    """Allow-listed HTML; ``cid:`` images pointed at ``cid_url`` (others dropped)."""
    clean = nh3.clean(
        markup,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes={"http", "https", "mailto", "cid"},
        attribute_filter=_keep_cid_images_only,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )

    def local(m: re.Match[str]) -> str:
        url = cid_url.get(html.unescape(m.group(1)))
        return f'src="{html.escape(url)}"' if url else 'src=""'

    return _CID_SRC.sub(local, clean)


def render(data: bytes, part_url: str) -> Rendered:
    """``part_url``: the URL of part N, with ``{n}`` in it."""
    msg = parse(data)
    found = parts(msg)
    cid_url = {p.content_id: part_url.format(n=p.index) for p, _ in found if p.content_id}
    html_part = next(
        (m for p, m in found if p.content_type == "text/html" and not p.filename), None
    )
    text_part = next(
        (m for p, m in found if p.content_type == "text/plain" and not p.filename), None
    )
    if html_part is not None:
        body = sanitize(str(html_part.get_content()), cid_url)
    elif text_part is not None:
        body = f'<pre class="plain">{html.escape(str(text_part.get_content()))}</pre>'
    else:
        body = "<p><em>This message has no text.</em></p>"
    shown = {html_part, text_part}
    inline = {
        p.content_id for p, _ in found if p.content_id and p.content_id in body_cids(body, cid_url)
    }
    attachments = [
        p
        for p, m in found
        if m not in shown and not (p.content_id in inline and p.content_type.startswith("image/"))
    ]
    return Rendered(
        subject=str(msg.get("Subject", "")),
        sender=str(msg.get("From", "")),
        date=str(msg.get("Date", "")),
        body_html=body,
        attachments=attachments,
    )


def body_cids(body: str, cid_url: dict[str, str]) -> set[str]:
    """The content ids whose images the sanitised body shows."""
    shown = set()
    for cid, url in cid_url.items():
        if f'src="{html.escape(url)}"' in body:
            shown.add(cid)
    return shown


def part_bytes(data: bytes, index: int) -> tuple[Part, bytes]:
    for p, m in parts(parse(data)):
        if p.index == index:
            payload = m.get_payload(decode=True)
            return p, payload if isinstance(payload, bytes) else b""
    raise KeyError(index)


_UNSAFE_IN_NAME = re.compile(r'[\x00-\x1f\x7f-\x9f"\\/:*?<>|]')


def safe_filename(name: str | None) -> str | None:
    """A file name a browser can be given (and a reply can carry): its last path
    component only (never ``../../etc/passwd``), without control characters (a CR
    or LF would end the header), quotes or characters file systems refuse, without
    leading dots, at most 150 characters.  None when nothing is left."""
    if name is None:
        return None
    name = re.split(r"[\\/]", name)[-1]
    name = _UNSAFE_IN_NAME.sub("_", name).strip().lstrip(".").strip()
    return name[:150] or None
