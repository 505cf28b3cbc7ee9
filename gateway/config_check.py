"""Check what a configuration refers to: files, directories, certificates, users.

`check_references` returns the first problem as a `ConfigError` naming the key, so
that ``sealgate check-config`` and ``sealgate run`` report the same precise message.
Nothing is created or changed here; a state directory that does not exist yet is
fine if it can be created.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from gateway.config import Config
from gateway.crypto.signers import dkim_keys, load_signer, pem_certs, read_config_file
from gateway.errors import ConfigError
from gateway.model import PortalAuth
from gateway.policy.language import Policy, load_policy_for
from gateway.smtp.auth import parse_users
from gateway.tls import cert_matches_key


def _writable_dir(key: str, path: Path, source: str) -> None:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"{probe} is not a directory", source)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{probe} is not writable", source)


def check_references(cfg: Config, source: str = "<config>") -> Policy:  # noqa: C901 - one check per file or directory option
    """Check everything ``cfg`` refers to; returns the policy it names, loaded."""
    _writable_dir("state_dir", cfg.state_dir, source)
    for prefix, cert, key in (
        ("tls", cfg.tls.cert_file, cfg.tls.key_file),
        ("portal", cfg.portal.cert_file, cfg.portal.key_file),
        ("api", cfg.api.cert_file, cfg.api.key_file),
        ("console", cfg.console.cert_file, cfg.console.key_file),
    ):
        enabled = {
            "portal": cfg.portal.enabled,
            "api": cfg.api.enabled,
            "console": cfg.console.enabled,
        }.get(prefix, True)
        if cert is not None and key is not None and enabled:
            _cert_and_key(prefix, cert, key, source)
    relay = cfg.relay
    if relay.client_ca_file is not None:
        pem_certs(
            "relay.client_ca_file",
            read_config_file("relay.client_ca_file", relay.client_ca_file, source),
            relay.client_ca_file,
            source,
        )
    if relay.users_file is not None:
        data = read_config_file("relay.users_file", relay.users_file, source)
        try:
            parse_users(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("relay.users_file", f"{relay.users_file}: {e}", source) from None
    key_file = cfg.logging.address_hash_key_file
    if key_file is not None and cfg.logging.addresses == "hash":
        data = read_config_file("logging.address_hash_key_file", key_file, source)
        if len(data) < 16:
            raise ConfigError(
                "logging.address_hash_key_file", f"{key_file} holds fewer than 16 bytes", source
            )
    sm = cfg.smime
    if sm.signing_cert_file is not None and sm.signing_key_file is not None:
        load_signer(sm.signing_cert_file, sm.signing_key_file, source)
    dkim_keys(cfg, source)
    if cfg.pgp.signing_key_file is not None:
        read_config_file("pgp.signing_key_file", cfg.pgp.signing_key_file, source)
    logo = cfg.portal.logo_file
    if cfg.portal.enabled and logo is not None:
        data = read_config_file("portal.logo_file", logo, source)
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ConfigError("portal.logo_file", f"{logo} is not a PNG image", source)
    if cfg.archive.enabled:
        from gateway.archive.service import master_keys, signing_key

        if cfg.archive.master_keys:
            master_keys(cfg, create=False)
        if cfg.archive.signing_key_file is not None:
            signing_key(cfg, create=False)
    providers = [("portal", cfg.portal.oidc_providers), ("console", cfg.console.oidc_providers)]
    for section, listed in providers:
        for i, provider in enumerate(listed):
            if provider.client_secret_file is not None:
                read_config_file(
                    f"{section}.oidc_providers[{i}].client_secret_file",
                    provider.client_secret_file,
                    source,
                )
    if cfg.webhooks.endpoints:
        from gateway.webhooks.events import endpoints_of

        endpoints_of(cfg)  # every secret file readable, each a whsec_ secret
    policy = load_policy_for(cfg)
    asks_oidc = [
        f"rule {r.name}" for r in policy.rules if r.then.portal_auth is PortalAuth.OIDC
    ] + (["defaults"] if policy.defaults.portal_auth is PortalAuth.OIDC else [])
    if asks_oidc and not cfg.portal.oidc_providers:
        raise ConfigError(
            "portal.oidc_providers",
            f"the policy's {', '.join(asks_oidc)} asks for portal_auth: oidc, and no "
            "provider is configured",
            source,
        )
    return policy


def warnings(cfg: Config) -> list[str]:
    """What is valid but probably not what the administrator wants; ``check-config``
    prints these and ``run`` logs them."""
    out = []
    relay = cfg.relay
    shared = [f"relay.client_certs ({p})" for p in relay.client_certs]
    shared += [f"relay.networks ({n})" for n in relay.networks if n.is_global]
    bound = relay.sender_domains or relay.dkim_domains or relay.m365_tenant_ids
    if shared and not bound:
        out.append(
            f"relaying is authorized by {', '.join(shared)} with no tenant binding: if these "
            "are Microsoft 365 or Google Workspace certificates or ranges, every tenant of "
            "those clouds can relay through this gateway. Set relay.dkim_domains (and "
            "relay.sender_domains, relay.m365_tenant_ids) to your own."
        )
    if cfg.console.enabled and not cfg.archive.enabled:
        out.append(
            "console.enabled: the console shows the archive, and archive.enabled is false: "
            "it does not start"
        )
    return out


def _cert_and_key(prefix: str, cert: Path, key: Path, source: str) -> None:
    """``<prefix>.cert_file`` holds PEM certificates for the unencrypted PEM key in
    ``<prefix>.key_file``, and OpenSSL accepts the pair."""
    pem_certs(
        f"{prefix}.cert_file", read_config_file(f"{prefix}.cert_file", cert, source), cert, source
    )
    read_config_file(f"{prefix}.key_file", key, source)
    try:
        matches = cert_matches_key(cert, key)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{prefix}.key_file", f"{key} is not an unencrypted PEM private key ({e})", source
        ) from None
    if not matches:
        raise ConfigError(
            f"{prefix}.key_file", f"{key} does not match the certificate in {cert}", source
        )
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise ConfigError(
            f"{prefix}.cert_file", f"OpenSSL refuses the pair: {e.reason}", source
        ) from None
