"""CURVE keys for the ZMQ transport: generation, file layout, loading, rank bindings.

Layout written by :func:`generate_keys` (ZeroMQ certificate format, so ``zmq.auth`` and other
ZeroMQ tools read the same files)::

    DIR/server.key                    server public key   -> copy to every writer node
    DIR/server.key_secret             server secret key   -> stays on the collector node (0600)
    DIR/clients/client-000.key        client public keys  -> the collector's allow-list
    DIR/clients/client-000.key_secret client secret keys -> one per writer node (0600)

The collector loads ``server.key_secret`` and every ``clients/*.key`` (public only); a writer
loads ``server.key`` and its own ``client-NNN.key_secret``. Secret files are created with
``O_EXCL`` and mode 0600, and loading refuses a secret file readable by group or other.

**Rank bindings.** CURVE authenticates a node, not a rank: without more, any listed key could
publish any rank's load. So every client certificate names the ranks its key may publish, in
its ``metadata`` section (the ZeroMQ certificate place for such properties)::

    metadata
        ranks = "0-3"
    curve
        public-key = "..."

``ranks`` is ``"*"`` (any rank: no binding, an explicit choice) or a comma-separated list of
ranks and inclusive ranges, e.g. ``"0-3,8"``. The collector's copy (``clients/*.key``) is the
one that counts: a frame for a rank its key is not bound to is dropped and counted
(``rank_not_allowed``). A client public key file without ``ranks`` is refused at load, so no key
is unbound by accident. ``loadsnap keys generate --ranks-per-client K`` binds client ``i`` to
ranks ``i*K .. i*K+K-1``; without it every client gets ``ranks = "*"``.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zmq
import zmq.auth

from loadsnap.errors import TransportError, UsageError

__all__ = [
    "ANY_RANK",
    "CLIENTS_DIR",
    "SERVER_PUBLIC_FILE",
    "SERVER_SECRET_FILE",
    "ClientKey",
    "CurveClientKeys",
    "CurveServerKeys",
    "GeneratedKeys",
    "RankSet",
    "client_ranks",
    "curve_available",
    "generate_keys",
    "load_client_key",
    "load_client_keys",
    "load_public_key",
    "load_ranks",
    "load_secret_key",
    "load_server_keys",
]

SERVER_PUBLIC_FILE: Final[str] = "server.key"
SERVER_SECRET_FILE: Final[str] = "server.key_secret"
CLIENTS_DIR: Final[str] = "clients"
MAX_CLIENTS: Final[int] = 1000
MAX_RANK: Final[int] = 65535  # the segment's MAX_DP_SIZE - 1
RANKS_PROPERTY: Final[str] = "ranks"
_SECRET_MODE: Final[int] = 0o600
_RANK_ITEM_RE: Final = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
_METADATA_RE: Final = re.compile(r'^\s+([A-Za-z0-9_.-]+)\s*=\s*"?([^"]*)"?\s*$')


@dataclass(frozen=True)
class RankSet:
    """The DP ranks a client key may publish; ``ranks`` None means any rank (``"*"``)."""

    ranks: frozenset[int] | None

    @classmethod
    def parse(cls, spec: str) -> RankSet:
        """``"*"`` or ranks and inclusive ranges separated by commas, e.g. ``"0-3,8"``.

        Raises
        ------
        ValueError
            Anything else (empty, a negative or reversed range, a rank above 65535).
        """
        text = spec.strip()
        if text == "*":
            return ANY_RANK
        ranks: set[int] = set()
        for item in text.split(","):
            match = _RANK_ITEM_RE.match(item.strip())
            if match is None:
                raise ValueError(f"not a rank or range: {item.strip()!r}")
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) is not None else low
            if high < low or high > MAX_RANK:
                raise ValueError(f"bad range: {item.strip()!r}")
            ranks.update(range(low, high + 1))
        return cls(frozenset(ranks))

    @classmethod
    def of(cls, ranks: Iterable[int]) -> RankSet:
        """The set of exactly ``ranks``."""
        return cls(frozenset(ranks))

    def __contains__(self, rank: object) -> bool:
        return self.ranks is None or rank in self.ranks

    def __str__(self) -> str:
        """The canonical spec (``"*"`` or e.g. ``"0-3,8"``), as written to key files."""
        if self.ranks is None:
            return "*"
        parts: list[str] = []
        ordered = sorted(self.ranks)
        start = prev = ordered[0] if ordered else 0
        for rank in ordered[1:]:
            if rank != prev + 1:
                parts.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = rank
            prev = rank
        if ordered:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        return ",".join(parts)


ANY_RANK: Final[RankSet] = RankSet(None)


@dataclass(frozen=True)
class ClientKey:
    """One entry of the collector's allow-list: a client's public key and its rank binding."""

    name: str  # the file's stem, e.g. client-000
    public: bytes  # Z85
    ranks: RankSet


@dataclass(frozen=True)
class CurveServerKeys:
    """What a collector needs: its key pair and the allow-list of client keys."""

    public: bytes
    secret: bytes
    clients: tuple[ClientKey, ...]

    @property
    def allowed_clients(self) -> frozenset[bytes]:
        """The listed client public keys (Z85)."""
        return frozenset(client.public for client in self.clients)


@dataclass(frozen=True)
class CurveClientKeys:
    """What a writer needs: the server's public key and its own key pair (Z85).

    ``ranks`` is the binding written in the writer's own certificate, when it has one; only the
    collector's copy of the public key decides, this one serves to warn early.
    """

    server_public: bytes
    public: bytes
    secret: bytes
    ranks: RankSet | None = None


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


def _certificate_text(public: bytes, secret: bytes | None, ranks: RankSet | None = None) -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    kind = "secret" if secret is not None else "public"
    lines = [
        f"#   ****  Generated on {stamp} by loadsnap  ****",
        f"#   ZeroMQ CURVE **{kind}** certificate",
        "",
        "metadata",
    ]
    if ranks is not None:
        lines.append(f'    {RANKS_PROPERTY} = "{ranks}"')
    lines += [
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


def _write_pair(directory: Path, name: str, ranks: RankSet | None = None) -> Path:
    public, secret = zmq.curve_keypair()
    _write_new(directory / f"{name}.key", _certificate_text(public, None, ranks), 0o644)
    secret_path = directory / f"{name}.key_secret"
    _write_new(secret_path, _certificate_text(public, secret, ranks), _SECRET_MODE)
    return secret_path


def client_ranks(index: int, ranks_per_client: int | None) -> RankSet:
    """The ranks :func:`generate_keys` binds client ``index`` to."""
    if ranks_per_client is None:
        return ANY_RANK
    first = index * ranks_per_client
    return RankSet.of(range(first, first + ranks_per_client))


def generate_keys(
    directory: str | os.PathLike[str], clients: int = 1, *, ranks_per_client: int | None = None
) -> GeneratedKeys:
    """Write a server key pair and ``clients`` client key pairs under ``directory``.

    Parameters
    ----------
    directory:
        Created (mode 0700) if missing. Existing key files are never overwritten.
    clients:
        Number of client key pairs, ``client-000`` upwards (1..1000).
    ranks_per_client:
        Bind client ``i`` to ranks ``i*K .. i*K+K-1`` (one writer node per client key, K ranks
        per node). None (default) writes ``ranks = "*"``: every key may publish any rank.

    Raises
    ------
    UsageError
        ``clients`` or ``ranks_per_client`` out of range, or a key file already exists.
    TransportError
        libzmq has no CURVE support.
    """
    _require_curve()
    if not 1 <= clients <= MAX_CLIENTS:
        raise UsageError(f"clients out of range: clients={clients} valid=1..{MAX_CLIENTS}")
    if ranks_per_client is not None and not (
        ranks_per_client >= 1 and clients * ranks_per_client <= MAX_RANK + 1
    ):
        raise UsageError(
            f"ranks_per_client out of range: ranks_per_client={ranks_per_client} "
            f"clients={clients} valid: 1 and clients*ranks_per_client <= {MAX_RANK + 1}"
        )
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    client_dir = root / CLIENTS_DIR
    client_dir.mkdir(mode=0o700, exist_ok=True)
    server_secret = _write_pair(root, "server")
    secrets = tuple(
        _write_pair(client_dir, f"client-{i:03d}", client_ranks(i, ranks_per_client))
        for i in range(clients)
    )
    return GeneratedKeys(root / SERVER_PUBLIC_FILE, server_secret, secrets)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot load CURVE key: {exc} (path={path})") from exc


def _metadata(path: Path) -> dict[str, str]:
    """The ``metadata`` section's properties (``name = "value"`` lines indented under it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TransportError(f"cannot load CURVE key: {exc} (path={path})") from exc
    properties: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        match = _METADATA_RE.match(line)
        if section == "metadata" and match is not None:
            properties[match.group(1)] = match.group(2)
    return properties


