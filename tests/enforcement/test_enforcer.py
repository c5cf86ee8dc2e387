"""Decisions from quota state and alerts, without Kafka."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from schemas.quota import QuotaAlert, QuotaState, alert_id
from streams.enforcement.enforcer import DecisionBook

START = datetime(2026, 6, 1, tzinfo=UTC)
END = START + timedelta(days=1)
NOW = START + timedelta(hours=12)


def state(usage, status, limit_id="daily-spend", scope="tenant", scope_value="*", start=START, tenant="acme"):
    return QuotaState(tenant_id=tenant, limit_id=limit_id, metric="cost_usd", scope=scope, scope_value=scope_value,
                      window_start=start, window_end=start + timedelta(days=1), usage=Decimal(usage),
                      limit=Decimal(10), remaining=max(Decimal(10) - Decimal(usage), Decimal(0)), status=status,
                      as_of=start + timedelta(hours=1))


def alert(usage, level, threshold, tenant="acme"):
    return QuotaAlert(alert_id=alert_id(tenant, "daily-spend", "*", START, Decimal(threshold)), tenant_id=tenant,
                      limit_id="daily-spend", metric="cost_usd", scope="tenant", scope_value="*", window_start=START,
                      window_end=END, threshold_percent=Decimal(threshold), level=level, usage=Decimal(usage),
                      limit=Decimal(10), crossed_at=START + timedelta(hours=2), event_id="e")


def test_no_state_allows():
    assert DecisionBook().decide("acme", now=NOW).decision == "allow"


def test_status_maps_to_decision_and_remaining_is_reported():
    book = DecisionBook()
    book.apply_state(state("4", "ok"))
    assert book.decide("acme", now=NOW).decision == "allow"
    book.apply_state(state("8.5", "warning"))
    decision = book.decide("acme", now=NOW)
    assert decision.decision == "warn"
    assert [(lim["limit_id"], lim["usage"], lim["remaining"]) for lim in decision.limits] == [
        ("daily-spend", "8.5", "1.5")]
    book.apply_state(state("15", "hard_cap"))
    assert book.decide("acme", now=NOW).decision == "block"


def test_an_alert_blocks_before_the_next_state_arrives_and_older_states_do_not_undo_it():
    book = DecisionBook()
    book.apply_state(state("9", "warning"))
    book.apply_alert(alert("10.2", "hard_cap", 100))
    assert book.decide("acme", now=NOW).decision == "block"
    book.apply_state(state("9.5", "warning"))      # a state flushed before the alert, arriving late
    assert book.decide("acme", now=NOW).decision == "block"
    book.apply_alert(alert("10.2", "hard_cap", 100))  # re-delivered alert: no effect
    assert book.decide("acme", now=NOW).limits[0]["usage"] == "10.2"


def test_a_closed_window_no_longer_counts_and_a_new_window_replaces_it():
    book = DecisionBook()
    book.apply_state(state("20", "hard_cap"))
    assert book.decide("acme", now=END + timedelta(seconds=1)).decision == "allow"
    book.apply_state(state("1", "ok", start=END))
    assert book.decide("acme", now=END + timedelta(hours=1)).limits[0]["usage"] == "1"


def test_scoped_limits_count_when_the_question_names_the_scope():
    book = DecisionBook()
    book.apply_state(state("12", "hard_cap", limit_id="user-daily", scope="user", scope_value="ann"))
    assert book.decide("acme", now=NOW).decision == "allow"
    assert book.decide("acme", user="bob", now=NOW).decision == "allow"
    assert book.decide("acme", user="ann", now=NOW).decision == "block"


def test_tenants_are_independent():
    book = DecisionBook()
    book.apply_state(state("20", "hard_cap", tenant="acme"))
    assert book.decide("globex", now=NOW).decision == "allow"


def test_the_window_open_now_decides_not_a_newer_one_opened_by_an_event_stamped_ahead():
    book = DecisionBook()
    book.apply_state(state("12", "hard_cap"))                          # today's window, capped
    book.apply_state(state("0.5", "ok", start=START + timedelta(days=1)))  # tomorrow's, from a skewed clock
    assert book.decide("acme", now=NOW).decision == "block"
    assert book.decide("acme", now=END + timedelta(hours=1)).decision == "allow"  # tomorrow, its own window


def test_after_compaction_a_fresh_enforcer_decides_as_a_running_one():
    published = [state("12", "hard_cap"),                               # today's window, capped
                 state("3", "ok", start=START - timedelta(days=1))]    # then a late event's state for yesterday
    running = DecisionBook()
    for s in published:
        running.apply_state(s)
    compacted = {s.key: s for s in published}                           # what a compacted topic keeps
    assert len(compacted) == 2                                          # one record per window, not per limit
    fresh = DecisionBook()
    for s in compacted.values():
        fresh.apply_state(s)
    assert fresh.decide("acme", now=NOW).decision == running.decide("acme", now=NOW).decision == "block"
