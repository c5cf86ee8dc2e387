"""The quota engine on plain dicts: windows by event time, alerts once per threshold, replays, lateness."""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from schemas.attributed import AttributedUsage
from schemas.usage import TokenUsage
from streams.config import ConfigError
from streams.stages.plans import Plans, window_bounds
from streams.stages.quotas import QuotaEngine, QuotaTables, restore_entry, window_key

PLANS = """
grace_seconds: 600
default_plan: starter
tenants:
  tokyo-co: {plan: starter, time_zone: Asia/Tokyo}
  big: {plan: scale}
plans:
  starter:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 10, thresholds: [50, 80, 100]}
  scale:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 100, thresholds: [80], hard_cap: 100}
      - {id: user-hourly-tokens, metric: tokens, window: hour, limit: 1000, thresholds: [100], scope: user}
      - {id: minute-requests, metric: requests, window: minute, limit: 3, thresholds: [100]}
"""
DAY = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text(PLANS)
    return QuotaEngine(Plans.from_file(path), QuotaTables({}, {}, {}, {}))


def rec(tenant, at, cost, event_id, user=None, tokens=0):
    return AttributedUsage.model_construct(
        event_id=event_id, event_time=at, tenant_id=tenant, user_id=user, provider="openai", model="gpt-4o",
        usage=TokenUsage(input_tokens=tokens), cost_usd=Decimal(cost), priced=True, business_path="unattributed")


def feed(engine, tenant, costs, start=DAY + timedelta(hours=9), first_offset=0, partition=0):
    outcomes = []
    for i, cost in enumerate(costs):
        outcomes.append(engine.apply(rec(tenant, start + timedelta(minutes=i), cost, f"{tenant}-{first_offset + i}"),
                                     partition, first_offset + i))
    return outcomes


def alerts_of(outcomes):
    return [(a.threshold_percent, a.level, a.usage, a.event_id) for o in outcomes for a in o.alerts]


def test_crossing_50_80_100_percent_gives_three_alerts_in_order(engine):
    outcomes = feed(engine, "acme", ["2", "2", "2", "2.5", "1", "0.5", "3"])
    assert alerts_of(outcomes) == [
        (Decimal(50), "warning", Decimal("6"), "acme-2"),
        (Decimal(80), "warning", Decimal("8.5"), "acme-3"),
        (Decimal(100), "soft_cap", Decimal("10.0"), "acme-5"),
    ]
    last = outcomes[-1].states[0]
    assert (last.usage, last.remaining, last.status) == (Decimal("13.0"), Decimal(0), "soft_cap")
    assert outcomes[-1].alerts == []


def test_one_event_crossing_two_thresholds_sends_both_in_order(engine):
    outcomes = feed(engine, "acme", ["4.9", "5"])
    assert alerts_of(outcomes) == [(Decimal(50), "warning", Decimal("9.9"), "acme-1"),
                                   (Decimal(80), "warning", Decimal("9.9"), "acme-1")]


def test_hard_cap_fires_on_the_first_event_that_crosses_it(engine):
    outcomes = feed(engine, "big", ["79.99", "0.01", "19.99", "0.01", "0.01"])
    assert alerts_of(outcomes) == [(Decimal(80), "warning", Decimal("80.00"), "big-1"),
                                   (Decimal(100), "hard_cap", Decimal("100.00"), "big-3")]
    assert [o.states[0].status for o in outcomes] == ["ok", "warning", "warning", "hard_cap", "hard_cap"]


def test_replayed_events_are_not_counted_again_and_crossings_resend_the_same_alert(engine):
    first = feed(engine, "acme", ["3", "3", "3"])            # offsets 0..2: 50% crossed at 1, 80% at 2
    replay = feed(engine, "acme", ["3", "3", "3"])           # the same offsets again, after a restart
    assert [o.states for o in replay] == [[], [], []]
    assert alerts_of(replay) == alerts_of(first) == [(Decimal(50), "warning", Decimal(6), "acme-1"),
                                                     (Decimal(80), "warning", Decimal(9), "acme-2")]
    assert [a.alert_id for o in replay for a in o.alerts] == [a.alert_id for o in first for a in o.alerts]
    more = feed(engine, "acme", ["1"], first_offset=3)
    assert more[0].states[0].usage == Decimal(10)             # 9 + 1: nothing was counted twice


def test_state_read_back_from_the_changelog_is_counted_on(engine):
    """Entries as the changelog gives them back (JSON: decimals and times as text), restored."""
    key = window_key("acme", "daily-spend", "*", DAY.isoformat())
    tables = engine.tables(0)
    tables.quota_windows[key] = restore_entry("quota_windows", {"usage": "4.5", "partition": 0, "offset": 6})
    tables.quota_tenants["acme"] = restore_entry("quota_tenants", {
        "watermark": (DAY + timedelta(hours=9)).isoformat(), "windows": {key: (DAY + timedelta(days=1)).isoformat()},
        "next_expiry": (DAY + timedelta(days=1, minutes=10)).isoformat()})
    outcomes = feed(engine, "acme", ["0.4", "0.1", "4"], first_offset=5)  # offset 5 and 6 were counted
    assert [len(o.counted) for o in outcomes] == [0, 0, 1]
    assert alerts_of(outcomes) == [(Decimal(50), "warning", Decimal("8.5"), "acme-7"),
                                   (Decimal(80), "warning", Decimal("8.5"), "acme-7")]
    assert tables.quota_windows[key]["usage"] == Decimal("8.5") and tables.quota_windows[key]["offset"] == 7


