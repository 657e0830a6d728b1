"""Certificates and keys for a fairforget federation across sites (a prototype's, not a hospital's PKI).

Writes, into ``--out``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384). ``ca.crt`` goes to every
  site and to the researcher (their ``--root-certificates``); ``ca.key`` stays with whoever signs.
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for the
  names given with ``--host`` (plus ``localhost`` and ``127.0.0.1``, which the SuperLink's own
  ServerApp process uses to reach it).
* ``<site>`` / ``<site>.pub`` for each ``--site``: the site's SuperNode authentication key pair, EC
  P-384 in OpenSSH format, what ``ssh-keygen -t ecdsa -b 384 -N "" -f <site>`` writes (Flower's
  "Authenticate SuperNodes" guide). The private key never leaves the site; the ``.pub`` file is
  registered with ``flwr supernode register``.

    python simulations/make_certs.py --out certs --host coordinator.example.org --site site-a --site site-b

Uses ``cryptography`` (installed with Flower); an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fairforget"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if path.exists():
        raise SystemExit(f"make_certs: {path} exists; remove it or choose another --out")
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def make_certs(out: Path, hosts: list[str], sites: list[str]) -> None:
    """Write the CA, the SuperLink's certificate for ``hosts`` and one key pair per site into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fairforget CA")).issuer_name(_name("fairforget CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
              .issuer_name(ca.subject).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_san(hosts), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / site, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), private=True)
        _write(out / f"{site}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (created)")
    parser.add_argument("--host", action="append", default=[],
                        help="a name or IP address the SuperLink is reached at (repeatable)")
    parser.add_argument("--site", action="append", default=[], help="a site's name: one key pair each (repeatable)")
    args = parser.parse_args(argv)
    if len(set(args.site)) != len(args.site) or any(not s or "/" in s for s in args.site):
        parser.error(f"--site names must be distinct file names, got {args.site}")
    make_certs(args.out, args.host, args.site)
    print(f"make_certs: wrote {args.out}/ca.crt, server.pem, server.key and {len(args.site)} site key pair(s)")


if __name__ == "__main__":
    main()
