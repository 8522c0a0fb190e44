"""``GET /v1/loads`` as a FastAPI ``APIRouter``: a thin adapter over the pure renderers.

Mount it in any FastAPI app with one line::

    app.include_router(loads_router(ShmReader("my-instance")))

The read runs in a worker thread (``anyio.to_thread``), never on the event loop, and a lock
serialises it because a reader is not thread-safe; a read takes microseconds, so the lock is
never contended for long. Query parsing is a pure function, :func:`parse_loads_query`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import anyio.to_thread
import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from loadsnap.errors import LoadsnapError, UsageError
from loadsnap.exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    ROUTABLE_STATUSES,
    LegacyLoad,
    LoadsDocument,
    build_document,
    legacy_loads,
    render_prometheus,
)
from loadsnap.reading import (
    HotTable,
    SlotRead,
    SlotStatus,
    SnapshotSource,
    unavailable_state,
)
from loadsnap.schema import SECTIONS, parse_include

__all__ = ["FORMATS", "LoadsQuery", "LockedSource", "loads_router", "parse_loads_query"]

FORMATS: Final[tuple[str, ...]] = ("json", "prometheus", "openmetrics")
OutputFormat = Literal["json", "prometheus", "openmetrics"]
_RANK_RE: Final = re.compile(r"^\s*[0-9]{1,9}\s*$")
_OPENMETRICS_MEDIA: Final[str] = "application/openmetrics-text"
T = TypeVar("T")


class LockedSource:
    """Serialises every call to a source that is not thread-safe. Safe from any thread.

    Parameters
    ----------
    source:
        The wrapped source, e.g. an :class:`~loadsnap.ShmReader`.
    """

    def __init__(self, source: SnapshotSource) -> None:
        self.inner = source
        self._lock = threading.Lock()

    @property
    def dp_size(self) -> int:
        """The wrapped source's ``dp_size``."""
        with self._lock:
            return self.inner.dp_size

    @property
    def stale_after_s(self) -> float:
        """The wrapped source's staleness budget."""
        return self.inner.stale_after_s

    def read_all(self) -> list[SlotRead]:
        """The wrapped source's ``read_all``, under the lock."""
        with self._lock:
            return self.inner.read_all()

    def hot_table(self) -> HotTable:
        """The wrapped source's ``hot_table``, under the lock."""
        with self._lock:
            return self.inner.hot_table()

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(inner)`` under the lock (for diagnostics that need the source itself)."""
        with self._lock:
            return fn(self.inner)

    @property
    def stats(self) -> object:
        """The wrapped source's ``stats`` attribute, if any (read without the lock)."""
        return getattr(self.inner, "stats", None)


@dataclass(frozen=True)
class LoadsQuery:
    """A validated ``/v1/loads`` query."""

    dp_rank: int | None
    include: frozenset[str]
    format: OutputFormat


def _wants_openmetrics(accept: str) -> bool:
    return _OPENMETRICS_MEDIA in accept.lower()


def parse_loads_query(
    dp_rank: str | None,
    include: str | None,
    format: str | None,
    accept: str = "",
    *,
    default_include: str = "all",
) -> LoadsQuery:
    """Validate the raw query strings of ``/v1/loads``.

    ``format`` absent means JSON, unless ``Accept`` asks for OpenMetrics; ``prometheus`` means
    text 0.0.4, or OpenMetrics when ``Accept`` asks for it.

    Raises
    ------
    UsageError
        A non-integer or negative rank, an unknown section or an unknown format; the message
        says what is valid.
    """
    rank: int | None = None
    if dp_rank is not None:
        if not _RANK_RE.match(dp_rank):
            raise UsageError(f"dp_rank: expected a non-negative integer, found {dp_rank!r}")
        rank = int(dp_rank)
    sections = parse_include(default_include if include is None else include)
    fmt = (format or "").strip().lower()
    if fmt == "":
        fmt = "openmetrics" if _wants_openmetrics(accept) else "json"
    elif fmt == "prometheus" and _wants_openmetrics(accept):
        fmt = "openmetrics"
    if fmt not in FORMATS:
        raise UsageError(f"format: unknown value {format!r}; valid: {', '.join(FORMATS)}")
    return LoadsQuery(rank, sections, fmt)  # type: ignore[arg-type]


def _error(status: int, message: str, **extra: Any) -> Response:
    headers = {"Cache-Control": "no-store"}
    if status == 503:
        headers["Retry-After"] = "1"
    body = msgspec.json.encode({"detail": message, **extra})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _unavailable(reads: list[SlotRead]) -> Response | None:
    # 503 when no rank is routable (nothing a router may act on), saying why.
    if any(read.status in ROUTABLE_STATUSES for read in reads):
        return None
    dead = sum(1 for read in reads if read.status is SlotStatus.DEAD)
    if dead == len(reads):
        return _error(503, f"every rank is dead: dead={dead} dp_size={len(reads)}", reason="dead")
    counts = ", ".join(
        f"{status.label}={n}"
        for status in SlotStatus
        if (n := sum(1 for read in reads if read.status is status))
    )
    return _error(503, f"no rank has a current load: {counts}", reason="no_data")


