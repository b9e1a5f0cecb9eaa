"""What `serve` checks on this machine before it binds: ports in range and free, TLS files that are PEM."""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

import grpc

from moeshare.errors import MoeshareError

# gRPC turns SO_REUSEPORT on by default, so a second server on a busy port binds anyway and silently takes
# half of the connections; with it off, the second bind fails.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def check_port(flag: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise MoeshareError(f"{flag} must be between 0 and 65535 (0 picks a free one), got {port}")


def probe(host: str, port: int, flag: str) -> None:
    """Refuse a port another process listens on, or an address that is not this machine's, with the reason
    (gRPC itself only says "Failed to bind", and logs a multi-line error)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MoeshareError(f"cannot listen on {host}:{port}: unknown host ({e.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise MoeshareError(
                        f"{flag} {port} on {host} is already in use (another server?): stop it or pick "
                        f"another {flag} (0 picks a free one)"
                    ) from None
                raise MoeshareError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise MoeshareError(f"cannot read {flag} {path}: {e.strerror or e}") from None


def tls_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    """Server credentials from a PEM certificate chain and its PEM private key, each checked so that a bad
    file is named (gRPC reports any of them as "Failed to bind to address")."""
    cert, key = _read(cert_path, "--tls-cert"), _read(key_path, "--tls-key")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise MoeshareError(f"--tls-cert {cert_path} is not a PEM certificate (no BEGIN CERTIFICATE line)")
    if b"-----BEGIN" not in key or b"PRIVATE KEY-----" not in key:
        raise MoeshareError(f"--tls-key {key_path} is not a PEM private key (no BEGIN ... PRIVATE KEY line)")
    try:  # parses both and checks that they belong together
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as e:
        reason = "the key does not match the certificate" if "MISMATCH" in str(e) else e.reason or str(e)
        raise MoeshareError(
            f"--tls-cert {cert_path} / --tls-key {key_path} cannot serve TLS: {reason}"
        ) from None
    return grpc.ssl_server_credentials([(key, cert)])