@pytest.mark.parametrize("tenant", ["acme", "a b-c.d_e", 'quo"te', "back\\slash", "tab\there", "caf\u00e9",
                                    "\u6771\u4eac", "del\x7f", "emoji\U0001f600", ""])
def test_window_keys_are_the_json_of_their_parts(tenant):
    for scope in ("*", tenant, "/checkout/summary"):
        assert window_key(tenant, "daily-spend", scope, DAY.isoformat()) == \
            json.dumps([tenant, "daily-spend", scope, DAY.isoformat()])


def test_late_events_inside_the_grace_period_count_in_their_own_window(engine):
    feed(engine, "acme", ["1"], start=DAY + timedelta(days=1, minutes=5))             # watermark: day 2, 00:05
    inside = engine.apply(rec("acme", DAY + timedelta(hours=23, minutes=59), "4", "late-1"), 0, 1)
    assert (inside.late, inside.states[0].window_start, inside.states[0].usage) == (False, DAY, Decimal(4))
    [passing] = feed(engine, "acme", ["1"], start=DAY + timedelta(days=1, minutes=11), first_offset=2)  # grace over
    assert passing.expired == [f"acme/daily-spend/*/{DAY.isoformat()}"]  # its quota.state record gets a tombstone
    beyond = engine.apply(rec("acme", DAY + timedelta(hours=23, minutes=59), "4", "late-2"), 0, 3)
    assert (beyond.late, beyond.states, beyond.alerts) == (True, [], [])
    assert not any(DAY.isoformat() in key for key in engine.tables(0).quota_windows), "expired windows are cleaned up"
    assert list(engine.tables(0).quota_tenants["acme"]["windows"]) == [k for k in engine.tables(0).quota_windows if k.startswith('["acme"')]


def test_out_of_order_events_land_in_the_right_windows(engine):
    d1, d2 = DAY + timedelta(hours=23, minutes=50), DAY + timedelta(days=1, minutes=5)  # 10-minute grace
    for offset, (at, cost) in enumerate([(d2, "1"), (d1, "2"), (d2, "4"), (d1, "8")]):
        engine.apply(rec("acme", at, cost, f"e{offset}"), 0, offset)
    usage = {key: w["usage"] for key, w in engine.tables(0).quota_windows.items()}
    assert sorted(usage.values()) == [Decimal(5), Decimal(10)]


def test_tenants_never_share_windows(engine):
    feed(engine, "acme", ["6"])
    other = feed(engine, "globex", ["1"])
    assert other[0].states[0].usage == Decimal(1) and other[0].alerts == []


def test_windows_follow_the_tenant_time_zone(engine):
    # 2026-06-01 16:00 UTC is 2026-06-02 01:00 in Tokyo: a new day there, the same day in UTC.
    out = engine.apply(rec("tokyo-co", datetime(2026, 6, 1, 16, tzinfo=UTC), "1", "t"), 0, 0)
    assert out.states[0].window_start == datetime(2026, 6, 1, 15, tzinfo=UTC)
    assert out.states[0].window_end == datetime(2026, 6, 2, 15, tzinfo=UTC)


def test_per_user_scope_and_other_metrics(engine):
    at = DAY + timedelta(hours=3)
    outs = [engine.apply(rec("big", at + timedelta(seconds=i), "0", f"e{i}", user=user, tokens=400), 0, i)
            for i, user in enumerate(["ann", "bob", "ann", "ann"])]
    user_states = [(s.scope_value, s.usage) for o in outs for s in o.states if s.limit_id == "user-hourly-tokens"]
    assert user_states == [("ann", 400), ("bob", 400), ("ann", 800), ("ann", 1200)]
    requests = [s.usage for o in outs for s in o.states if s.limit_id == "minute-requests"]
    assert requests == [1, 2, 3, 4]
    assert [(a.limit_id, a.scope_value, a.event_id) for o in outs for a in o.alerts] == [
        ("minute-requests", "*", "e2"), ("user-hourly-tokens", "ann", "e3")]