# --- the OpenAPI description of /v1/loads (what schemathesis checks the live answers against) ---


class QueryErrorBody(msgspec.Struct, kw_only=True):
    """The 400 body: what was wrong and what is valid."""

    detail: Annotated[str, msgspec.Meta(min_length=1)]
    valid_sections: list[str] | msgspec.UnsetType = msgspec.UNSET
    valid_formats: list[str] | msgspec.UnsetType = msgspec.UNSET


UnavailableReason = Literal[
    "missing",
    "not_ready",
    "incompatible",
    "dead",
    "no_data",
    "fresh",
    "stale",
    "never_published",
    "torn",
    "invalid",
]


class UnavailableBody(msgspec.Struct, kw_only=True):
    """The 503 body: nothing routable to report, and why."""

    detail: Annotated[str, msgspec.Meta(min_length=1)]
    reason: UnavailableReason


def _inline_refs(node: Any, defs: Mapping[str, Any]) -> Any:
    # msgspec's schema points into "#/$defs"; a router cannot add components to its host app.
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline_refs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


def _struct_schema(kind: Any) -> dict[str, Any]:
    """The JSON schema of a msgspec type, self-contained (``$ref``s inlined)."""
    (schema,), components = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")
    inlined: dict[str, Any] = _inline_refs(schema, components)
    return inlined


def _any_case(names: tuple[str, ...]) -> str:
    # A regex alternative matching each name in any case (JSON Schema patterns have no flags).
    return "|".join("".join(f"[{c}{c.upper()}]" for c in name) for name in names)


# What parse_loads_query accepts, exactly, as ECMA-262 patterns: values are stripped of every
# str.isspace() character (listed here) and lower-cased. A format may be empty (absent); an
# include is comma-separated, empty items are skipped, and at least one section is named.
_SPACE: Final[str] = "[" + "".join(chr(c) for c in range(0x3001) if chr(c).isspace()) + "]*"
_FORMAT_PATTERN: Final[str] = f"^{_SPACE}(?:{_any_case(FORMATS)})?{_SPACE}$"
_SECTION: Final[str] = f"(?:{_any_case(SECTIONS)})"
_INCLUDE_PATTERN: Final[str] = (
    f"^(?:{_SPACE},)*{_SPACE}{_SECTION}{_SPACE}(?:,{_SPACE}{_SECTION}?{_SPACE})*$"
)


def _openapi_parameters(default_include: str) -> list[dict[str, Any]]:
    # Parsed by hand (parse_loads_query) so bad input gets our 400 message, not FastAPI's 422.
    return [
        {
            "name": "dp_rank",
            "in": "query",
            "required": False,
            "description": "One rank (400 when not below dp_size). Default: every rank.",
            "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
            "example": 0,
        },
        {
            "name": "include",
            "in": "query",
            "required": False,
            "description": f"Comma-separated sections: {', '.join(SECTIONS)}. The core keys "
            "are always present.",
            "schema": {"type": "string", "default": default_include, "pattern": _INCLUDE_PATTERN},
            "example": "core,memory",
        },
        {
            "name": "format",
            "in": "query",
            "required": False,
            "description": (
                f"{', '.join(FORMATS)}, in any case. Absent or empty means json, or "
                "openmetrics when Accept asks for it; prometheus also becomes openmetrics then."
            ),
            "schema": {"type": "string", "pattern": _FORMAT_PATTERN},
            "example": "prometheus",
        },
    ]


_NO_STORE: Final[dict[str, Any]] = {
    "Cache-Control": {"schema": {"type": "string", "const": "no-store"}}
}
_RETRY: Final[dict[str, Any]] = {
    "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}
}


def _unavailable_response() -> dict[str, Any]:
    return {
        "description": "Nothing routable to report; reason says why",
        "headers": {**_NO_STORE, **_RETRY},
        "content": {"application/json": {"schema": _struct_schema(UnavailableBody)}},
    }


def _openapi_responses() -> dict[int | str, dict[str, Any]]:
    text = {"schema": {"type": "string"}}
    return {
        200: {
            "headers": _NO_STORE,
            "content": {
                "application/json": {"schema": _struct_schema(LoadsDocument)},
                CONTENT_TYPE_TEXT: text,
                CONTENT_TYPE_OPENMETRICS: text,
            },
        },
        400: {
            "description": "Bad input; the message says what is valid",
            "headers": _NO_STORE,
            "content": {"application/json": {"schema": _struct_schema(QueryErrorBody)}},
        },
        503: _unavailable_response(),
    }


def _legacy_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "Every routable rank, in sglang-router 0.3.x's shape",
            "headers": _NO_STORE,
            "content": {"application/json": {"schema": _struct_schema(list[LegacyLoad])}},
        },
        503: _unavailable_response(),
    }


