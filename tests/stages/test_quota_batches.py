"""The quota stage for a whole batch (``QuotaEngine.apply_batch``) against the same events applied
one by one (``apply``, the reference): the same outcome per event, the same alerts in the same
order, the same quota states, reservations settled and windows expired, the same changelog."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.attributed import AttributedUsage
from schemas.quota import QuotaWindow
from schemas.usage import TokenUsage, UsageEvent
from streams.runtime.state import ChangelogTables, _encode
from streams.stages.attribution import _ROWS
from streams.stages.plans import Plans
from streams.stages.pricing import Quote, Rates
from streams.stages.quotas import (
    _MEMO_SIZE,
    Bounds,
    Counted,
    QuotaEngine,
    QuotaTables,
    WindowRef,
    _state_prefix,
    restore_entry,
)
from streams.storage.compiled import fast
from streams.storage.tables import LedgerRow

# Small limits, so that windows cross thresholds within a batch; tiered and filtered charges; every
# scope and window kind.
PLANS = """
grace_seconds: 120
dedup_seconds: 900
billing_grace_seconds: 3600
default_plan: small
tenants:
  tokyo: {plan: small, time_zone: Asia/Tokyo}
  wide: {plan: wide}
  free: {plan: unrated}
  bare: {plan: nothing}
plans:
  small:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 0.20, thresholds: [50, 80, 100], hard_cap: 150}
      - {id: minute-requests, metric: requests, window: minute, limit: 4, thresholds: [50, 100]}
      - {id: monthly-bill, metric: revenue_usd, window: month, limit: 0.05, thresholds: [25, 50, 100]}
      - {id: margin-floor, metric: margin_percent, window: month, limit: 60, min_revenue: 0.001}
    rate_card:
      charges:
        - id: tokens
          metric: tokens
          per: 1000
          price: volume
          tiers:
            - {up_to: 5, unit_amount: 0.02}
            - {up_to: 20, unit_amount: 0.002}
            - {unit_amount: 0.001}
        - {id: support, metric: cost_usd, when: {business_path: ["support/*"]}, price: unit, unit_amount: 1.4}
  wide:
    limits:
      - {id: user-hourly-tokens, metric: tokens, window: hour, limit: 3000, thresholds: [100], scope: user}
      - {id: model-daily-requests, metric: requests, window: day, limit: 6, thresholds: [100], scope: model}
      - {id: path-hourly-spend, metric: cost_usd, window: hour, limit: 0.05, thresholds: [100], scope: business_path}
    rate_card:
      charges:
        - {id: calls, metric: requests, price: unit, unit_amount: 0.01}
  unrated:
    limits:
      - {id: hourly-spend, metric: cost_usd, window: hour, limit: 0.1, thresholds: [100]}
  nothing: {}