@pytest.mark.parametrize(("kind", "zone", "at", "start", "end"), [
    ("month", "UTC", "2026-02-14T10:00:00+00:00", "2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),
    ("day", "America/New_York", "2026-03-08T12:00:00+00:00",   # a 23-hour day (DST starts)
     "2026-03-08T05:00:00+00:00", "2026-03-09T04:00:00+00:00"),
    ("hour", "Asia/Kolkata", "2026-06-01T10:10:00+00:00", "2026-06-01T09:30:00+00:00", "2026-06-01T10:30:00+00:00"),
    ("minute", "UTC", "2026-06-01T10:10:59.999+00:00", "2026-06-01T10:10:00+00:00", "2026-06-01T10:11:00+00:00"),
])
def test_calendar_window_bounds(kind, zone, at, start, end):
    assert window_bounds(kind, datetime.fromisoformat(at), ZoneInfo(zone)) == (
        datetime.fromisoformat(start), datetime.fromisoformat(end))


@pytest.mark.parametrize(("text", "message"), [
    ("plans: {p: {limits: [{id: x, metric: dollars, window: day, limit: 1}]}}", "plans.p.limits.0.metric"),
    ("plans: {p: {limits: [{id: x, metric: tokens, window: day, limit: 1, thresholds: [80, 50]}]}}",
     "thresholds must be distinct and ascending"),
    ("default_plan: gold\nplans: {}", "default_plan 'gold' is not one of the plans"),
    ("plans: {p: {}}\ntenants: {acme: {plan: p, time_zone: Mars/Olympus}}", "unknown time zone 'Mars/Olympus'"),
    ("plans: {p: {limits: [{id: x, metric: tokens, window: day, limit: 0}]}}", "greater than 0"),
])
def test_bad_plans_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "plans.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Plans.from_file(path)


def test_a_copy_of_an_event_sent_again_is_counted_once(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text(PLANS.replace("grace_seconds: 600", "grace_seconds: 600\ndedup_seconds: 60"))
    now = [1_000.0]
    seen: dict = {}
    engine = QuotaEngine(Plans.from_file(path), QuotaTables({}, {}, seen, {}), clock=lambda: now[0])
    at = DAY + timedelta(hours=9)
    first = engine.apply(rec("acme", at, "6", "dup-1"), 0, 0)
    copy = engine.apply(rec("acme", at, "6", "dup-1"), 0, 7)           # the producer sent it again
    replay = engine.apply(rec("acme", at, "6", "dup-1"), 0, 0)         # the same record after a restart
    assert (first.duplicate, copy.duplicate, replay.duplicate) == (False, True, False)
    assert len(first.alerts) == 1 and copy.alerts == [] and len(replay.alerts) == 1  # replay re-sends, same id
    other = engine.apply(rec("globex", at, "1", "dup-1"), 1, 0)        # another tenant's id is its own
    assert not other.duplicate
    assert next(iter(engine.tables(0).quota_windows.values()))["usage"] == Decimal(6)

    now[0] += 61                                                       # the id is forgotten after 60 s
    engine.forget_partitions()                                         # ... also across a rebalance
    engine.apply(rec("acme", at, "1", "later-1"), 0, 8)
    # One group per partition, second and batch, keyed by its first offset: partition 0's group of
    # second 1000 expired whole.
    assert seen == {"0:1061:8": {"p": 0, "t": 1061, "events": {"acme\x1flater-1": 8}},
                    "1:1000:0": {"p": 1, "t": 1000, "events": {"globex\x1fdup-1": 0}}}
    again = engine.apply(rec("globex", at, "1", "dup-1"), 1, 9)         # partition 1 expires its own groups
    assert not again.duplicate and sorted(seen) == ["0:1061:8", "1:1061:9"]
    engine.apply(rec("acme", at, "1", "later-2"), 0, 10)                # the same batch and second: same group
    engine.end_batch()
    engine.apply(rec("acme", at, "1", "later-3"), 0, 11)                # the next batch: a group of its own
    assert seen["0:1061:8"]["events"] == {"acme\x1flater-1": 8, "acme\x1flater-2": 10}
    assert seen["0:1061:11"]["events"] == {"acme\x1flater-3": 11}
    assert engine.apply(rec("acme", at, "1", "later-2"), 0, 12).duplicate


def test_an_event_stamped_ahead_counts_in_its_own_window_and_does_not_make_real_time_events_late(engine):
    now = DAY + timedelta(hours=9, seconds=10)
    ahead = engine.apply(rec("big", now + timedelta(minutes=55), "1", "skewed"), 0, 0, now)
    assert [(s.limit_id, s.window_start, s.usage) for s in ahead.states if s.limit_id == "minute-requests"] == [
        ("minute-requests", DAY + timedelta(hours=9, minutes=55), Decimal(1))]
    # The watermark moved to now + 60 s, not to 09:55: the minute windows of 09:00 stay open.
    outcomes = [engine.apply(rec("big", now + timedelta(seconds=i), "1", f"rt-{i}"), 0, 1 + i, now) for i in range(3)]
    assert [o.late for o in outcomes] == [False, False, False]
    assert [s.usage for s in outcomes[-1].states if s.limit_id == "minute-requests"] == [Decimal(3)]
    assert [a.level for a in outcomes[-1].alerts] == ["soft_cap"]  # 3 requests of 3: the limit still bites


def test_a_windows_state_key_is_the_one_its_published_state_carries(engine):
    [outcome] = feed(engine, "acme", ["1"])
    [counted] = outcome.counted
    assert counted.ref.state_key == counted.state().key == f"acme/daily-spend/*/{DAY.isoformat()}"
