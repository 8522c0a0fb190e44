"""Schemathesis against the sidecar app's own OpenAPI schema, over real HTTP on loopback.

The schema is the one :func:`~loadsnap.server.create_app` serves at ``/openapi.json``
(:func:`test_live_server_serves_the_tested_schema` checks that). Schemathesis generates valid and
invalid queries for every operation from it and sends them to a
:class:`~loadsnap.server.ServerThread` reading a live shared-memory segment (rank 2 of 3 never
publishes, so some answers are 503), and to one with no segment at all. Every answer must be
documented: no 5xx other than the documented 503, a documented status code, content type,
headers and body schema, and invalid input rejected with a 4xx.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, TypeAlias

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from loadsnap import (
    LoadSnapshot,
    LoraSection,
    MemorySection,
    QueueSection,
    unlink_segment,
)
from loadsnap.server import ServerThread, create_app
from tests.helpers import report, serving, unique_instance

DP = 3
PUBLISHED_RANKS = (0, 1)  # rank 2 never publishes
MAX_EXAMPLES = int(os.environ.get("LOADSNAP_SCHEMATHESIS_EXAMPLES", "250"))

# The app builds its schema without touching shared memory, so this instance never exists.
APP_SCHEMA = create_app("openapi-schema-only").openapi()
# Every built-in check runs except positive_data_acceptance, which wants a 2xx for any valid
# query: a valid query can still be refused as documented (dp_rank=2 has never published: 503;
# dp_rank=7 is not below dp_size: 400). 503 is a documented answer, not a server error.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"enabled": False},
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
        }
    }
)
schema = schemathesis.openapi.from_dict(APP_SCHEMA, config=CONFIG)

ApiCase: TypeAlias = schemathesis.Case[Any]  # generic over its APIOperation
_answers: Counter[str] = Counter()


def _snapshot(rank: int) -> LoadSnapshot:
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=rank + 3,
        num_waiting_reqs=rank,
        token_usage=0.25,
        gen_throughput=120.5,
        utilization=0.5,
        max_running_requests=64,
        memory=MemorySection(weight_bytes=1 << 30),
        lora=LoraSection(loaded_adapters=["a", "b"]),
        queues=QueueSection(),
    )


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    name = unique_instance("t") + "-st"
    with serving(name, DP, [_snapshot(rank) for rank in PUBLISHED_RANKS]) as server:
        yield server.url
        assert server._thread.is_alive()


@pytest.fixture(scope="module")
def missing_url() -> Iterator[str]:
    name = unique_instance("t") + "-none"
    with ServerThread(create_app(name)) as server:
        yield server.url
    unlink_segment(name)


def _call(case: ApiCase, url: str, kind: str) -> None:
    response = case.call_and_validate(base_url=url, timeout=10)
    _answers[f"{kind}_{response.status_code}"] += 1


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_live_segment_answers_match_schema(case: ApiCase, live_url: str) -> None:
    _call(case, live_url, "live")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES // 3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_missing_segment_answers_match_schema(case: ApiCase, missing_url: str) -> None:
    _call(case, missing_url, "missing")


def test_live_server_serves_the_tested_schema(live_url: str) -> None:
    # Runs after the schemathesis tests (file order): the server still serves, same schema.
    with httpx.Client(base_url=live_url, timeout=10.0) as client:
        assert client.get("/openapi.json").json() == APP_SCHEMA
        loads = client.get("/v1/loads").json()["loads"]
        assert [load["num_running_reqs"] for load in loads] == [3, 4]
        assert client.get("/healthz").status_code == 200
    statuses = sorted({key.rsplit("_", 1)[1] for key in _answers})
    assert not [status for status in statuses if status.startswith("5") and status != "503"]
    report(
        "http_schemathesis",
        {"requests": sum(_answers.values()), **dict(sorted(_answers.items()))},
    )