def load_ranks(path: str | os.PathLike[str]) -> RankSet | None:
    """The ``ranks`` binding in a certificate's metadata, or None when it has none.

    Raises
    ------
    TransportError
        An unreadable file, or a ``ranks`` value that is not ``"*"`` nor a list like ``"0-3,8"``.
    """
    file = Path(path)
    spec = _metadata(file).get(RANKS_PROPERTY)
    if spec is None:
        return None
    try:
        return RankSet.parse(spec)
    except ValueError as exc:
        raise TransportError(
            f'bad ranks in key file: ranks="{spec}" ({exc}); expected "*" or a list like '
            f'"0-3,8" (path={file})'
        ) from None


def load_client_key(path: str | os.PathLike[str]) -> ClientKey:
    """One allow-list entry: a client public key file and its (required) ``ranks`` binding.

    Raises
    ------
    TransportError
        A missing or malformed file, no ``ranks`` in its metadata, or a bad ``ranks`` value.
    """
    file = Path(path)
    public = load_public_key(file)
    ranks = load_ranks(file)
    if ranks is None:
        raise TransportError(
            f'no ranks in key file: add {RANKS_PROPERTY} = "*" (any rank) or e.g. "0-3" under '
            f"metadata (path={file})"
        )
    return ClientKey(file.stem, public, ranks)


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
        A missing or unsafe file, a client key file without a valid ``ranks`` binding, the same
        public key in two files, or no client public key to allow.
    """
    _require_curve()
    root = Path(directory)
    public, secret = load_secret_key(root / SERVER_SECRET_FILE)
    client_dir = root / CLIENTS_DIR
    clients: dict[bytes, tuple[ClientKey, Path]] = {}
    for path in sorted(client_dir.glob("*.key")):
        client = load_client_key(path)
        if client.public in clients:
            raise TransportError(
                f"same client public key in two files: first={clients[client.public][1]} "
                f"(path={path})"
            )
        clients[client.public] = (client, path)
    if not clients:
        raise TransportError(f"no client public keys to allow (dir={client_dir})")
    return CurveServerKeys(public, secret, tuple(client for client, _ in clients.values()))


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
    return CurveClientKeys(
        load_public_key(server_public), public, secret, load_ranks(client_secret)
    )
