"""`llmgate certs --self-signed DOMAIN ...`: a local CA and one server certificate it signs, for development.

The CA (`ca.pem`, `ca.key`) is made once and reused, so clients trust it once; every run issues a fresh
certificate for the domains given, named after the first (`<domain>.pem` holds the certificate alone,
`<domain>.key` its key). Keys are written with mode 0600. Names are checked with the rules of teams.yaml.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.model.teams import DOMAIN_LABEL, SAFE_PATH

CA_DAYS = 3650
MAX_DAYS = 3650
TLS_PORT = 8443  # gateway.tls.listen's default


class CertsError(Exception):
    """A refusal, told as one line; nothing was written."""


@dataclass(frozen=True)
class Issued:
    ca_cert: Path
    ca_key: Path
    ca_created: bool
    cert: Path
    key: Path
    names: tuple[str, ...]
    not_after: datetime.datetime


def run_certs(args: argparse.Namespace) -> int:
    try:
        names = tuple(parse_name(n) for n in args.self_signed)
        issued = issue_self_signed(names, Path(args.out), args.days)
    except CertsError as exc:
        print(f"llmgate certs: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llmgate certs: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(_report(issued))
    return 0


def parse_name(raw: str) -> str:
    """A DNS name with the rules of teams.yaml's `domains` (lowercased, no trailing dot), `localhost`, or an IP."""
    value = raw.strip().lower().rstrip(".")
    if value == "localhost":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise CertsError(f"{raw!r}: expected a domain name like team-a.llm.example.com (letters, digits, - and dots, "
                         "at least two labels), localhost, or an IP address")
    return value


def issue_self_signed(names: tuple[str, ...], out: Path, days: int) -> Issued:
    """Create or reuse the CA in `out`, then write a certificate for `names` signed by it."""
    if not 1 <= days <= MAX_DAYS:
        raise CertsError(f"--days {days}: expected 1 to {MAX_DAYS} days (Apple's clients accept at most 825, "
                         "the default)")
    names = tuple(dict.fromkeys(names))
    out.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    now = datetime.datetime.now(datetime.UTC)
    ca_created = not ca_cert_path.exists() and not ca_key_path.exists()
    if ca_created:
        ca_cert, ca_key = _new_ca(now)
        _write(ca_key_path, _key_pem(ca_key), secret=True)
        _write(ca_cert_path, _cert_pem(ca_cert), secret=False)
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path, now)
    leaf, leaf_key = _new_leaf(names, ca_cert, ca_key, now, days)
    stem = names[0].replace(":", "_")  # an IPv6 address as a file name nginx.conf can hold
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    _write(key_path, _key_pem(leaf_key), secret=True)
    _write(cert_path, _cert_pem(leaf), secret=False)
    return Issued(ca_cert_path, ca_key_path, ca_created, cert_path, key_path, names, leaf.not_valid_after_utc)


# ---------------------------------------------------------------- X.509

def _new_ca(now: datetime.datetime):

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmgate development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"llmgate development CA {os.urandom(4).hex()}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _load_ca(cert_path: Path, key_path: Path, now: datetime.datetime):

    for present, missing in ((cert_path, key_path), (key_path, cert_path)):
        if present.exists() and not missing.exists():
            raise CertsError(f"{present} exists but {missing} does not; restore it, or remove {present} "
                             "to make a new CA (clients must then trust the new ca.pem)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertsError(f"cannot read the CA in {cert_path.parent}: {exc}") from None
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise CertsError(f"{key_path} is not the key of {cert_path}; restore the pair, or remove both to make a new CA")
    if cert.not_valid_after_utc <= now:
        raise CertsError(f"the CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; remove ca.pem and "
                         "ca.key to make a new one (clients must then trust the new ca.pem)")
    return cert, key


def _new_leaf(names: tuple[str, ...], ca_cert, ca_key, now: datetime.datetime, days: int):

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))  # clients match an IP only against IP entries
        except ValueError:
            sans.append(x509.DNSName(n))
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _key_pem(key) -> bytes:

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:

    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write through a temporary file and rename, so a key is never readable by others, not even briefly."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600 if secret else 0o644)  # the umask may have narrowed a certificate's mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- what to do next

def _report(i: Issued) -> str:
    ca, cert, key = i.ca_cert.resolve(), i.cert.resolve(), i.key.resolve()
    domains = [n for n in i.names if n != "localhost" and not _is_ip(n)]
    host = domains[0] if domains else i.names[0]
    ca_line = (f"wrote {ca} (the CA; its key {i.ca_key.resolve()}, mode 0600)" if i.ca_created
               else f"kept  {ca} (the CA, reused; clients that trust it trust the new certificate)")
    lines = [
        ca_line,
        f"wrote {cert} (certificate for {', '.join(i.names)}, valid until {i.not_after:%Y-%m-%d}, signed by the CA)",
        f"wrote {key} (its key, mode 0600)",
        "",
        "teams.yaml (each domain must also be in a team's `domains` or in `gateway.server_names`):",
        "",
        "gateway:",
        "  tls:",
        f"    listen: 0.0.0.0:{TLS_PORT}",
        "    certificates:",
        f"      - {{domains: [{', '.join(domains) or '...'}], cert: {cert}, key: {key}}}",
    ]
    if not domains:
        lines.append("  (IP addresses and localhost cannot be team domains; give a DNS name for teams.yaml)")
    if not SAFE_PATH.fullmatch(str(cert)):
        lines.append(f"  (teams.yaml accepts only paths of letters, digits and _ . / @ + -: move {cert.parent})")
    lines += [
        "",
        f"Clients must trust {ca} (a development CA; never give it to anyone else):",
        f"  curl --cacert {ca} https://{host}:{TLS_PORT}/v1/models -H 'Authorization: Bearer sk-...'",
        f"  SSL_CERT_FILE={ca} python app.py      # OpenAI SDK: this CA instead of the system's, for that process",
        "  # or in code, for one client:",
        "  import ssl, openai",
        f"  client = openai.OpenAI(base_url='https://{host}:{TLS_PORT}/v1', api_key='sk-...',",
        f"      http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile='{ca}')))",
    ]
    return "\n".join(lines)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