"""
TENANTS = ["acme", "globex", "tokyo", "wide", "free", "bare"]
START = datetime(2026, 5, 31, 23, 50, tzinfo=UTC)  # a day's and a month's end inside the run


def records(seed: int, count: int) -> list[tuple[int, AttributedUsage]]:
    """(partition, record): mostly in time order, with late events, copies sent again, calls on
    reservations, two users, two models and two business paths."""
    rng = random.Random(seed)
    at = START
    out: list[tuple[int, AttributedUsage]] = []
    for i in range(count):
        at += timedelta(seconds=rng.randint(0, 20))
        tenant = rng.choice(TENANTS)
        partition = TENANTS.index(tenant) % 3
        if out and rng.random() < 0.04:  # the producer sends an earlier event again
            partition, again = rng.choice(out)
            out.append((partition, again))
            continue
        if rng.random() < 0.02:  # a producer keyed it to another partition
            partition = (partition + 1) % 3
        when = at - timedelta(minutes=rng.choice([3, 30, 600])) if rng.random() < 0.05 else at
        tokens = rng.randint(0, 3_000)
        out.append((partition, AttributedUsage.model_construct(
            event_id=f"e{i}", event_time=when, tenant_id=tenant, user_id=rng.choice(["u1", "u2", None]),
            provider="openai", model=rng.choice(["gpt-4o", "o3"]), feature=None,
            usage=TokenUsage(input_tokens=tokens, output_tokens=rng.randint(0, 500)),
            cost_usd=Decimal(rng.randint(0, 30_000)) / Decimal(1_000_000), priced=True,
            business_path=rng.choice(["support/answer", "search/summarize"]),
            reservation_id=f"0-r{i}" if rng.random() < 0.3 else None)))
    return out


class Run:
    """One engine over changelogged tables, with a clock that moves one second a batch."""

    def __init__(self, plans: Plans) -> None:
        self.state = ChangelogTables("changelog", QuotaTables._fields, restore_entry)
        self.now = 1_780_000_000.0
        self.engine = QuotaEngine(plans, lambda p: QuotaTables(**self.state.views(p)), clock=lambda: self.now)

    def one_by_one(self, batch: list[tuple[int, int, AttributedUsage]]) -> dict:
        """What the processor collected from ``apply``, event by event, before the batched path."""
        events, alerts, windows, settled, expired = [], [], {}, {}, []
        for partition, offset, record in batch:
            out = self.engine.apply(record, partition, offset, NOW)
            events.append((out.duplicate, out.late, out.rated))
            if out.duplicate:
                continue
            alerts.extend(out.alerts)
            expired.extend(out.expired)
            for counted in out.counted:
                windows[counted.ref.key] = counted
                if record.reservation_id is not None:
                    settled.setdefault(counted.ref.key, []).append(record.reservation_id)
        return self._end(events, alerts, windows, settled, expired)

    def batched(self, batch: list[tuple[int, int, AttributedUsage]]) -> dict:
        out = self.engine.apply_batch([r for _, _, r in batch], [p for p, _, _ in batch], [o for _, o, _ in batch],
                                      NOW)
        assert out.failed == []
        return self._end([(e.duplicate, e.late, e.rated) for e in out.events], out.alerts, out.counted, out.settled,
                         out.expired)

    def _end(self, events: list, alerts: list, windows: dict[str, Counted], settled: dict, expired: list) -> dict:
        self.engine.end_batch()
        changelog = self.state.drain({})
        self.now += 1
        return {
            "events": events,
            "alerts": [alert.model_dump_json() for alert in alerts],
            "states": [(key, _state_json(counted, settled.get(key))) for key, counted in windows.items()],
            "settled": list(settled.items()),
            "expired": expired,
            # Key by key (the order of records of different keys is free), each value byte for byte.
            "changelog": {(p, key): value for p, key, value in changelog},
        }


NOW = START + timedelta(hours=12)


def _state_json(counted: Counted, settled: list[str] | None) -> str:
    """The state as the checkpoint writes it, which must be pydantic's JSON of the model, byte for byte."""
    written = counted.state_json(settled)
    assert written == counted.state(settled).model_dump_json().encode()
    return written.decode()


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plans.yaml"
    path.write_text(PLANS)
    return Plans.from_file(path)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("batch_size", [1, 7, 50, 400])
def test_a_batch_counts_as_its_events_one_by_one(plans, seed, batch_size):
    stream = records(seed, 600)
    offsets = {0: 0, 1: 0, 2: 0}
    placed = []
    for partition, record in stream:
        placed.append((partition, offsets[partition], record))
        offsets[partition] += 1
    reference, batched = Run(plans), Run(plans)
    seen = {"alerts": 0, "expired": 0, "late": 0, "duplicates": 0, "states": 0, "settled": 0}
    for base in range(0, len(placed), batch_size):
        batch = placed[base:base + batch_size]
        expected, got = reference.one_by_one(batch), batched.batched(batch)
        for name in expected:
            assert got[name] == expected[name], (name, base)
        seen["alerts"] += len(expected["alerts"])
        seen["expired"] += len(expected["expired"])
        seen["late"] += sum(late for _, late, _ in expected["events"])
        seen["duplicates"] += sum(dup for dup, _, _ in expected["events"])
        seen["states"] += len(expected["states"])
        seen["settled"] += len(expected["settled"])
    assert reference.state.data == batched.state.data
    # What the comparison covered: every kind of outcome occurred.
    assert all(seen[name] > 0 for name in seen), seen


