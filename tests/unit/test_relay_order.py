"""``loadsnap._relay_order``: the collector's per-rank ordering rules, without sockets."""

from __future__ import annotations

from loadsnap._relay_order import Order, RankOrder

TAKEOVER_NS = 2_000_000_000


def test_first_snapshot_then_only_higher_seq_within_an_epoch() -> None:
    order = RankOrder(TAKEOVER_NS)
    assert order.judge(epoch=5, seq=1, now_ns=0) is Order.NEWER
    order.relayed(5, 1, 0)
    assert order.judge(5, 1, 10) is Order.OUT_OF_ORDER  # a duplicate
    assert order.judge(5, 0, 10) is Order.OUT_OF_ORDER
    assert order.judge(5, 2, 10) is Order.NEWER


def test_restart_replaces_and_older_epoch_is_stale_until_quiet() -> None:
    order = RankOrder(TAKEOVER_NS)
    order.relayed(5, 9, 1_000)
    assert order.judge(6, 1, 2_000) is Order.NEWER  # a restarted writer
    # A lower epoch (a host whose clock is behind) waits until the current one goes quiet.
    assert order.judge(4, 1, 1_000 + TAKEOVER_NS - 1) is Order.STALE_EPOCH
    verdict = order.judge(4, 1, 1_000 + TAKEOVER_NS)
    assert verdict is Order.TAKEOVER and verdict.relay
    order.relayed(4, 1, 1_000 + TAKEOVER_NS)
    assert order.judge(4, 2, 1_000 + TAKEOVER_NS) is Order.NEWER


def test_drop_verdicts_name_the_collectors_counters() -> None:
    from loadsnap.collector_stats import DROP_REASONS

    for verdict in Order:
        if not verdict.relay:
            assert verdict.value in DROP_REASONS
