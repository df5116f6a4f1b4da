"""Where a broker is and how to prove who we are to it: passwords and TLS material.

Apart from the transport so that tools which only name a broker (`broker_setup`,
errors, logs) share one way to keep its password out of what they print.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from yarl import URL

from cipherface.exceptions import ConfigError

__all__ = ["read_secret", "redact", "tls_context", "with_password"]


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def tls_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context: verifies the broker (against ``ca``, else the system CAs)
    and presents ``cert``/``key`` when given, for brokers that require a client cert."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material ({ca}, {cert}, {key}): {exc}") from exc
    return context


def read_secret(path: Path) -> str:
    """A password from a file (its first line), such as `cipherface broker-setup` writes."""
    try:
        text = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the broker password from {path}: {exc}") from exc
    if not text or not text[0]:
        raise ConfigError(f"{path} holds no password")
    return text[0]


def with_password(url: str, password: str) -> str:
    """The URL with ``password`` as its password (the user stays the URL's)."""
    parsed = URL(url)
    if not parsed.user:
        raise ConfigError(f"{redact(url)} names no user to go with the password file")
    return str(parsed.with_password(password))