@pytest.mark.parametrize("seed", range(4))
def test_a_replayed_batch_after_a_restore_sends_the_same_alerts_again(plans, seed):
    """After a restore from the changelog, a batch whose offsets were counted before is skipped
    window by window, and the alerts its events crossed are sent again (the same ids)."""
    placed = [(0, offset, record) for offset, (_, record) in enumerate(records(seed, 300))]
    reference, batched = Run(plans), Run(plans)
    for run in (reference, batched):
        for base in range(0, 300, 100):
            (run.one_by_one if run is reference else run.batched)(placed[base:base + 100])
        run.engine.forget_partitions()
    again_reference, again_batched = reference.one_by_one(placed[100:250]), batched.batched(placed[100:250])
    assert again_batched == again_reference
    assert again_batched["alerts"] and not again_batched["states"]
    assert reference.state.data == batched.state.data


def test_the_events_of_a_tenant_without_limits_or_rates_are_not_checked_for_copies(plans):
    run = Run(plans)
    record = AttributedUsage.model_construct(
        event_id="x", event_time=START, tenant_id="bare", user_id=None, provider="openai", model="gpt-4o",
        feature=None, usage=TokenUsage(input_tokens=1), cost_usd=Decimal(1), priced=True, business_path="p",
        reservation_id=None)
    out = run.batched([(0, 0, record), (0, 1, record)])
    assert [dup for dup, _, _ in out["events"]] == [False, False] and out["changelog"] == {}
    assert json.loads(json.dumps(out["states"])) == []



def _call(tenant: str, event_id: str, at: datetime) -> AttributedUsage:
    return AttributedUsage.model_construct(
        event_id=event_id, event_time=at, tenant_id=tenant, user_id=None, provider="openai", model="m", feature=None,
        usage=TokenUsage(input_tokens=1), cost_usd=Decimal(0), priced=True, business_path="p", reservation_id=None)


def _plans(tmp_path, text: str) -> Plans:
    path = tmp_path / f"plans-{abs(hash(text))}.yaml"
    path.write_text(text)
    return Plans.from_file(path)


def test_a_threshold_added_across_a_restart_is_alerted_by_the_batch_path_too(tmp_path):
    """A window restored with crossings of [50, 80] under a plan now at [50, 90]: 90 is new."""
    limits = "default_plan: p\nplans: {p: {limits: [{id: daily-requests, metric: requests, window: day, " \
             "limit: 10, thresholds: %s}]}}\n"
    at = datetime(2026, 6, 1, 10, tzinfo=UTC)
    before = Run(_plans(tmp_path, limits % "[50, 80]"))
    before.one_by_one([(0, i, _call("t", f"e{i}", at + timedelta(seconds=i))) for i in range(8)])
    outs = []
    for mode in ("one_by_one", "batched"):
        run = Run(_plans(tmp_path, limits % "[50, 90]"))
        # Restored from the changelog the first run wrote, as a restarted worker would be.
        run.state.load([(0, f"{name}|{key}".encode(), _encode(value))
                        for name, table in before.state.data.items() for key, value in table.items()])
        outs.append(getattr(run, mode)([(0, i, _call("t", f"e{i}", at + timedelta(seconds=i))) for i in (8, 9)]))
    assert outs[1] == outs[0]
    assert [json.loads(a)["threshold_percent"] for a in outs[1]["alerts"]] == ["90"]


