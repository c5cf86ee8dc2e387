"""Quota windows, alerts, state and the enforcer on a real broker with real worker processes."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.quota import QuotaAlert, QuotaState
from schemas.usage import TokenUsage, UsageEvent
from streams.httpjson import get_json
from streams.messaging.partitioning import partition_of
from streams.messaging.producer import UsageProducer
from streams.operations.processes import EnforcerProcess, wait_for
from streams.storage.query import query
from tests.integration.conftest import read_topic

# gpt-4o: 10,000 input tokens × $2.50/M + 1,000 output tokens × $10/M = $0.035 a call.
CALL = TokenUsage(input_tokens=10_000, output_tokens=1_000)
CALL_COST = Decimal("0.035")
PLANS = """
grace_seconds: 300
default_plan: metered
plans:
  metered:
    limits:
      - {id: daily-spend, metric: cost_usd, window: day, limit: 1.00, thresholds: [50, 80, 100], hard_cap: 100}
"""


def use_plans(worker, text=PLANS):
    (worker.settings.config_dir / "plans.yaml").write_text(text)


def call(event_id, tenant, at, usage=CALL):
    return UsageEvent(event_id=event_id, timestamp=at, tenant_id=tenant, provider="openai", model="gpt-4o",
                      usage=usage)


def alerts(worker, kafka_servers, expected, timeout_s=60):
    records = read_topic(kafka_servers, worker.settings.topics.alerts, expected, timeout_s)
    return [QuotaAlert.model_validate_json(m.value()) for m in sorted(records, key=lambda m: m.offset())]


def latest_states(worker, kafka_servers, expected):
    """The last state published for each (tenant, limit, scope, window)."""
    records = read_topic(kafka_servers, worker.settings.topics.state, expected, 60)
    latest = {}
    for m in sorted(records, key=lambda m: (m.partition(), m.offset())):
        if m.value() is None:
            continue  # the tombstone of a window past its grace period (its last state was read before)
        s = QuotaState.model_validate_json(m.value())
        latest[(s.tenant_id, s.limit_id, s.scope_value, s.window_start)] = s
    return latest


def wait_for_window_usage(worker, kafka_servers, tenant, usage, timeout_s=60):
    def reached():
        states = latest_states(worker, kafka_servers, 1)
        return any(s.tenant_id == tenant and s.usage == usage for s in states.values())
    wait_for(reached, timeout_s, f"window usage {usage} for {tenant}", interval_s=0.5)


def first_crossing(costs: list[Decimal], amount: Decimal) -> int:
    total = Decimal(0)
    for i, cost in enumerate(costs):
        total += cost
        if total >= amount:
            return i
    raise AssertionError("never crossed")


@pytest.fixture
def enforcer(worker):
    process = EnforcerProcess({**worker.env, "COSTLINE_ENFORCER_TOKEN": "s3cret"},
                              worker.log_path.parent / "enforcer.log")
    yield process
    process.stop()


def decision(url, tenant, token="s3cret"):
    request = urllib.request.Request(f"{url}/v1/decisions/{tenant}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=2) as resp:
        return json.load(resp)


def test_crossing_50_80_100_percent_gives_three_alerts_in_order_and_the_enforcer_blocks(
        worker, kafka_servers, enforcer):
    use_plans(worker)
    worker.start()
    url = enforcer.start().url
    now = datetime.now(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert decision(url, "acme")["decision"] == "allow"
    with pytest.raises(urllib.error.HTTPError) as refused:
        decision(url, "acme", token="wrong")
    assert refused.value.code == 401

    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for i in range(40):
            producer.send(call(f"acme-{i:02d}", "acme", max(start, now - timedelta(seconds=40 - i))))

    got = alerts(worker, kafka_servers, 3)
    # $0.035 a call: 50% ($0.50) at the 15th call, 80% ($0.80) at the 23rd, 100% ($1.00) at the 29th.
    assert [(a.threshold_percent, a.level, a.usage, a.event_id) for a in got] == [
        (Decimal(50), "warning", Decimal("0.525"), "acme-14"),
        (Decimal(80), "warning", Decimal("0.805"), "acme-22"),
        (Decimal(100), "hard_cap", Decimal("1.015"), "acme-28"),
    ]
    assert len({a.alert_id for a in got}) == 3

    def blocked():
        d = decision(url, "acme")
        return d if d["decision"] == "block" else None

    blocked_decision = wait_for(blocked, 30, "the enforcer to block acme")
    assert blocked_decision["limits"][0]["limit_id"] == "daily-spend"
    wait_for_window_usage(worker, kafka_servers, "acme", 40 * CALL_COST)
    assert decision(url, "acme")["limits"][0]["usage"] == "1.400000000000"
    assert decision(url, "globex")["decision"] == "allow"

    rows = wait_for(lambda: query(worker.settings, "SELECT threshold_percent, level, event_id FROM "
                                                       "quota_alert_history ORDER BY threshold_percent").rows
                      if query(worker.settings, "SELECT count() FROM quota_alert_history").rows[0][0] == 3
                      else None, 60, "3 alerts in ClickHouse")
    assert rows == [[Decimal(50), "warning", "acme-14"], [Decimal(80), "warning", "acme-22"],
                    [Decimal(100), "hard_cap", "acme-28"]]


def test_worker_restart_mid_window_neither_repeats_alerts_nor_loses_counts(worker, kafka_servers):
    use_plans(worker)
    worker.start()
    at = datetime.now(UTC) - timedelta(minutes=1)
    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for i in range(20):  # crosses 50% ($0.70 after 20 calls)
            producer.send(call(f"r-{i:02d}", "restart-co", at))
    wait_for_window_usage(worker, kafka_servers, "restart-co", 20 * CALL_COST)
    assert worker.stop() == 0

    worker.start()
    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for i in range(20, 40):
            producer.send(call(f"r-{i:02d}", "restart-co", at))
    wait_for_window_usage(worker, kafka_servers, "restart-co", 40 * CALL_COST)

    got = alerts(worker, kafka_servers, 3)
    assert [(a.threshold_percent, a.event_id) for a in got] == [
        (Decimal(50), "r-14"), (Decimal(80), "r-22"), (Decimal(100), "r-28")]


def test_late_and_out_of_order_events_inside_the_grace_period_land_in_their_own_window(worker, kafka_servers):
    use_plans(worker)
    worker.start()
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    day1, day2 = midnight - timedelta(days=1), midnight
    sequence = [  # (event id, event time, tokens) in the order they are produced; grace is 5 minutes
        ("a", midnight - timedelta(minutes=2), 1_000),   # day 1
        ("b", midnight + timedelta(minutes=2), 2_000),   # day 2: the watermark moves to 00:02
        ("c", midnight - timedelta(minutes=1), 4_000),   # day 1, late but inside the grace period
        ("d", midnight + timedelta(minutes=7), 8_000),   # day 2: the watermark passes day 1's grace
        ("e", midnight - timedelta(seconds=30), 16_000),  # day 1, too late: ledger only, flagged
    ]
    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for event_id, at, tokens in sequence:
            producer.send(call(event_id, "late-co", at, TokenUsage(input_tokens=tokens)))

    def settled():
        return query(worker.settings, "SELECT count() FROM usage WHERE tenant_id = 'late-co'").rows[0][0] == 5
    wait_for(settled, 60, "5 rows")
    wait_for_window_usage(worker, kafka_servers, "late-co", Decimal("0.025"))
    windows = {k[3]: s.usage for k, s in latest_states(worker, kafka_servers, 2).items() if k[0] == "late-co"}
    # $2.50 per million input tokens: day 1 = a + c = 5,000 tokens, day 2 = b + d = 10,000 tokens.
    assert windows == {day1: Decimal("0.0125"), day2: Decimal("0.025")}
    flags = query(worker.settings, "SELECT event_id, late FROM usage WHERE tenant_id = 'late-co' "
                                     "ORDER BY event_id").rows
    assert flags == [["a", False], ["b", False], ["c", False], ["d", False], ["e", True]]


def test_two_tenants_on_different_partitions_never_affect_each_other(worker, kafka_servers):
    use_plans(worker)
    partitions = worker.settings.partitions
    names = [f"tenant-{i}" for i in range(50)]
    heavy = names[0]
    light = next(n for n in names if partition_of(n.encode(), partitions) != partition_of(heavy.encode(), partitions))
    worker.start()
    at = datetime.now(UTC) - timedelta(minutes=1)
    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for i in range(35):
            producer.send(call(f"h-{i}", heavy, at))
            if i % 7 == 0:
                producer.send(call(f"l-{i}", light, at))
    wait_for_window_usage(worker, kafka_servers, heavy, 35 * CALL_COST)
    wait_for_window_usage(worker, kafka_servers, light, 5 * CALL_COST)
    got = alerts(worker, kafka_servers, 3)
    assert {a.tenant_id for a in got} == {heavy} and len(got) == 3


def test_hundreds_of_concurrent_producers_sum_exactly_and_the_hard_cap_fires_on_the_crossing_event(
        worker, kafka_servers):
    use_plans(worker, PLANS.replace("limit: 1.00", "limit: 50.00"))
    worker.start()
    at = datetime.now(UTC) - timedelta(minutes=1)
    producers, per_producer = 200, 10
    costs: dict[str, Decimal] = {}
    errors = []

    def produce(n: int) -> None:
        try:
            with UsageProducer(kafka_servers, worker.settings.topics.raw, config={"linger.ms": 0}) as producer:
                for j in range(per_producer):
                    tokens = 1_000 * (1 + (n * per_producer + j) % 97)  # varied sizes
                    event_id = f"c-{n:03d}-{j}"
                    costs[event_id] = Decimal(tokens) * Decimal("2.5") / 1_000_000
                    producer.send(call(event_id, "crowd", at, TokenUsage(input_tokens=tokens)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(costs) == producers * per_producer
    total = sum(costs.values(), Decimal(0))
    wait_for_window_usage(worker, kafka_servers, "crowd", total, timeout_s=120)

    # The order the worker saw: the tenant's partition of usage.raw, in offset order.
    raw = read_topic(kafka_servers, worker.settings.topics.raw, len(costs), 60)
    in_order = [json.loads(m.value())["event_id"] for m in sorted(raw, key=lambda m: m.offset())
                if m.key() == b"crowd"]
    assert len(in_order) == len(costs) and len({m.partition() for m in raw if m.key() == b"crowd"}) == 1
    crossing = in_order[first_crossing([costs[e] for e in in_order], Decimal(50))]
    hard = [a for a in alerts(worker, kafka_servers, 3) if a.level == "hard_cap"]
    assert [a.event_id for a in hard] == [crossing]
    by_level = defaultdict(int)
    for a in alerts(worker, kafka_servers, 3):
        by_level[a.level] += 1
    assert dict(by_level) == {"warning": 2, "hard_cap": 1}


RATED_PLANS = """
default_plan: rated
plans:
  rated:
    limits:
      - {id: monthly-bill, metric: revenue_usd, window: month, limit: 1.00, thresholds: [100], hard_cap: 100}
      - {id: margin-floor, metric: margin_percent, window: month, limit: 50, min_revenue: 0.50}
    rate_card:
      charges:
        - {id: calls, metric: requests, price: unit, unit_amount: 0.05}
