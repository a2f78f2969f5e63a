"""The operator's certificate authority for an open network, and what its certificates say.

An open network's scheduler, gateway and providers speak Dask over mutual TLS with
certificates that one CA, the operator's, issues (``gpunet certs init`` / ``gpunet certs
issue``). A certificate binds a role and a name in a subject-alternative-name URI::

    gpunet:role/scheduler/NAME   gpunet:role/gateway/NAME   gpunet:role/provider/ACCOUNT

For a provider, the name is the credit account its workers are paid to: the scheduler
takes it from the certificate, never from a token the worker presents. Keys are written
with mode 600 and never leave the host that issued them, except the party's own key,
which the operator hands to that party.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpunet.errors import OptionError
from gpunet.paths import data_dir, write_private

#: The roles a certificate can bind.
SCHEDULER, GATEWAY, PROVIDER = "scheduler", "gateway", "provider"
ROLES = (SCHEDULER, GATEWAY, PROVIDER)
#: The subject-alternative-name URI prefix that carries the role.
ROLE_URI_PREFIX = "gpunet:role/"
#: A certificate's name: the provider's credit account name (the credit service's rule).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
#: Beside ``ca.pem``: the serial numbers (hex, one a line) of revoked certificates,
#: which every party reading that CA file refuses (``gpunet certs revoke``).
REVOKED_FILE = "revoked.txt"
#: How often a process looks whether that file changed, at most: a certificate revoked is
#: refused within this long (every request in between is checked against what was read).
REVOCATION_CHECK_S = 1.0
#: How long what ``gpunet certs`` issues is valid.
CA_DAYS = 3650
CERT_DAYS = 397


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is: a role and a name (a provider's account)."""

    role: str
    name: str

    @property
    def uri(self) -> str:
        return f"{ROLE_URI_PREFIX}{self.role}/{self.name}"


@dataclass(frozen=True)
class Issued:
    """The files of one issued certificate."""

    cert: Path
    key: Path
    ca: Path


def certs_dir() -> Path:
    """Where ``gpunet certs`` keeps the CA and what it issued, by default."""
    return data_dir() / "certs"


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path | None = None, *, force: bool = False) -> Issued:
    """Make the operator's CA in ``directory`` (default :func:`certs_dir`): ``ca.pem``
    and ``ca-key.pem`` (mode 600). Refuses to replace an existing CA unless ``force``
    (every certificate it issued would stop working)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory or certs_dir())
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if key_path.exists() and not force:
        raise OptionError(f"{key_path} already holds a CA; every certificate it issued depends on it. "
                          "Use it as it is, or pass --force to replace it (and issue every certificate again)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpunet operator CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _key_pem(key))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, cert_path)


def check_identity(role: str, name: str) -> Identity:
    """``Identity(role, name)`` after checking both, with an error that says what is allowed."""
    if role not in ROLES:
        raise OptionError(f"unknown role {role!r}: a certificate is for one of {', '.join(ROLES)}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise OptionError(f"{name!r} cannot name a certificate: use 1-64 letters, digits, '.', '_', '@', '-', "
                          "starting with a letter or digit (a provider's is its credit account name)")
    return Identity(role, name)


def issue(role: str, name: str, directory: Path | None = None, *, hosts: tuple[str, ...] = ()) -> Issued:
    """Issue a certificate for ``name`` in ``role`` with the CA in ``directory``:
    ``ROLE-NAME.pem`` and ``ROLE-NAME-key.pem`` (mode 600) beside ``ca.pem``. ``hosts``
    (names or IP addresses; ``localhost`` and 127.0.0.1 always) go in the certificate
    for HTTPS clients that check the host name (the gateway's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    identity = check_identity(role, name)
    directory = Path(directory or certs_dir())
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if not ca_key_path.exists():
        raise OptionError(f"no CA in {directory}: make one first with `gpunet certs init`")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in dict.fromkeys(("localhost", "127.0.0.1", *hosts)):
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    stem = f"{role}-{name}"
    key_path, cert_path = directory / f"{stem}-key.pem", directory / f"{stem}.pem"
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, ca_cert_path)