def loads_router(
    source: SnapshotSource,
    *,
    path: str = "/v1/loads",
    prefix: str = "loadsnap_",
    const_labels: Mapping[str, str] | None = None,
    default_include: str = "all",
    version: str | None = None,
    clock: Callable[[], float] = time.time,
    legacy_path: str | None = "/get_load",
) -> APIRouter:
    """Build the ``/v1/loads`` router (and ``/get_load``, for sglang-router 0.3.x).

    Query parameters: ``dp_rank`` (one rank), ``include`` (comma-separated sections: core,
    memory, spec, lora, disagg, queues, all; sglang's default ``all``), ``format`` (json,
    prometheus, openmetrics). The JSON is sglang's document
    (:class:`~loadsnap.exposition.LoadsDocument`): ``loads`` holds the routable (fresh) ranks,
    ``unavailable`` the others with their status and age.

    Status codes: 200; 400 for bad input, with a message saying what is valid; 503 with
    ``reason`` (``missing``, ``not_ready``, ``incompatible``, ``dead``, ``no_data``, or the
    status of the one rank asked for) when no rank is routable.

    Parameters
    ----------
    source:
        Any :class:`~loadsnap.SnapshotSource`; wrapped in :class:`LockedSource` unless it is one.
    path:
        Route path.
    prefix, const_labels:
        For the Prometheus formats (see :func:`~loadsnap.exposition.render_prometheus`).
    default_include:
        Sections when ``include`` is absent.
    version:
        Reported as ``version`` in JSON (default: loadsnap's version).
    clock:
        Wall clock for ``timestamp``.
    legacy_path:
        Where to serve sglang-router 0.3.x's ``GET /get_load`` (a JSON array of ``{dp_rank,
        num_reqs, num_waiting_reqs, num_tokens}`` per routable rank); None: not served.

    Raises
    ------
    UsageError
        An invalid prefix, constant label or default include.
    """
    if version is None:
        from loadsnap import __version__

        version = __version__
    product_version: str = version
    render_prometheus([], prefix, const_labels)  # validates prefix and labels now
    parse_include(default_include)
    locked = source if isinstance(source, LockedSource) else LockedSource(source)
    labels = dict(const_labels or {})
    router = APIRouter()

    @router.get(
        path,
        summary="Every DP rank's latest load with its freshness",
        response_description="JSON, Prometheus text or OpenMetrics",
        responses=_openapi_responses(),
        openapi_extra={"parameters": _openapi_parameters(default_include)},
    )
    async def get_loads(request: Request) -> Response:
        params = request.query_params
        try:
            query = parse_loads_query(
                params.get("dp_rank"),
                params.get("include"),
                params.get("format"),
                request.headers.get("accept", ""),
                default_include=default_include,
            )
        except UsageError as exc:
            return _error(400, str(exc), valid_sections=list(SECTIONS), valid_formats=FORMATS)
        try:
            reads = await anyio.to_thread.run_sync(locked.read_all)
        except LoadsnapError as exc:
            return _error(503, str(exc), reason=unavailable_state(exc).value)
        if query.dp_rank is not None:
            if query.dp_rank >= len(reads):
                return _error(
                    400,
                    f"dp_rank out of range: dp_rank={query.dp_rank}; "
                    f"valid: 0..{len(reads) - 1} (dp_size={len(reads)})",
                )
            reads = [reads[query.dp_rank]]
            read = reads[0]
            if read.status not in ROUTABLE_STATUSES or read.snapshot is None:
                return _error(
                    503,
                    f"dp_rank={read.rank} has no current load: {read.status.label} ({read.reason})",
                    reason=read.status.label,
                )
        elif (refusal := _unavailable(reads)) is not None:
            return refusal
        headers = {"Cache-Control": "no-store"}
        if query.format == "json":
            doc = build_document(reads, query.include, clock(), version=product_version)
            return Response(
                msgspec.json.encode(doc), media_type="application/json", headers=headers
            )
        openmetrics = query.format == "openmetrics"
        text = render_prometheus(reads, prefix, labels, openmetrics, include=query.include)
        content_type = CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT
        headers["Content-Type"] = content_type
        return Response(text.encode(), headers=headers)

    if legacy_path is not None:

        @router.get(
            legacy_path,
            summary="Every routable rank's load in sglang-router 0.3.x's /get_load shape",
            responses=_legacy_responses(),
        )
        async def get_load() -> Response:
            try:
                reads = await anyio.to_thread.run_sync(locked.read_all)
            except LoadsnapError as exc:
                return _error(503, str(exc), reason=unavailable_state(exc).value)
            if (refusal := _unavailable(reads)) is not None:
                return refusal
            body = msgspec.json.encode(legacy_loads(build_document(reads, "core")))
            return Response(
                body, media_type="application/json", headers={"Cache-Control": "no-store"}
            )

    return router