def test_a_day_whose_midnight_repeats_is_one_window_in_both_paths(tmp_path):
    """Atlantic/Azores falls back from 01:00 to 00:00 on 2025-10-26 (UTC+0 to UTC-1): 01:30Z is
    00:30 local the second time round (fold 1), 00:45Z is 00:45 the first time. Its day starts at
    the first midnight (00:00Z) and lasts 25 hours: one window, whatever the events' order."""
    plans = _plans(tmp_path, "grace_seconds: 300\ndefault_plan: p\ntenants: {az: {plan: p, time_zone: "
                             "Atlantic/Azores}}\nplans: {p: {limits: [{id: daily-requests, metric: requests, "
                             "window: day, limit: 100}]}}\n")
    batch = [(0, 0, _call("az", "a", datetime(2025, 10, 26, 1, 30, tzinfo=UTC))),
             (0, 1, _call("az", "b", datetime(2025, 10, 26, 0, 45, tzinfo=UTC)))]
    expected, got = Run(plans).one_by_one(batch), Run(plans).batched(batch)
    assert got == expected
    [(key, state)] = got["states"]
    state = json.loads(state)
    assert (state["window_start"], state["window_end"], state["usage"]) == \
        ("2025-10-26T00:00:00Z", "2025-10-27T01:00:00Z", "2")


def test_two_engines_with_other_plans_write_each_their_own_states(tmp_path):
    """The same tenant, limit id, scope and window under two plans that differ in the limit's
    metric: each state is its own model's JSON (the fixed part of a state is cached per window)."""
    at = datetime(2026, 6, 1, 10, tzinfo=UTC)
    plan = "default_plan: p\nplans: {p: {limits: [{id: daily, metric: %s, window: day, limit: 10}]}}\n"
    for metric in ("requests", "tokens"):
        out = Run(_plans(tmp_path, plan % metric)).batched([(0, 0, _call("t", "e0", at)), (0, 1, _call("t", "e1", at))])
        [(_, state)] = out["states"]  # (checked against the model's own JSON by Run)
        assert json.loads(state)["metric"] == metric


def test_batches_applied_without_end_batch_between_them_still_changelog_every_event(plans):
    """The batch path marks a dedup group changed with a partition's first event of each call: a
    second call after a drain, adding to the group the first call opened (no ``end_batch`` between
    them), still gives the changelog the group with its new events, as event by event does; also
    when the call's first event is a copy, which goes into no group."""
    stream = [(0, offset, _call("acme", f"e{offset}", START + timedelta(seconds=offset))) for offset in range(6)]
    copy = (0, 6, stream[0][2])
    reference, batched = Run(plans), Run(plans)
    for part in (stream[:3], [copy, *stream[3:]]):
        for partition, offset, record in part:
            reference.engine.apply(record, partition, offset, NOW)
        batched.engine.apply_batch([r for _, _, r in part], [p for p, _, _ in part], [o for _, o, _ in part], NOW)
        expected, got = reference.state.drain({}), batched.state.drain({})
        assert {(p, k): v for p, k, v in got} == {(p, k): v for p, k, v in expected}
    groups = [json.loads(v) for _, k, v in got if k.startswith(b"quota_seen|")]
    assert [sorted(group["events"].values()) for group in groups] == [[0, 1, 2, 3, 4, 5]]


