"""Reservations on plain data: the admission rule, settlement by the stream's state records,
idempotency, leases, and the overspend bound under concurrency."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.quota import QuotaState, limit_key
from streams.enforcement.estimate import Estimator
from streams.enforcement.reservations import Estimate, ReservationBook, ReservationRequest
from streams.stages.plans import Plans, window_bounds
from streams.stages.pricing import Pricer

D = Decimal
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAY = window_bounds("day", NOW, UTC)
PLANS = Plans.model_validate({"default_plan": "p", "plans": {"p": {"limits": [
    {"id": "daily-spend", "metric": "cost_usd", "window": "day", "limit": 1, "thresholds": [100], "hard_cap": 100},
    {"id": "user-tokens", "metric": "tokens", "window": "day", "limit": 5000, "thresholds": [100], "hard_cap": 100,
     "scope": "user"},
    {"id": "soft-requests", "metric": "requests", "window": "day", "limit": 3, "thresholds": [100]},
]}}})
SPEND = (limit_key("acme", "daily-spend", "*"), DAY[0])
TOKENS = (limit_key("acme", "user-tokens", "u1"), DAY[0])


class Stream:
    """The stream's counted usage per window, as the enforcer's book would hold it."""

    def __init__(self) -> None:
        self.usage: dict[tuple[str, datetime], Decimal] = {}
        self.lock = threading.Lock()

    def __call__(self, key: str, start: datetime) -> Decimal:
        with self.lock:
            return self.usage.get((key, start), D(0))

    def count(self, book: ReservationBook, window, amount: Decimal, settled: list[str]) -> None:
        """One batch's state record of one window: its usage applied, then its settled reservations dropped."""
        key, start = window
        with self.lock:
            self.usage[window] = self.usage.get(window, D(0)) + amount
            usage = self.usage[window]
        tenant, limit_id, scope = key.split("/")
        book.settle(QuotaState(tenant_id=tenant, limit_id=limit_id, metric="cost_usd", scope="tenant",
                               scope_value=scope, window_start=start, window_end=DAY[1], usage=usage, limit=D(1),
                               remaining=D(0), status="ok", as_of=NOW, settled=settled))


REQUESTS = (limit_key("acme", "soft-requests", "*"), DAY[0])


def request(key: str, **fields) -> ReservationRequest:
    return ReservationRequest(**{"tenant_id": "acme", "user_id": "u1", "provider": "openai", "model": "gpt-4o",
                                 "idempotency_key": key, **fields})


def cost(amount: str, tokens: int = 100) -> Estimate:
    return Estimate(D(amount), D(tokens), D(1))


def test_a_hold_counts_against_later_requests_until_the_cap_refuses_them():
    stream = Stream()
    book = ReservationBook(PLANS, stream)
    stream.usage[SPEND] = D("0.80")
    first = book.reserve(request("a"), cost("0.15"), NOW)
    second = book.reserve(request("b"), cost("0.06"), NOW)      # 0.80 + 0.15 held + 0.06 > 1.00
    assert first["granted"] and not second["granted"]
    assert {k: second["refused_by"][k] for k in ("limit_id", "counted", "held", "estimate", "remaining")} == {
        "limit_id": "daily-spend", "counted": "0.80", "held": "0.15", "estimate": "0.06", "remaining": "0.05"}
    assert book.reserve(request("c"), cost("0.05"), NOW)["granted"]  # exactly to the cap: allowed


def test_the_stream_settles_each_limits_part_as_it_counts_the_call():
    stream = Stream()
    book = ReservationBook(PLANS, stream)
    hold = book.reserve(request("a"), cost("0.40", tokens=3000), NOW)
    assert {w: a for w, a in book.holds[hold["reservation_id"]].amounts.items() if w in (SPEND, TOKENS)} == {
        SPEND: D("0.40"), TOKENS: D(3000)}
    stream.count(book, SPEND, D("0.35"), [hold["reservation_id"]])     # the cost window's batch
    assert SPEND not in book.holds[hold["reservation_id"]].amounts     # that part dropped as it was counted
    assert TOKENS in book.holds[hold["reservation_id"]].amounts        # the tokens window is still held
    # 2,100 tokens more would pass 5,000 with the 3,000 still held: refused on the user's limit.
    refused = book.reserve(request("b"), cost("0.01", tokens=2100), NOW)
    assert (refused["granted"], refused["refused_by"]["limit_id"]) == (False, "user-tokens")
    stream.count(book, TOKENS, D(2900), [hold["reservation_id"]])
    stream.count(book, REQUESTS, D(1), [hold["reservation_id"]])     # its third window, the soft limit's
    assert book.holds == {} and book.counters.settled == 1
    assert not book.reserve(request("c"), cost("0.01", tokens=2101), NOW)["granted"]   # 2,900 + 2,101 > 5,000
    assert book.reserve(request("d"), cost("0.01", tokens=2100), NOW)["granted"]


