#!/usr/bin/env python3
"""Policy evaluation cost per recipient, with a warm probe cache.

    .venv/bin/python bench/policy.py [--recipients 20000]

Measures, on this machine, in one process:

- ``decide`` alone (the pure engine) for the default and the hipaa-strict policy;
- the whole per-recipient step the queue manager takes before delivery: facts from
  the warm probe cache (a real probe of an SMTP server on loopback filled it) plus the
  key-store lookup, then ``decide``;
- reading a message's features once per message (headers, subject; for
  hipaa-strict also the PHI classifiers over every text part), for 4 KB and 50 KB;
- the classifiers reading an attached 2 MB PDF (issue 18: text on every page, each
  page's content stream compressed, as word processors write them) and a DOCX.

The budget (issue 4): under 1 ms per recipient with a warm cache.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiosmtpd.smtp import SMTP  # noqa: E402

from gateway.config import HostPort  # noqa: E402
from gateway.delivery.router import Router  # noqa: E402
from gateway.policy.engine import decide  # noqa: E402
from gateway.policy.features import message_features  # noqa: E402
from gateway.policy.language import load_policy  # noqa: E402
from gateway.probe.dns import Resolver  # noqa: E402
from gateway.probe.prober import Prober, ProbeSettings  # noqa: E402

POLICIES = ROOT / "policies"


class Sink:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


def message(size: int) -> bytes:
    head = (
        "From: dr@clinic.test\r\nTo: pat@bench.test\r\nSubject: Follow-up visit\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = "The results look fine; please book a follow-up in two weeks, as discussed.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return (head + body).encode()


def per_call_us(fn: object, n: int, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


async def per_call_us_async(fn: object, n: int, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            await fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


async def main_async(recipients: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(Sink()), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        resolver = Resolver()  # never asked: the domain has a static route
        router = Router(resolver, port, {"bench.test": HostPort("127.0.0.1", port)})
        prober = Prober(router, resolver, ProbeSettings("bench.sealgate.test"))
        facts = await prober.recipient("pat@bench.test")  # the probe: one real connection
        assert facts.domain.known, facts.domain
        policies = {
            name: load_policy(path)
            for name, path in (
                ("default", POLICIES / "default.yaml"),
                ("hipaa-strict", POLICIES / "examples" / "hipaa-strict.yaml"),
            )
        }
        print(f"recipients per round: {recipients}, median of 5 rounds")
        for name, policy in policies.items():
            features = message_features(policy, message(4096))

            def one(policy=policy, features=features) -> None:  # type: ignore[no-untyped-def]
                decide(policy, "dr@clinic.test", "pat@bench.test", features, facts, 0.0)

            engine = per_call_us(one, recipients)

            async def step(policy=policy, features=features) -> None:  # type: ignore[no-untyped-def]
                f = await prober.recipient("pat@bench.test")
                decide(policy, "dr@clinic.test", "pat@bench.test", features, f, 0.0)

            whole = await per_call_us_async(step, recipients)
            print(
                f"{name:<13} decide: {engine:7.1f} us/recipient   "
                f"warm facts + keys + decide: {whole:7.1f} us/recipient "
                f"({whole / 1000:.3f} of the 1 ms budget: "
                f"{'met' if whole < 1000 else 'NOT met'})"
            )
        for name, policy in policies.items():
            for size in (4096, 51200):
                data = message(size)
                cost = per_call_us(lambda p=policy, d=data: message_features(p, d), 500)
                kb = size // 1024
                print(f"{name:<13} message features, {kb:>2} KB: {cost / 1000:6.3f} ms/message")
        strict = policies["hipaa-strict"]
        for label, data in documents():
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                features = message_features(strict, data)
                runs.append(time.perf_counter() - started)
            phi = features.content["phi"]
            print(
                f"hipaa-strict  {label}: {statistics.median(runs) * 1000:7.1f} ms/message "
                f"(median of 5; {phi.count} match(es){', ' + phi.error if phi.error else ''})"
            )
    finally:
        server.close()
        await server.wait_closed()


def documents() -> list[tuple[str, bytes]]:
    """A message with a PDF of about 2 MB (a lab report: 45 lines a page, one SSN on
    the last page) and one with a DOCX of the same text."""
    from tests.support.documents import DOCX_TYPE, PDF_TYPE, docx, pdf, with_attachment

    line = "Hemoglobin A1c 6.1 % (4.0-5.6)  reference lab  result within 30 days of visit"
    pages = [[f"{line} {p}.{i}" for i in range(45)] for p in range(450)]
    pages[-1].append("Patient SSN 123-45-6789")
    document = pdf(pages, compress=False)
    text = docx([[row] for page in pages[:200] for row in page] + [[pages[-1][-1]]])
    return [
        (f"attached PDF {len(document) / 1e6:.1f} MB, {len(pages)} pages",
         with_attachment(document, PDF_TYPE)),
        (f"attached DOCX {len(text) / 1e6:.2f} MB, 9,000 paragraphs",
         with_attachment(text, DOCX_TYPE, "r.docx")),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipients", type=int, default=20000)
    args = ap.parse_args()
    asyncio.run(main_async(args.recipients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