def identity_of_file(cert_path: str | Path) -> Identity | None:
    """The gpunet identity a PEM certificate file binds, or None if it binds none."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    return _identity_from_uris(sans.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of_peer(peercert: dict[str, Any] | None) -> Identity | None:
    """The gpunet identity of a TLS peer, from :meth:`ssl.SSLSocket.getpeercert`'s
    dict (a Dask comm's ``extra_info["peercert"]``); None without one, or for a
    revoked one (:func:`watch_revocations`). The TLS layer has already checked that
    the operator's CA issued it."""
    if not peercert or _REVOKED.has(peercert.get("serialNumber")):
        return None
    return _identity_from_uris(value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI")


def _identity_from_uris(uris: Any) -> Identity | None:
    found = set()
    for uri in uris:
        if uri.startswith(ROLE_URI_PREFIX):
            role, _, name = uri[len(ROLE_URI_PREFIX):].partition("/")
            if role in ROLES and NAME_RE.match(name):
                found.add(Identity(role, name))
    return found.pop() if len(found) == 1 else None  # two roles in one certificate: neither


def _serial(serial: str | int) -> str:
    """A serial number as ``getpeercert()`` writes it: upper-case hex, no leading zeros."""
    return f"{serial:X}" if isinstance(serial, int) else f"{int(str(serial).replace(':', ''), 16):X}"


def serial_of_file(cert_path: str | Path) -> str:
    """The serial number of a PEM certificate file, in hex (what ``revoke`` takes)."""
    from cryptography import x509

    return _serial(x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).serial_number)


def revoke(serial: str, directory: Path | None = None) -> Path:
    """Revoke the certificate with ``serial`` (hex, or the path of its PEM file): add it
    to ``revoked.txt`` in ``directory`` (default :func:`certs_dir`), which the scheduler
    and the workers that read this directory's ``ca.pem`` check on every request.
    Returns the file (copy it beside ``ca.pem`` wherever a party runs elsewhere)."""
    directory = Path(directory or certs_dir())
    try:
        number = serial_of_file(serial) if Path(serial).is_file() else _serial(serial)
    except ValueError:
        raise OptionError(f"{serial!r} is neither a certificate file nor a hex serial number "
                          "(`gpunet certs issue` prints each certificate's)") from None
    path = directory / REVOKED_FILE
    known = set(path.read_text().split()) if path.exists() else set()
    if number not in known:
        directory.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.write(number + "\n")
    return path


class _RevocationList:
    """The revoked serial numbers in one file, read again whenever it changes: looked at (a
    stat) at most once every :data:`REVOCATION_CHECK_S` by ``clock``, however many requests
    ask, so a busy scheduler does not stat the file per message, and a certificate revoked
    meanwhile is refused within that long."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.path: Path | None = None
        self.serials: frozenset[str] = frozenset()
        self.clock = clock
        #: how many times the file was looked at (stat), and read
        self.looks = self.reads = 0
        self._seen: tuple[int, int] | None = None
        self._looked_at = -math.inf

    def watch(self, path: Path) -> None:
        """Read ``path`` from now on (at the next question)."""
        if path != self.path:
            self.path, self._seen, self._looked_at, self.serials = path, None, -math.inf, frozenset()

    def has(self, serial: str | None) -> bool:
        """Whether ``serial`` is revoked (as the file said at most :data:`REVOCATION_CHECK_S` ago)."""
        if self.path is None or serial is None:
            return False
        now = self.clock()
        if now - self._looked_at >= REVOCATION_CHECK_S:
            self._looked_at = now
            self._look(self.path)
        return _serial(serial) in self.serials

    def _look(self, path: Path) -> None:
        self.looks += 1
        try:
            stat = path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            seen = None
        if seen != self._seen:
            self.reads += 1
            try:
                self.serials = frozenset(_serial(line) for line in path.read_text().split())
            except (OSError, ValueError):
                self.serials = frozenset()
            self._seen = seen


_REVOKED = _RevocationList()


def watch_revocations(ca_file: str | Path | None) -> None:
    """From now on this process refuses peers whose certificate's serial number is in
    ``revoked.txt`` beside ``ca_file`` (read again whenever it changes)."""
    if ca_file:
        _REVOKED.watch(Path(ca_file).parent / REVOKED_FILE)


def own_identity(security: Any, part: str) -> Identity | None:
    """The gpunet identity of the certificate a Dask ``Security`` presents as
    ``part`` ("scheduler", "worker" or "client"); None without one."""
    cert = getattr(security, f"tls_{part}_cert", None) if security is not None else None
    return identity_of_file(cert) if cert else None


def security(ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> Any:
    """A Dask ``Security`` for mutual TLS only, with one certificate for every part
    this process plays (scheduler, worker, client). Raises :class:`OptionError` for a
    missing file or a certificate that binds no gpunet role."""
    from distributed.security import Security

    for what, path in (("CA", ca_file), ("certificate", cert_file), ("key", key_file)):
        if not Path(path).is_file():
            raise OptionError(f"the {what} file {path} does not exist (issue one with `gpunet certs issue`)")
    if identity_of_file(cert_file) is None:
        raise OptionError(f"{cert_file} binds no gpunet role: issue one with `gpunet certs issue --role ...`")
    files = {"tls_ca_file": str(ca_file)}
    for part in ("scheduler", "worker", "client"):
        files[f"tls_{part}_cert"] = str(cert_file)
        files[f"tls_{part}_key"] = str(key_file)
    return Security(require_encryption=True, **files)
