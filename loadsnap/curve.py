"""CURVE keys for the ZMQ transport: generation, file layout, loading.

Layout written by :func:`generate_keys` (ZeroMQ certificate format, so ``zmq.auth`` and other
ZeroMQ tools read the same files)::

    DIR/server.key                    server public key   -> copy to every writer node
    DIR/server.key_secret             server secret key   -> stays on the collector node (0600)
    DIR/clients/client-000.key        client public keys  -> the collector's allow-list
    DIR/clients/client-000.key_secret client secret keys -> one per writer node (0600)

The collector loads ``server.key_secret`` and every ``clients/*.key`` (public only); a writer
loads ``server.key`` and its own ``client-NNN.key_secret``. Secret files are created with
``O_EXCL`` and mode 0600, and loading refuses a secret file readable by group or other.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zmq
import zmq.auth

from loadsnap.errors import TransportError, UsageError

__all__ = [
    "CLIENTS_DIR",
    "SERVER_PUBLIC_FILE",
    "SERVER_SECRET_FILE",
    "CurveClientKeys",
    "CurveServerKeys",
    "GeneratedKeys",
    "curve_available",
    "generate_keys",
    "load_client_keys",
    "load_public_key",
    "load_secret_key",
    "load_server_keys",
]

SERVER_PUBLIC_FILE: Final[str] = "server.key"
SERVER_SECRET_FILE: Final[str] = "server.key_secret"
CLIENTS_DIR: Final[str] = "clients"
MAX_CLIENTS: Final[int] = 1000
_SECRET_MODE: Final[int] = 0o600


@dataclass(frozen=True)
class CurveServerKeys:
    """What a collector needs: its key pair and the allow-list of client public keys (Z85)."""

    public: bytes
    secret: bytes
    allowed_clients: frozenset[bytes]


@dataclass(frozen=True)
class CurveClientKeys:
    """What a writer needs: the server's public key and its own key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class GeneratedKeys:
    """Paths written by :func:`generate_keys`."""

    server_public: Path
    server_secret: Path
    client_secrets: tuple[Path, ...]


def curve_available() -> bool:
    """Whether this libzmq was built with CURVE (libsodium)."""
    return bool(zmq.has("curve"))


def _require_curve() -> None:
    if not curve_available():
        raise TransportError("CURVE unavailable: libzmq was built without libsodium/tweetnacl")


def _certificate_text(public: bytes, secret: bytes | None) -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    kind = "secret" if secret is not None else "public"
    lines = [
        f"#   ****  Generated on {stamp} by loadsnap  ****",
        f"#   ZeroMQ CURVE **{kind}** certificate",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` (never overwrite, never follow a symlink) with ``mode``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UsageError(f"key file exists, refusing to overwrite: path={path}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (for public files) not mattered
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _write_pair(directory: Path, name: str) -> Path:
    public, secret = zmq.curve_keypair()
    _write_new(directory / f"{name}.key", _certificate_text(public, None), 0o644)
    secret_path = directory / f"{name}.key_secret"
    _write_new(secret_path, _certificate_text(public, secret), _SECRET_MODE)
    return secret_path


def generate_keys(directory: str | os.PathLike[str], clients: int = 1) -> GeneratedKeys:
    """Write a server key pair and ``clients`` client key pairs under ``directory``.

    Parameters
    ----------
    directory:
        Created (mode 0700) if missing. Existing key files are never overwritten.
    clients:
        Number of client key pairs, ``client-000`` upwards (1..1000).

    Raises
    ------
    UsageError
        ``clients`` out of range or a key file already exists.
    TransportError
        libzmq has no CURVE support.
    """
    _require_curve()
    if not 1 <= clients <= MAX_CLIENTS:
        raise UsageError(f"clients out of range: clients={clients} valid=1..{MAX_CLIENTS}")
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    client_dir = root / CLIENTS_DIR
    client_dir.mkdir(mode=0o700, exist_ok=True)
    server_secret = _write_pair(root, "server")
    secrets = tuple(_write_pair(client_dir, f"client-{i:03d}") for i in range(clients))
    return GeneratedKeys(root / SERVER_PUBLIC_FILE, server_secret, secrets)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot load CURVE key: {exc} (path={path})") from exc


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key in a certificate file (public or secret).

    Raises
    ------
    TransportError
        Missing or malformed file.
    """
    public, _ = _load(Path(path))
    return public


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a secret certificate file.

    Raises
    ------
    TransportError
        Missing or malformed file, no secret key in it, or group/other may read it.
    """
    file = Path(path)
    try:
        mode = os.stat(file).st_mode
    except OSError as exc:
        raise TransportError(f"cannot load CURVE key: {exc} (path={file})") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise TransportError(
            f"secret key file readable by group/other: mode={oct(stat.S_IMODE(mode))} "
            f"expected=0o600 (path={file})"
        )
    public, secret = _load(file)
    if secret is None:
        raise TransportError(f"no secret key in certificate (path={file})")
    return public, secret


def load_server_keys(directory: str | os.PathLike[str]) -> CurveServerKeys:
    """The collector's keys: ``DIR/server.key_secret`` and every ``DIR/clients/*.key``.

    Raises
    ------
    TransportError
        A missing or unsafe file, or no client public key to allow.
    """
    _require_curve()
    root = Path(directory)
    public, secret = load_secret_key(root / SERVER_SECRET_FILE)
    client_dir = root / CLIENTS_DIR
    allowed = frozenset(load_public_key(p) for p in sorted(client_dir.glob("*.key")))
    if not allowed:
        raise TransportError(f"no client public keys to allow (dir={client_dir})")
    return CurveServerKeys(public, secret, allowed)


def load_client_keys(
    server_public: str | os.PathLike[str], client_secret: str | os.PathLike[str]
) -> CurveClientKeys:
    """A writer's keys from the server's public key file and its own secret key file.

    Raises
    ------
    TransportError
        A missing, malformed or unsafe file.
    """
    _require_curve()
    public, secret = load_secret_key(client_secret)
    return CurveClientKeys(load_public_key(server_public), public, secret)