def rows(seed: int, count: int) -> list[tuple[int, LedgerRow]]:
    """``records(seed, count)`` as the stream's ledger rows: priced in integers (whole pico-dollar
    rates), in ``Decimal`` (nine decimals, and two thirds of that: rounded zeros among them) or not
    priced (the shared zero), so that window sums meet every exponent a cost has."""
    quotes = [Quote.of(Rates.per_million({"input": Decimal("2.5"), "output": Decimal("10")}), True, **PROVENANCE),
              Quote.of(Rates.per_million({"input": Decimal("0.000123456"), "output": Decimal("0.000000001")})
                       .scaled(Decimal(2) / Decimal(3)), True, **PROVENANCE),
              Quote.of(None, False, **PROVENANCE)]
    made: dict[int, LedgerRow] = {}
    out = []
    for i, (partition, record) in enumerate(records(seed, count)):
        row = made.get(id(record))  # (a copy the producer sent again: the same event)
        if row is None:
            event = UsageEvent(event_id=record.event_id, timestamp=record.event_time, tenant_id=record.tenant_id,
                               user_id=record.user_id, provider=record.provider, model=record.model,
                               usage=record.usage, reservation_id=record.reservation_id)
            row = made[id(record)] = _ROWS.build(event, quotes[i % 7 % 3], record.business_path, NOW)
        out.append((partition, row))
    return out


PROVENANCE = {"matched_model": "m", "price_source": "test", "pricing_version": "v1"}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_size", [7, 50, 400])
def test_rows_summed_in_integers_count_as_their_records_one_by_one(plans, seed, batch_size):
    """The stream's rows through the batch path (window sums in integers: ``fast.sum_window`` and
    ``fast.margin_window``) against their records through ``apply``: every outcome, alert, state and
    changelog value the same, exponents included."""
    placed, offsets = [], {0: 0, 1: 0, 2: 0}
    for partition, row in rows(seed, 600):
        placed.append((partition, offsets[partition], row))
        offsets[partition] += 1
    as_records = {id(row): row.as_model() for _, _, row in placed}
    reference, batched = Run(plans), Run(plans)
    alerts = 0
    for base in range(0, len(placed), batch_size):
        batch = placed[base:base + batch_size]
        expected = reference.one_by_one([(p, o, as_records[id(row)]) for p, o, row in batch])
        got = batched.batched(batch)
        for name in expected:
            assert got[name] == expected[name], (name, base)
        alerts += len(expected["alerts"])
    assert reference.state.data == batched.state.data
    assert alerts > 0


@settings(max_examples=400, deadline=None)
@given(st.decimals(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [Decimal("9223372036854775806"), Decimal("9223372036854775807"), Decimal("-0E-12"), Decimal("1E+999999")]))
def test_a_decimal_is_read_from_the_object_as_its_tuple_says(value):
    """The window sums read a ``Decimal``'s coefficient and exponent from the object itself (CPython's
    C ``decimal`` layout, proved at import): on this interpreter they do, and what they read is what
    ``as_tuple`` gives, for every kind of value they sum or refuse."""
    found, read_from_object = fast.decimal_parts(value)
    assert read_from_object
    if not value.is_finite():
        assert found is None
        return
    sign, digits, exponent = value.as_tuple()
    number = int("".join(map(str, digits)))
    if number >= 2**63 - 1 or not -10**6 < exponent < 10**6:
        assert found is None
    else:
        assert found == ((-number if sign else number), exponent)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([("acme", "small"), ("wide", "wide"), ("free", "unrated")]), st.integers(0, 3),
       st.decimals(allow_nan=False, allow_infinity=False, min_value=-10**9, max_value=10**9)
       | st.sampled_from([Decimal("-0"), Decimal("0E-12"), Decimal("-0E-3"), Decimal("1E+3"), Decimal("0.20"),
                          Decimal("0.30"), Decimal("0.1"), Decimal("60"), Decimal("59.9999"), Decimal("4"),
                          Decimal("12345678901234567890.123456789"), Decimal("1E-41"), Decimal("-1E-40"),
                          Decimal("123456789E-45")]),
       st.booleans(), st.datetimes(timezones=st.sampled_from([UTC, ZoneInfo("UTC"), ZoneInfo("Asia/Tokyo")])),
       st.sampled_from([None, [], ["0-r1"], ["0-r1", 'q"uote']]))