"""


def test_a_spend_cap_on_revenue_blocks_through_the_enforcer_and_a_margin_floor_alerts_once(
        worker, kafka_servers, enforcer):
    use_plans(worker, RATED_PLANS)
    worker.start()
    url = enforcer.start().url
    now = datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for i in range(30):
            producer.send(call(f"rated-{i:02d}", "rated-co", max(month, now - timedelta(seconds=30 - i))))

    got = alerts(worker, kafka_servers, 2)
    # Each call earns $0.05 and costs $0.035, a 30% margin: below the 50% floor as soon as the
    # month's revenue reaches $0.50 (the 10th call); the bill reaches the $1.00 cap at the 20th.
    assert [(a.limit_id, a.level, a.usage, a.event_id) for a in got] == [
        ("margin-floor", "soft_cap", Decimal("30.0000"), "rated-09"),
        ("monthly-bill", "hard_cap", Decimal("1.00"), "rated-19"),
    ]
    blocked = wait_for(lambda: (d := decision(url, "rated-co"))["decision"] == "block" and d, 30,
                       "the enforcer to block on the bill")
    assert {limit["limit_id"]: limit["status"] for limit in blocked["limits"]}["monthly-bill"] == "hard_cap"

    def ledger():
        rows = query(worker.settings, "SELECT count(), sum(revenue_usd), sum(margin_usd) FROM usage "
                                      "WHERE tenant_id = 'rated-co'").rows
        return rows[0] if rows[0][0] == 30 else None

    assert wait_for(ledger, 60, "30 rated calls in the ledger") == [30, Decimal("1.5"), Decimal("1.5") - 30 * CALL_COST]


def test_fifty_threads_admitted_through_reservations_never_pass_the_hard_cap(worker, kafka_servers, enforcer):
    """The race of deciding on state that trails the stream: 50 threads, each reserving before
    its call and publishing the call (with its reservation id) when granted, against a $1.00 hard
    cap with $0.10 calls. Without reservations about 20 times the cap got through."""
    from concurrent.futures import ThreadPoolExecutor

    from streams.enforcement.client import EnforcerClient

    use_plans(worker, PLANS.replace("limit: 1.00, thresholds: [50, 80, 100]", "limit: 1.00, thresholds: [100]"))
    worker.start()
    url = enforcer.start().url
    client = EnforcerClient(url, token="s3cret", timeout_s=10)
    tenant, tenth = "racing-co", TokenUsage(input_tokens=40_000)  # gpt-4o: 40,000 x $2.50/M = $0.10
    granted = []

    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        def call_once(i: int) -> None:
            answer = client.reserve(tenant, "openai", "gpt-4o", f"race-{i}", input_tokens=40_000, max_tokens=1)
            if answer["granted"]:
                granted.append(answer["reservation_id"])
                event = call(f"race-{i}", tenant, datetime.now(UTC), usage=tenth)
                producer.send(event.model_copy(update={"reservation_id": answer["reservation_id"]}))
                producer.flush()

        with ThreadPoolExecutor(50) as pool:
            list(pool.map(call_once, range(500)))

    # Each hold is $0.10001 (40,000 input tokens and 1 output token at the dearest rates): 9 fit.
    assert len(granted) == 9
    def landed():
        rows = query(worker.settings, f"SELECT count(), sum(cost_usd) FROM usage WHERE tenant_id = '{tenant}'").rows
        return rows[0] if rows[0][0] == len(granted) else None
    count, spent = wait_for(landed, 60, "the granted calls in the ledger")
    assert spent == Decimal("0.90") <= Decimal("1.00")   # overshoot 0
    # Once the stream has counted them, the holds are gone and the counted usage refuses the 10th.
    wait_for(lambda: get_json(f"{url}/v1/health")["reservations"]["live"] == 0, 30, "every hold to settle")
    assert get_json(f"{url}/v1/health")["reservations"]["settled"] == 9
    assert not client.reserve(tenant, "openai", "gpt-4o", "race-again", input_tokens=40_000, max_tokens=1)["granted"]
    assert client.reserve(tenant, "openai", "gpt-4o", "small", input_tokens=1_000, max_tokens=1)["granted"]


def test_reservations_survive_a_kill_9_of_the_enforcer_and_settle_after_it(worker, kafka_servers, enforcer):
    import signal

    from streams.enforcement.client import EnforcerClient

    use_plans(worker, PLANS.replace("limit: 1.00, thresholds: [50, 80, 100]", "limit: 1.00, thresholds: [100]"))
    worker.start()
    client = EnforcerClient(enforcer.start().url, token="s3cret", timeout_s=10)
    tenant = "restart-co"

    def reserve(key: str, tokens: int = 60_000, **options) -> dict:  # gpt-4o: 60,000 input tokens = $0.15
        return client.reserve(tenant, "openai", "gpt-4o", key, input_tokens=tokens, max_tokens=1, **options)

    held = [reserve(f"held-{i}") for i in range(5)]                  # $0.75 held, nothing counted yet
    short = reserve("short-lease", tokens=20_000, lease_s=1)          # $0.05, ends before the restart is over
    assert all(answer["granted"] for answer in [*held, short])
    assert enforcer.stop(signal.SIGKILL) == -signal.SIGKILL
    enforcer.start()
    # The five are held again; the short lease ends (dropped at restore, or by the next second's expiry).
    wait_for(lambda: get_json(f"{enforcer.url}/v1/health")["reservations"]["live"] == 5, 10, "the five holds alone")
    assert reserve("sixth")["granted"] and not reserve("seventh")["granted"]   # 0.90 held, then 1.05 > 1.00
    assert reserve("held-0") == held[0]                               # a retried request: the same reservation

    # The calls are made: the stream counts them, and each hold is settled by the state that counts it.
    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        for i, answer in enumerate(held):
            event = call(f"held-{i}", tenant, datetime.now(UTC), usage=TokenUsage(input_tokens=60_000))
            producer.send(event.model_copy(update={"reservation_id": answer["reservation_id"]}))
    wait_for(lambda: get_json(f"{enforcer.url}/v1/health")["reservations"]["live"] == 1, 30, "five holds settled")
    assert not reserve("eighth")["granted"]                           # 0.75 counted + 0.15 held + 0.15 > 1.00
    assert client.release(reserve("sixth")["reservation_id"])
    assert reserve("ninth")["granted"]                                # 0.75 counted + 0.15


def test_the_race_through_the_middleware_overshoots_by_nothing(worker, kafka_servers, enforcer):
    """The scenario of 50 threads against a $1.00 hard cap with $0.10 calls, made through
    ``MeteredChat`` with the real openai SDK (a local server answering for the provider): the
    middleware reserves, calls, publishes, and the stream settles."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from streams.enforcement.client import EnforcerClient
    from streams.middleware.meter import Meter, Refused
    from streams.middleware.openai_sdk import MeteredChat
    from tests.middleware.fake_providers import FakeOpenAI

    use_plans(worker, PLANS.replace("limit: 1.00, thresholds: [50, 80, 100]", "limit: 1.00, thresholds: [100]"))
    worker.start()
    url = enforcer.start().url
    tenant, prompt = "metered-co", "a" * 40_000     # 40,000 bytes: at most 40,000 tokens
    refused = []
    with FakeOpenAI() as provider, UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        provider.usage_for = lambda body: {"prompt_tokens": 40_000, "completion_tokens": 1, "total_tokens": 40_001}
        meter = Meter(EnforcerClient(url, token="s3cret", timeout_s=10), producer)
        chat = MeteredChat(openai.OpenAI(base_url=provider.url, api_key="test", max_retries=0), meter, tenant=tenant)

        def call_once(_: int) -> None:
            try:
                chat.create(model="gpt-4o", messages=[{"role": "user", "content": prompt}], max_completion_tokens=1)
            except Refused as exc:
                refused.append(exc.answer)

        with ThreadPoolExecutor(50) as pool:
            list(pool.map(call_once, range(500)))
        made = len(provider.requests)
    # $0.10001 a call (40,000 input tokens, 1 output); each hold a little more (the prompt's
    # 40,000-odd bytes bound its tokens): 9 calls fit under $1.00, and only 9 reach the provider.
    assert (made, len(refused)) == (9, 491)
    assert {answer["refused_by"]["limit_id"] for answer in refused} == {"daily-spend"}

    def landed():
        rows = query(worker.settings, f"SELECT count(), sum(cost_usd) FROM usage WHERE tenant_id = '{tenant}'").rows
        return rows[0] if rows[0][0] == made else None

    assert wait_for(landed, 60, "the calls in the ledger") == [9, Decimal("0.90009")]   # overshoot 0
    wait_for(lambda: get_json(f"{url}/v1/health")["reservations"]["live"] == 0, 30, "every hold to settle")


