"""``sealgate tlsrpt show``: a day's TLS-RPT counts as the reports that are (or
will be) sent for them, and what became of the reports already sent.  Counts reach
the store once a minute: the last minute of a running gateway is not in them yet."""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.storage.stores import Storage
from gateway.tlsrpt.model import report_json
from gateway.tlsrpt.store import TlsRptStore


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    tlsrpt = sub.add_parser("tlsrpt", help="TLS reports (RFC 8460) to recipient domains")
    tsub = tlsrpt.add_subparsers(dest="tlsrpt_command", required=True, metavar="ACTION")
    show = with_config(
        tsub.add_parser(
            "show", help="a day's counts as reports (RFC 8460 JSON) and the reports sent"
        )
    )
    show.add_argument("--day", help="YYYY-MM-DD (UTC); default: today")
    show.add_argument("--domain", help="only this recipient domain")


def run(config: Config, args: argparse.Namespace) -> int:
    # (the daemon's modules, loaded by this command only: not by every other one's start)
    from gateway.smtp.context import smtp_hostname
    from gateway.tlsrpt.service import reporter_of

    day = args.day or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    try:
        datetime.datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise ConfigError("--day", f"{day!r} is not a date (YYYY-MM-DD)") from None
    storage = Storage(config)
    if not storage.exists("queue"):
        print(json.dumps({"day": day, "reports": [], "sent": []}, indent=2))
        return 0
    store = TlsRptStore(storage.open("queue"))
    try:
        counts = store.counts(day, args.domain)
        sent = [r for r in store.reports(day) if args.domain in (None, r["domain"])]
    finally:
        store.close()
    reporter = reporter_of(config, smtp_hostname(config))
    ids = {r["domain"]: r["report_id"] for r in sent}
    reports = [
        report_json(reporter, day, ids.get(domain, "(not sent yet)"), policies)
        for domain, policies in sorted(counts.items())
    ]
    print(json.dumps({"day": day, "reports": reports, "sent": sent}, indent=2))
    return 0
