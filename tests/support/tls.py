"""A throwaway CA and a serving certificate it signed, made with the openssl CLI: what the
chart generates for the webhook, here for a server on loopback."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServingCert:
    ca: Path  # PEM: the API server's caBundle
    cert: Path  # PEM: what the server presents
    key: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def serving_cert(folder: Path, ip: str = "127.0.0.1") -> ServingCert:
    """A CA and a certificate for `ip` (a subjectAltName: Go clients ignore the CN)."""
    ca_key, ca, key, csr, cert = (
        folder / name for name in ("ca.key", "ca.crt", "tls.key", "tls.csr", "tls.crt")
    )
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=kubetrain-test-ca", "-keyout", str(ca_key), "-out", str(ca),
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={ip}",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    extensions = folder / "san.ext"
    extensions.write_text(f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    return ServingCert(ca=ca, cert=cert, key=key)