def test_a_thousand_reservations_from_fifty_clients_keep_the_cap_through_a_kill_9(worker, kafka_servers, enforcer):
    """1,000 reservations from 50 threads against a $2.00 hard cap; each granted call is made at a
    random actual cost within its hold and published with its reservation id. Half-way through,
    the enforcer is killed (-9) and restarted; clients retry with the same idempotency key. The
    counted spend stays under the cap, each refusal says counted + held + estimate passed it,
    re-sent events change nothing, and once the leases are over nothing stays held."""
    import random
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from streams.enforcement.client import EnforcerClient, EnforcerUnavailable

    use_plans(worker, PLANS.replace("limit: 1.00, thresholds: [50, 80, 100]", "limit: 2.00, thresholds: [100]"))
    worker.start()
    url = enforcer.start().url
    client = EnforcerClient(url, token="s3cret", timeout_s=10)
    tenant, cap = "thousand-co", Decimal("2.00")
    lock, asked = threading.Lock(), [0]
    granted, refused, events = [], [], []
    restarted = threading.Event()

    def reserve(key: str, input_tokens: int, max_tokens: int = 100) -> dict:
        deadline = time.monotonic() + 120
        while True:  # the enforcer is down or restoring for a moment: the same key again
            try:
                return client.reserve(tenant, "openai", "gpt-4o", key, input_tokens=input_tokens,
                                      max_tokens=max_tokens, lease_s=5)
            except EnforcerUnavailable:
                if time.monotonic() > deadline:
                    raise
                restarted.wait(0.05)

    def kill_and_restart() -> None:
        assert enforcer.stop(signal.SIGKILL) == -signal.SIGKILL
        enforcer.start()
        restarted.set()

    with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
        def call_once(i: int) -> None:
            rng = random.Random(i)
            bound = 10_000 + (i % 7) * 5_000           # input tokens: a $0.025 to $0.10 hold (+100 output)
            answer = reserve(f"k-{i}", bound)
            with lock:
                asked[0] += 1
                if asked[0] == 500:
                    threading.Thread(target=kill_and_restart).start()
                (granted if answer["granted"] else refused).append(answer)
            if answer["granted"]:
                usage = TokenUsage(input_tokens=rng.randint(1, bound), output_tokens=rng.randint(0, 100))
                event = call(f"k-{i}", tenant, datetime.now(UTC), usage=usage).model_copy(
                    update={"reservation_id": answer["reservation_id"]})
                producer.send(event)
                with lock:
                    events.append(event)

        with ThreadPoolExecutor(50) as pool:
            list(pool.map(call_once, range(1000)))
        assert restarted.wait(120), "the enforcer was killed and restarted during the run"
        producer.flush()
        # Each event sent again: the stream counts a call once, and its reservation is settled already.
        for event in events[:20]:
            producer.send(event)

    assert len(granted) + len(refused) == 1000 and len({a["reservation_id"] for a in granted}) == len(granted)
    for answer in refused:   # every refusal: what was counted and held, plus this call, passed the cap
        view = answer["refused_by"]
        assert Decimal(view["counted"]) + Decimal(view["held"]) + Decimal(view["estimate"]) > Decimal(view["hard_cap"])
    # gpt-4o: $2.50 per million input tokens, $10 per million output tokens, exactly.
    spent = sum((Decimal(e.usage.input_tokens) * Decimal("2.5") + Decimal(e.usage.output_tokens) * 10) / 1_000_000
                for e in events)

    def landed():
        rows = query(worker.settings, f"SELECT count(), sum(cost_usd) FROM usage WHERE tenant_id = '{tenant}'").rows
        return rows[0] if rows[0][0] >= len(events) else None

    assert wait_for(landed, 90, "the calls in the ledger") == [len(events), spent]
    assert spent <= cap
    wait_for(lambda: get_json(f"{url}/v1/health")["reservations"]["live"] == 0, 30, "no hold left once leases end")
    # Nothing stays pinned: a call a token over what is left is refused on the counted usage
    # alone, and one a token under it is granted. (A hold: input x $2.50/M + 1 output token x $10/M.)
    over = int((cap - spent - Decimal("0.00001")) / Decimal("0.0000025")) + 1
    refused_after = reserve("over", over, max_tokens=1)
    assert (Decimal(refused_after["refused_by"]["counted"]), refused_after["refused_by"]["held"]) == (spent, "0")
    assert reserve("under", over - 1, max_tokens=1)["granted"]