def test_the_same_idempotency_key_gets_the_same_reservation_even_after_it_settled():
    stream = Stream()
    book = ReservationBook(PLANS, stream)
    first = book.reserve(request("k"), cost("0.30"), NOW)
    assert book.reserve(request("k"), cost("0.30"), NOW) == first and len(book.holds) == 1
    assert book.release(first["reservation_id"]) and not book.release(first["reservation_id"])
    assert book.reserve(request("k"), cost("0.30"), NOW) == first and book.holds == {}   # no second hold
    assert book.reserve(request("k"), cost("0.30"), NOW + timedelta(minutes=6))["reservation_id"] != \
        first["reservation_id"]   # after its lease, the key is free again


def test_a_lease_that_ends_unsettled_frees_its_budget_and_is_counted():
    book = ReservationBook(PLANS, Stream())
    book.reserve(request("a", lease_s=2), cost("0.90"), NOW)
    assert not book.reserve(request("b"), cost("0.20"), NOW + timedelta(seconds=1))["granted"]
    assert book.expire(NOW + timedelta(seconds=2)) == 1 and book.counters.expired == 1
    assert book.reserve(request("c"), cost("0.20"), NOW + timedelta(seconds=2))["granted"]


def test_a_soft_cap_grants_and_flags_the_call_as_overage():
    book = ReservationBook(PLANS, Stream())
    answers = [book.reserve(request(f"r{i}"), cost("0.01"), NOW) for i in range(4)]
    assert [(a["granted"], a["overage"]) for a in answers] == [(True, False), (True, False), (True, True),
                                                               (True, True)]  # 3 requests reach the soft limit


