"""TLS for all three listeners from one certificate/key pair (TLS_CERTFILE, TLS_KEYFILE)."""

from __future__ import annotations

import ssl

from .settings import ConfigError, Settings


def server_ssl_context(settings: Settings, alpn: list[str]) -> ssl.SSLContext | None:
    """A server context for the configured pair offering ``alpn``, or None when TLS is off.

    Raises ConfigError (one line, no secret) when a file cannot be read or the
    key does not match the certificate.
    """
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    for variable, path in (("TLS_CERTFILE", settings.tls_certfile), ("TLS_KEYFILE", settings.tls_keyfile)):
        if not path.is_file():
            raise ConfigError(f"{variable} {str(path)!r}: file not found")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    except PermissionError:
        raise ConfigError("TLS_CERTFILE/TLS_KEYFILE: permission denied reading the files") from None
    except ssl.SSLError as exc:
        reason = (
            "the key does not match the certificate"
            if "KEY_VALUES_MISMATCH" in str(exc)
            else exc.reason
        )
        raise ConfigError(
            f"TLS_CERTFILE/TLS_KEYFILE cannot be used: {reason or 'not a PEM certificate and key'}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"TLS files cannot be read: {exc.strerror or exc}") from None
    context.set_alpn_protocols(alpn)
    return context
