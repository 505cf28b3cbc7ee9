#!/usr/bin/env python3
"""The full hostile battery against one gateway on loopback (``make hostile``).

    .venv/bin/python bench/hostile.py [--seed 13] [--scale 1.0] [--json]

About 2,900 seeded sessions (``tests/hostile/battery.py``: mutated command streams,
hostile addresses and HELO names, MIME shapes, faults, slow clients) against an
in-process gateway with the shipped defaults plus what the test world needs: the
DNS fixture, recipient MTAs with STARTTLS and a test CA, and a short
``delivery.max_queue_lifetime`` (60 s) so that "nothing stuck past the lifetime" is
checked within the run.  Then the check: the gateway still answers, every message
acknowledged with 250 is delivered, bounced (with a DSN) or waiting with a reason,
and archived; no error-level log event and no traceback came from client input.
Prints the figures the README's "Robustness" section quotes and exits 1 if any
target is missed.  Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402
import yaml  # noqa: E402
from structlog.testing import capture_logs  # noqa: E402

from gateway.app import Gateway  # noqa: E402
from gateway.config import load_config_text  # noqa: E402
from gateway.observability.logging import configure_logging  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.dns_fixture import DnsFixture  # noqa: E402
from tests.hostile import battery  # noqa: E402
from tests.mta_fixture import RecipientMta  # noqa: E402

FULL = {"mutation": 1200, "address": 800, "mime": 280, "fault": 450, "slow": 150, "world": 60}


async def main(seed: int, scale: float) -> dict:
    configure_logging("info", cache_loggers=False)  # capture_logs needs it
    with tempfile.TemporaryDirectory(prefix="sealgate-hostile-") as tmp:
        root = Path(tmp)
        ca = trustme.CA()
        ca_file = root / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        dns = await DnsFixture().start()
        port = free_port()
        mtas = []
        for name, ip in (("mx.tls.test", "127.0.0.41"), ("mx.clinic.test", "127.0.0.42")):
            leaf = ca.issue_cert(name)
            chain, key = root / f"{name}.pem", root / f"{name}.key"
            leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
            leaf.private_key_pem.write_to_path(str(key))
            dns.add(name, "A", ip)
            mtas.append(await RecipientMta(ip, port, (chain, key)).start())

        async def mta(name: str, ip: str, **kwargs: object) -> None:
            dns.add(name, "A", ip)
            mtas.append(await RecipientMta(ip, port, None, **kwargs).start())  # type: ignore[arg-type]

        await battery.hostile_world(dns, mta)
        dns.add("tls.test", "MX", "10 mx.tls.test.")
        dns.add("clinic.test", "MX", "10 mx.clinic.test.")
        config = {
            "state_dir": str(root / "state"),
            "listen": {"smtp": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"},
            "portal": {"listen": f"127.0.0.1:{free_port()}"},
            "smtp": {"hostname": "gw.sealgate.test", "workers": 1},
            "relay": {"networks": ["127.0.0.1/32"]},
            "dns": {"nameservers": [dns.nameserver]},
            "delivery": {"port": port, "max_queue_lifetime": "60s", "retry_schedule": ["2s"]},
            "tls": {"ca_file": str(ca_file)},
        }
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        gw = Gateway(load_config_text(path.read_text(), str(path)), str(path))
        await gw.start()
        per_category = {k: max(1, round(n * scale)) for k, n in FULL.items()}
        started = time.monotonic()
        try:
            with capture_logs() as logs, battery.stdlib_errors() as stdlib:
                report = await battery.run(
                    gw.config.listen.smtp.host, gw.config.listen.smtp.port, seed, per_category
                )
                seconds = time.monotonic() - started
                await battery.check(gw, report, logs, timeout=90, stdlib=stdlib)
        finally:
            await gw.stop(grace=2)
            for mta in mtas:
                await mta.stop()
            await dns.stop()
        summary = report.summary()
        summary["seconds"] = round(seconds, 1)
        summary["seed"] = seed
        return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full run")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = parser.parse_args()
    summary = asyncio.run(main(args.seed, args.scale))
    met = not summary["problems"] and all(
        summary[k] == 0
        for k in ("crashes", "lost", "unarchived", "stuck_past_lifetime", "tracebacks")
    )
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"hostile battery, seed {summary['seed']}: {summary['total']} sessions "
              f"in {summary['seconds']} s")  # fmt: skip
        for category, n in sorted(summary["cases"].items()):
            print(f"  {category:9} {n}")
        for key in (
            "acknowledged",
            "delivered_or_bounced",
            "waiting_with_reason",
            "crashes",
            "lost",
            "unarchived",
            "stuck_past_lifetime",
            "bounced_without_dsn",
            "errors_logged",
            "tracebacks",
            "normal_client_ms_p50",
            "normal_client_ms_max",
        ):
            print(f"  {key:22} {summary[key]}")
        for problem in summary["problems"][:30]:
            print("  PROBLEM", problem)
        print(
            "targets (0 crashes, lost, unarchived, stuck, tracebacks):", "met" if met else "MISSED"
        )
    sys.exit(0 if met else 1)