def test_a_state_written_directly_is_the_models_json(plans, tenant_plan, which, usage, judged, as_of, settled):
    """``Counted.state_json`` (``fast.state_json``) against pydantic's JSON of the state, byte for byte:
    usages of every exponent and sign (a negative zero, a positive exponent, more than 64 bits), at,
    below and above each kind of limit's thresholds, margin floors judged or not, times in UTC and in
    other zones, settled reservations or none."""
    tenant, _ = tenant_plan
    limits, _ = plans.for_tenant(tenant)
    limit = limits[which % len(limits)]
    start = datetime(2026, 6, 1, tzinfo=UTC)
    ref = QuotaEngine(plans, QuotaTables({}, {}, {}, {}))._ref(tenant, limit, "*", Bounds.of(limit.window, start, UTC,
                                                                                             timedelta(0)))
    counted = Counted(ref, usage, as_of, judged)
    assert counted.state_json(settled) == counted.state(settled).model_dump_json().encode()


@settings(max_examples=300, deadline=None)
@example(0, "\ue000 0 \ue000", "\ue000 1 \ue000", datetime(1, 1, 2, tzinfo=UTC), timedelta(days=1))  # the stand-ins
@given(st.integers(0, 3), st.text(min_size=1, max_size=12), st.text(max_size=12),
       st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.sampled_from(
           [UTC, ZoneInfo("Europe/Paris"), ZoneInfo("America/St_Johns"), ZoneInfo("Asia/Kolkata")])),
       st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=40)))
def test_state_prefix_is_the_models_json(plans, which, tenant, scope_value, start, length):
    """A window's fixed part of its states, written into its limit's template (``_state_prefix``),
    is what pydantic writes for the window: any text (quotes, control characters, non-ASCII, the
    template's own stand-ins' characters), any time in any zone, with microseconds or without."""
    limits, _ = plans.for_tenant("acme")
    limit = limits[which % len(limits)]
    key = repr((tenant, scope_value, start, length))  # (``fast.state_json`` memoizes a window's part by its key)
    ref = WindowRef(key, tenant, limit, scope_value, start, start + length, "state-key")
    window = QuotaWindow(tenant_id=tenant, limit_id=limit.id, metric=limit.metric, scope=limit.scope,
                         scope_value=scope_value, window_start=start, window_end=start + length)
    head, middle, held = _state_prefix(ref)
    assert head == window.model_dump_json().encode()[:-1] + b',"usage":"'
    assert middle == b'","limit":"' + format(limit.limit, "f").encode() + b'","remaining":"' and held is limit
    assert Counted(ref, Decimal("1.5"), start, True).state_json(None) == \
        Counted(ref, Decimal("1.5"), start, True).state(None).model_dump_json().encode()


def test_a_window_reference_is_made_once_and_its_memo_emptied_at_its_size(plans):
    """``QuotaEngine._ref`` (``fast.window_ref``): the window's key, tenant, limit, scope, bounds and
    state key; the same object while remembered; the memo emptied before it grows past its size."""
    engine = QuotaEngine(plans, QuotaTables({}, {}, {}, {}))
    limits, _ = plans.for_tenant("acme")
    limit = limits[0]
    bounds = Bounds.of(limit.window, datetime(2026, 6, 1, 12, 30, tzinfo=UTC), UTC, timedelta(0))
    ref = engine._ref('te"nant', limit, "*", bounds)
    assert ref == WindowRef(json.dumps(['te"nant', limit.id, "*", bounds.start_text]), 'te"nant', limit, "*",
                            bounds.start, bounds.end, f'te"nant/{limit.id}/*/{bounds.start_text}')
    assert type(ref) is WindowRef and engine._ref('te"nant', limit, "*", bounds) is ref
    engine._refs.update((("filler", i), None) for i in range(_MEMO_SIZE - len(engine._refs)))
    assert engine._ref('te"nant', limit, "*", bounds) is ref  # (found: nothing is dropped)
    again = engine._ref("other", limit, "*", bounds)  # (not found, and the memo full: emptied first)
    assert list(engine._refs.values()) == [again] and again.tenant == "other"