def test_two_enforcers_share_the_tenants_each_restores_its_own_holds_and_the_stream_settles_both(
        worker, kafka_servers):
    """Two ``costline enforcer`` processes with one layout; a client that knows only the first.
    Each tenant's holds live on its owner; the second is killed (-9) and restores its own holds
    alone (the journal topic has both's); the stream settles the holds on each."""
    import signal

    from streams.enforcement.client import EnforcerClient
    from streams.enforcement.layout import EnforcerLayout
    from streams.operations.processes import free_port

    use_plans(worker, PLANS.replace("limit: 1.00, thresholds: [50, 80, 100]", "limit: 1.00, thresholds: [100]"))
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    enforcers = [EnforcerProcess({**worker.env, "COSTLINE_ENFORCER_PORT": url.rsplit(":", 1)[1],
                                  "COSTLINE_ENFORCER_URL": url, "COSTLINE_ENFORCER_PEERS": ",".join(urls)},
                                 worker.log_path.parent / f"enforcer-{i}.log") for i, url in enumerate(urls)]
    worker.start()
    try:
        for enforcer in enforcers:
            enforcer.start()
        layout = EnforcerLayout.from_settings(enforcers[0].settings)
        names = [f"shared-{i}" for i in range(50)]
        tenants = [next(n for n in names if layout.owner_of(n) == url) for url in urls]  # one owned by each
        client = EnforcerClient(urls[0], timeout_s=10)
        holds = {t: [client.reserve(t, "openai", "gpt-4o", f"{t}-{i}", input_tokens=60_000, max_tokens=1)
                     for i in range(3)] for t in tenants}              # $0.15 each, $0.45 held per tenant

        def live(i: int) -> int:
            return get_json(f"{urls[i]}/v1/health")["reservations"]["live"]

        assert all(a["granted"] for answers in holds.values() for a in answers) and live(0) == live(1) == 3
        assert enforcers[1].stop(signal.SIGKILL) == -signal.SIGKILL
        enforcers[1].start()
        assert live(1) == 3                                               # its own three, not the other's
        # The restored holds still count: $0.45 held + $0.60 > $1.00.
        assert not client.reserve(tenants[1], "openai", "gpt-4o", "big", input_tokens=240_000, max_tokens=1)["granted"]
        with UsageProducer(kafka_servers, worker.settings.topics.raw) as producer:
            for tenant, answers in holds.items():
                for i, answer in enumerate(answers):
                    event = call(f"{tenant}-{i}", tenant, datetime.now(UTC), usage=TokenUsage(input_tokens=60_000))
                    producer.send(event.model_copy(update={"reservation_id": answer["reservation_id"]}))
        wait_for(lambda: live(0) == live(1) == 0, 30, "the stream to settle the holds on both enforcers")
        # Counted now, not held: $0.45 counted + a $0.55 hold reaches the cap exactly, and fits.
        fits = client.reserve(tenants[1], "openai", "gpt-4o", "fits", input_tokens=219_996, max_tokens=1)
        assert fits["granted"] and Decimal(fits["limits"][0]["counted"]) == Decimal("0.45") and fits["limits"][0]["held"] == "0"
    finally:
        for enforcer in enforcers:
            enforcer.stop()
