"""charts - the overview's charts as numbers the templates draw as SVG (rectangles
with presentation attributes: no script, no inline style, nothing fetched)."""

from __future__ import annotations

from collections import Counter
from typing import Any

MODE_COLOURS = {
    "tls": "#2b6cb0",
    "smime": "#2f855a",
    "pgp": "#6b46c1",
    "portal": "#c05621",
    "hold": "#718096",
    "bounce": "#9b2c2c",
}
TRANSPORT_LABELS = {
    "dane": "DANE",
    "mta-sts": "MTA-STS",
    "pkix": "Verified (PKIX)",
    "unverified": "TLS, not verified",
    "no-tls": "No TLS",
}
WIDTH, HEIGHT, TOP = 720, 180, 10


def totals(days: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The counts of all the days added up."""
    out: dict[str, Any] = {"messages": 0}
    for key in ("modes", "states", "tls_versions", "transports", "portal"):
        total: Counter[str] = Counter()
        for _, counts in days:
            total.update(counts.get(key, {}))
        out[key] = dict(total)
    out["messages"] = sum(int(c.get("messages", 0)) for _, c in days)
    return out


def stacked_days(
    days: list[tuple[str, dict[str, Any]]], key: str, colours: dict[str, str]
) -> dict[str, Any]:
    """One bar per day, stacked by the values of ``counts[key]`` (in ``colours``'
    order), scaled to the highest day."""
    highest = max((sum(c.get(key, {}).values()) for _, c in days), default=0) or 1
    step = WIDTH / max(1, len(days))
    bars = []
    for i, (day, counts) in enumerate(days):
        values = counts.get(key, {})
        y = float(TOP + HEIGHT)
        segments = []
        for name, colour in colours.items():
            n = int(values.get(name, 0))
            if not n:
                continue
            h = HEIGHT * n / highest
            y -= h
            segments.append(
                {"y": round(y, 1), "h": round(h, 1), "colour": colour, "n": n, "name": name}
            )
        bars.append(
            {
                "day": day,
                "x": round(i * step + step * 0.1, 1),
                "w": round(step * 0.8, 1),
                "segments": segments,
                "total": sum(int(v) for v in values.values()),
            }
        )
    return {
        "width": WIDTH,
        "height": HEIGHT + TOP + 20,
        "base": TOP + HEIGHT,
        "highest": highest,
        "bars": bars,
        "legend": list(colours.items()),
        "first": days[0][0] if days else "",
        "last": days[-1][0] if days else "",
    }


def bars(values: dict[str, int], labels: dict[str, str]) -> list[dict[str, Any]]:
    """Horizontal bars, largest first, each with its share of the whole."""
    total = sum(values.values()) or 1
    highest = max(values.values(), default=0) or 1
    return [
        {
            "label": labels.get(name, name),
            "n": n,
            "share": round(100 * n / total, 1),
            "w": round(300 * n / highest, 1),
        }
        for name, n in sorted(values.items(), key=lambda kv: -kv[1])
    ]
