"""Create the certificates and keys of a real deployment: a CA, the SuperLink's TLS certificate, node keys.

Layout of the output folder (the names `fedcompare superlink start --tls-dir` reads):

    ca.crt            CA certificate: every node passes it as --root-certificates
    ca.key            CA private key (0600): keep it offline; only new server certificates need it
    server.pem        SuperLink certificate signed by the CA, with the SuperLink's names as SANs
    server.key        SuperLink private key (0600)
    nodes/NAME.key    node NAME's authentication key (0600, OpenSSH EC P-384, no passphrase): copy it
                      to that node and delete it here
    nodes/NAME.pub    its public key (OpenSSH): the SuperLink registers every nodes/*.pub at start

The server certificate always names localhost, 127.0.0.1 and ::1 besides the names asked for:
Flower's SuperLink starts its own `flower-superexec`, which connects back to the SuperLink over TLS
at 127.0.0.1 when it listens on 0.0.0.0, and `superlink start` registers node keys the same way.
Files are written atomically (temporary file, then rename) and never replaced unless `force`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from infra.federation import CA_CERT, CA_KEY, NODES_DIR, SERVER_CERT, SERVER_KEY, FederationError

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
CURVE = ec.SECP384R1()  # P-384, the curve Flower's docs use for node keys; also used for TLS keys
_NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class WrittenFile:
    """One file `create_certificates` wrote: where, what it is, whether it holds a private key."""

    path: Path
    what: str
    private: bool


@dataclass(frozen=True)
class _Pending:
    """A file to write: its path, bytes, description and whether it is private."""

    path: Path
    data: bytes
    what: str
    private: bool


def create_certificates(out_dir: str | Path, *, server_names: Sequence[str] = (), server_ips: Sequence[str] = (),
                        nodes: Sequence[str] = (), force: bool = False, ca_days: int = 3650,
                        server_days: int = 730) -> list[WrittenFile]:
    """Create a CA and the SuperLink's certificate (if server names or IPs are given) and node key pairs.

    Args: out_dir: the output folder (created with mode 0700 if missing); server_names: DNS names and
        server_ips: IP addresses nodes use to reach the SuperLink (loopback names are always added);
        nodes: node names, one key pair each; force: replace existing files; ca_days/server_days: validity.
    Returns: the files written, in order.
    Raises: FederationError if nothing is asked for, a name or IP is malformed, or a file exists without force.
    """
    if not (server_names or server_ips or nodes):
        raise FederationError("nothing to create: give --server-name/--server-ip for the SuperLink's "
                              "certificate and/or --nodes NAME,… for node keys")
    out = Path(out_dir).expanduser().resolve()
    pending = _server_files(out, server_names, server_ips, ca_days, server_days) if server_names or server_ips else []
    pending += _node_files(out, nodes)
    existing = [str(p.path) for p in pending if p.path.exists()]
    if existing and not force:
        raise FederationError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                              "keep them, write to another --out, or pass --force to replace them")
    written = []
    for item in pending:
        item.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomic(item.path, item.data, private=item.private, replace=force)
        written.append(WrittenFile(item.path, item.what, item.private))
    return written


def create_node_keys(out_dir: str | Path, names: Sequence[str], *, force: bool = False) -> list[WrittenFile]:
    """Create one authentication key pair per node name under `out_dir/nodes/`.

    Args: out_dir: the output folder; names: node names (letters, digits, `_ . -`); force: replace files.
    Returns: the files written.
    Raises: FederationError for a bad or repeated name, or a file that exists without force.
    """
    return create_certificates(out_dir, nodes=names, force=force)


def _server_files(out: Path, names: Sequence[str], ips: Sequence[str], ca_days: int,
                  server_days: int) -> list[_Pending]:
    """Return the CA and server certificate files for the given SuperLink names and IPs."""
    dns, addresses = alt_names(names, ips)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcompare CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcompare")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, ca_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(names) or list(ips))[0])])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), now, server_days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, addresses)]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    until = lambda cert: cert.not_valid_after_utc.date().isoformat()  # noqa: E731
    shown = ", ".join([*dns, *map(str, addresses)])
    return [
        _Pending(out / CA_CERT, _pem(ca_cert), f"CA certificate, valid until {until(ca_cert)}: "
                 "every node passes it as --root-certificates", False),
        _Pending(out / CA_KEY, _private_pem(ca_key), "CA private key: keep it offline", True),
        _Pending(out / SERVER_CERT, _pem(server_cert), f"SuperLink certificate for {shown}, valid until "
                 f"{until(server_cert)}", False),
        _Pending(out / SERVER_KEY, _private_pem(server_key), "SuperLink private key", True),
    ]


def alt_names(names: Iterable[str], ips: Iterable[str]) -> tuple[list[str], list[_IP]]:
    """Return the server certificate's DNS names and IP addresses: the given ones plus loopback, deduplicated.

    Raises: FederationError for a malformed IP address or DNS name.
    """
    dns: list[str] = []
    for name in [*names, *LOOPBACK_NAMES]:
        name = name.strip().lower()
        if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", name):
            raise FederationError(f"expected a DNS name for --server-name (e.g. coord.example), got {name!r}")
        if name not in dns:
            dns.append(name)
    addresses = []
    for ip in [*ips, *LOOPBACK_IPS]:
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            raise FederationError(f"expected an IP address for --server-ip (e.g. 10.0.0.1), got {ip!r}") from None
        if address not in addresses:
            addresses.append(address)
    return dns, addresses


def _node_files(out: Path, names: Sequence[str]) -> list[_Pending]:
    """Return each node's private and public authentication key files."""
    seen: set[str] = set()
    pending = []
    for name in names:
        if not _NODE_NAME.fullmatch(name) or name in seen:
            problem = "repeated" if name in seen else "not a node name (letters, digits, _ . -; at most 64)"
            raise FederationError(f"--nodes {name!r} is {problem}: give each node one distinct name")
        seen.add(name)
        key = ec.generate_private_key(CURVE)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        pending += [
            _Pending(out / NODES_DIR / f"{name}.key", private, f"node {name}'s private key: copy it to that node "
                     "(--auth-key) and delete it here", True),
            _Pending(out / NODES_DIR / f"{name}.pub", public + f" fedcompare-node-{name}\n".encode(),
                     f"node {name}'s public key: the SuperLink registers it", False),
        ]
    return pending


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    """Return a certificate builder valid from a minute ago for `days` days."""
    if days < 1:
        raise FederationError(f"expected a validity of at least 1 day, got {days}")
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Return the key usage of a CA (`cert_sign`) or of a TLS server."""
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _pem(cert: x509.Certificate) -> bytes:
    """Return `cert` as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return `key` as unencrypted PKCS#8 PEM (what Flower's and uvicorn's TLS loaders read)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_atomic(path: Path, data: bytes, *, private: bool, replace: bool) -> None:
    """Write `data` to a temporary file beside `path` with its final mode, then move it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` appeared meanwhile: never replace without force
            os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise FederationError(f"{path} already exists: pass --force to replace it") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_server_names(server_cert: Path, host: str) -> None:
    """Raise FederationError unless `server_cert` names `host` (an IP address or DNS name) in its SANs."""
    try:
        cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise FederationError(f"{server_cert} is not a PEM server certificate with SANs ({exc}): "
                              "run `fedcompare certs create`") from None
    try:
        covered = ipaddress.ip_address(host) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        covered = host.lower() in {n.lower() for n in names.get_values_for_type(x509.DNSName)}
    if not covered:
        raise FederationError(
            f"{server_cert.name} does not name {host}, the address the SuperLink's own ServerApp launcher "
            f"connects to: recreate it with `fedcompare certs create --server-name/--server-ip {host} --force` "
            "and give every node the new ca.crt"
        )


def check_root_certificates(path: str | Path) -> Path:
    """Return the absolute path of a PEM CA certificate file.

    Raises: FederationError if the file is missing or holds no PEM certificate.
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FederationError(f"--root-certificates {file} does not exist: copy ca.crt from the coordinating "
                              "host, where `fedcompare certs create` wrote it")
    try:
        x509.load_pem_x509_certificates(file.read_bytes())
    except ValueError:
        raise FederationError(f"--root-certificates {file} is not a PEM certificate: pass the ca.crt "
                              "that `fedcompare certs create` wrote") from None
    return file


def check_auth_key(path: str | Path) -> tuple[Path, str]:
    """Return (absolute path, warning or '') of a node private key in the format Flower's SuperNode loads.

    Raises: FederationError if the file is missing or not an unencrypted OpenSSH EC private key.
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FederationError(f"--auth-key {file} does not exist: copy this node's key from where "
                              "`fedcompare certs create --nodes NAME` wrote it (nodes/NAME.key)")
    try:
        key = serialization.load_ssh_private_key(file.read_bytes(), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FederationError(f"--auth-key {file} is not an unencrypted OpenSSH EC private key, which Flower "
                              "needs: create one with `fedcompare certs create --nodes NAME`")
    loose = file.stat().st_mode & 0o077
    return file, (f"warning: {file} is readable by other users: chmod 600 {file}" if loose else "")


def check_public_key(path: Path) -> Path:
    """Return `path` if it holds an OpenSSH EC public key on a NIST curve, as `flwr supernode register` needs.

    Raises: FederationError naming the file otherwise.
    """
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm, OSError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise FederationError(f"{path} is not an OpenSSH EC public key on a NIST curve, which Flower registers: "
                              "recreate it with `fedcompare certs create --nodes NAME --force`")
    return path
