#!/usr/bin/env python3
"""End-to-end relay of encrypted copies: smtp-source -> Sealgate -> smtp-sink, the TLS
path against the S/MIME, the PGP/MIME and the portal paths, in the same run.

    .venv/bin/python bench/encrypt.py [--messages 2000] [--size 4096] [--rounds 3]

Four gateways, each with its own smtp-sink and a policy that allows one mode only
(``tls`` at ``may``, ``smime``, ``pgp``, ``portal``; smtp-sink has no STARTTLS).  On
the portal path a message is kept in the portal and its notification - a message of
Sealgate's own, relayed like any other - is what reaches the sink.  The recipient's
S/MIME certificate (RSA-2048, made here) and PGP key (RSA-2048, made by gpg in a
throw-away home) are imported with ``sealgate keys import``.  Rounds rotate the order;
medians are compared.  Targets (issue 5): S/MIME >= 80% of TLS; PGP >= 200 messages/s.
The portal path's rate is reported beside them (no target).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import SEALGATE, Sealgate  # noqa: E402
from relay import counting_sink, run_to  # noqa: E402

RCPT = "rcpt@example.test"  # what smtp-source sends to (never leaves loopback)
POLICY = "version: 1\ndefaults: {{modes: [{mode}], tls_level: may, fallback: hold}}\n"


def smime_certificate(workdir: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RCPT)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(RCPT)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = workdir / "rcpt.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def pgp_key(workdir: Path) -> Path:
    home = workdir / "gnupg-rcpt"
    home.mkdir(mode=0o700)
    spec = workdir / "key.spec"
    spec.write_text(
        "%no-protection\nKey-Type: RSA\nKey-Length: 2048\nKey-Usage: sign\n"
        "Subkey-Type: RSA\nSubkey-Length: 2048\nSubkey-Usage: encrypt\n"
        f"Name-Email: {RCPT}\nExpire-Date: 30d\n%commit\n"
    )
    gpg = ["gpg", "--homedir", str(home), "--batch", "--quiet"]
    subprocess.run([*gpg, "--gen-key", str(spec)], check=True, capture_output=True, timeout=120)
    path = workdir / "rcpt.gpg"
    path.write_bytes(
        subprocess.run([*gpg, "--export", RCPT], check=True, capture_output=True).stdout
    )
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sealgate-encrypt-"))
    sinks: list[subprocess.Popen[bytes]] = []
    try:
        keys = {"smime": smime_certificate(workdir), "pgp": pgp_key(workdir)}
        with ExitStack() as stack:
            runs: dict[str, tuple[Sealgate, Path]] = {}
            for mode in ("tls", "smime", "pgp", "portal"):
                sink, port, log = counting_sink(workdir)
                sinks.append(sink)
                (workdir / mode).mkdir()
                gw = stack.enter_context(
                    Sealgate(
                        workdir / mode,
                        delivery_extra=f"  smart_host: '127.0.0.1:{port}'\n",
                        policy=POLICY.format(mode=mode),
                    )
                )
                if mode in keys:
                    state_dir = str(workdir / mode / "sealgate-state")
                    subprocess.run(
                        [*SEALGATE, "keys", "import", str(keys[mode]), "--state-dir", state_dir],
                        check=True,
                        capture_output=True,
                        timeout=60,
                    )
                runs[mode] = (gw, log)
            results: dict[str, list[tuple[float, float]]] = {m: [] for m in runs}
            order = list(runs)
            for i in range(args.rounds):
                for mode in order[i % len(order) :] + order[: i % len(order)]:
                    gw, log = runs[mode]
                    results[mode].append(run_to(gw.smtp_port, args.messages, args.size, log))
            rate = {m: statistics.median(r for r, _ in v) for m, v in results.items()}
            cpu = {m: statistics.median(c for _, c in v) for m, v in results.items()}
            for mode in runs:
                each = ", ".join(f"{r:.0f}" for r, _ in results[mode])
                print(
                    f"{mode:<6} {args.size} B, {args.messages} messages, median of "
                    f"{args.rounds}: {rate[mode]:.0f}/s [{each}]; machine CPU "
                    f"{cpu[mode]:.2f} ms/message"
                )
            smime = rate["smime"] / rate["tls"]
            print(
                f"S/MIME / TLS ratio {smime:.2f} (target >= 0.80: "
                f"{'met' if smime >= 0.8 else 'NOT met'}); PGP {rate['pgp']:.0f}/s "
                f"(target >= 200/s: {'met' if rate['pgp'] >= 200 else 'NOT met'}); "
                f"portal / TLS {rate['portal'] / rate['tls']:.2f} (no target: a deposit and "
                "a notification a message)"
            )
    finally:
        for sink in sinks:
            sink.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