def test_the_estimate_is_the_worst_input_rate_and_max_tokens_times_n():
    estimator = Estimator(Pricer.from_file(None), max_output_tokens=4096, unknown_usd=D("0.50"))
    # Claude Sonnet 4: input $3/M, 5-minute cache writes $3.75/M, 1-hour $6/M, output $15/M.
    bound = estimator.estimate(ReservationRequest(tenant_id="t", provider="anthropic", model="claude-sonnet-4-20250514",
                                                  input_tokens=10_000, max_tokens=1_000, n=2,
                                                  idempotency_key="k"), NOW)
    # 10,000 x $6/M + 2,000 x $15/M
    assert bound == Estimate(D("0.09"), D(12_000), D(1), input_tokens=D(10_000), output_tokens=D(2_000))
    unknown = estimator.estimate(ReservationRequest(tenant_id="t", provider="acme-ai", model="secret-model",
                                                    idempotency_key="k"), NOW)
    assert unknown == Estimate(D("0.50"), D(4096), D(1), bounded=False, input_tokens=D(0), output_tokens=D(4096))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_concurrent_reservations_never_overspend_a_hard_cap_with_upper_bound_estimates(seed):
    """1,000 reservations from 50 threads against a $1 cap, each call settled by a simulated
    stream batch with an actual cost at most its estimate: counted spend stays ≤ the cap, and
    every refusal was a request that would have crossed it with the holds then live."""
    stream = Stream()
    book = ReservationBook(PLANS, stream)
    rng = random.Random(seed)
    plan = [(f"c{i}", D(rng.randint(1, 40)) / 1000) for i in range(1000)]   # estimates of $0.001-0.040
    pending: list[tuple[str, Decimal]] = []
    lock = threading.Lock()
    refusals = []

    def client(calls):
        for key, estimate in calls:
            answer = book.reserve(request(key, user_id=None), cost(str(estimate), tokens=0), NOW)
            if not answer["granted"]:
                refused = answer["refused_by"]
                refusals.append(D(refused["counted"]) + D(refused["held"]) + D(refused["estimate"]))
                continue
            with lock:
                pending.append((answer["reservation_id"], estimate * D(rng.randint(50, 100)) / 100))

    def stream_batches(stop):
        while not stop.is_set() or pending:
            with lock:
                batch, pending[:] = list(pending), []
            if batch:  # one state record per window the batch counted into, each listing the batch's calls
                ids = [rid for rid, _ in batch]
                stream.count(book, SPEND, sum(actual for _, actual in batch), ids)
                stream.count(book, (limit_key("acme", "user-tokens", "(no user)"), DAY[0]), D(0), ids)
                stream.count(book, REQUESTS, D(len(batch)), ids)

    stop = threading.Event()
    counter = threading.Thread(target=stream_batches, args=(stop,))
    counter.start()
    clients = [threading.Thread(target=client, args=(plan[i::50],)) for i in range(50)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop.set()
    counter.join()
    assert stream(*SPEND) <= D(1)
    assert refusals and all(total > D(1) for total in refusals)
    assert book.holds == {} and book.counters.granted + book.counters.refused == 1000


REVENUE_PLANS = Plans.model_validate({"default_plan": "p", "plans": {"p": {
    "rate_card": {"charges": [
        {"id": "out", "metric": "output_tokens", "per": 1_000_000, "price": "graduated",
         "tiers": [{"up_to": 1, "unit_amount": 20}, {"unit_amount": 30, "flat_amount": 5}]},
        {"id": "markup", "metric": "cost_usd", "price": "unit", "unit_amount": "1.5", "when": {"model": ["gpt-4o*"]}},
        {"id": "support", "metric": "requests", "price": "unit", "unit_amount": 1, "when": {"feature": ["support"]}},
        {"id": "claude", "metric": "requests", "price": "unit", "unit_amount": 100, "when": {"provider": ["anthropic"]}},
    ]},
    "limits": [{"id": "spend-cap", "metric": "revenue_usd", "window": "month", "limit": 50, "thresholds": [100],
                "hard_cap": 100}]}}})


def test_a_revenue_cap_holds_the_most_the_call_can_add_to_the_bill():
    """Output at the dearest tier ($30/M) plus the second tier's $5 flat amount, cost-plus on the
    cost bound, the support feature's fee (the feature is not known before the call: it may match);
    the anthropic-only charge does not apply to an openai call."""
    book = ReservationBook(REVENUE_PLANS, Stream())
    estimate = Estimate(D("0.02"), D(2000), D(1), input_tokens=D(1000), output_tokens=D(1000))
    first = book.reserve(request("a"), estimate, NOW)
    # 1,000 x $30/M + $5 + 1.5 x $0.02 + $1 = $6.06 held against the $50 cap
    assert first["limits"][0]["estimate"] == "6.060000000000"
    answers = [book.reserve(request(f"r{i}"), estimate, NOW)["granted"] for i in range(8)]
    assert answers == [True] * 7 + [False]   # 8 x $6.06 = $48.48; a ninth would pass $50
    held = sum(hold.amounts[next(iter(hold.amounts))] for hold in book.holds.values())
    assert held == D("48.48")


def test_a_grant_the_journal_could_not_keep_is_undone_and_a_retry_decided_again():
    """The journal failing (a full disk) answers 503 "retry it": the retry with the same key must be
    decided on the budget, not told it was granted while nothing is held."""
    failing = [True]

    def journal(reservation_id: str, record: dict | None) -> None:
        if record is not None and failing[0]:
            raise OSError(28, "No space left on device")

    book = ReservationBook(PLANS, Stream(), journal=journal)
    with pytest.raises(OSError):
        book.reserve(request("k"), cost("0.90"), NOW)
    assert book.holds == {} and book.counters.granted == 0 and book.counters.released == 0
    failing[0] = False
    retried = book.reserve(request("k"), cost("0.90"), NOW)
    assert retried["granted"] and len(book.holds) == 1          # held this time
    assert not book.reserve(request("other"), cost("0.90"), NOW)["granted"]   # and it counts: 1.80 > 1.00
