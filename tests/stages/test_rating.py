"""Rating by hand-computed examples, each naming the trap it guards, and by properties."""

from __future__ import annotations

from decimal import Decimal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.config import ConfigError, load_model
from streams.stages.rating import (
    Charge,
    RateCard,
    increment,
    increment_bound,
    net,
    rate,
    round_line,
    segment_of,
    volume_true_up,
)

D = Decimal
TIERS = [{"up_to": 1000, "unit_amount": "0.10"}, {"up_to": 5000, "unit_amount": "0.08"}, {"unit_amount": "0.05"}]


def charge(**fields) -> Charge:
    return Charge.model_validate({"id": "calls", "metric": "requests", **fields})


def amounts(card: RateCard, quantity) -> list[tuple[str, Decimal]]:
    return [(line.id, line.amount) for line in rate(card, {"calls": D(quantity)}).lines]


def card(**fields) -> RateCard:
    return RateCard.model_validate({"charges": [{"id": "calls", "metric": "requests", **fields.pop("charge")}],
                                    **fields})


def test_a_unit_price_per_million_tokens_on_a_decimal_quantity():
    tokens = card(charge={"metric": "input_tokens", "per": 1_000_000, "price": "unit", "unit_amount": "2.00"})
    assert amounts(tokens, 1_500_000) == [("calls:unit", D("3.00"))]
    [line] = rate(tokens, {"calls": D(2_500_001)}).lines
    assert (line.quantity, line.unrounded, line.amount) == (D("2.500001"), D("5.000002"), D("5.00"))


def test_a_quantity_exactly_on_a_tier_bound_is_in_the_lower_tier():
    graduated = card(charge={"price": "graduated", "tiers": TIERS})
    assert amounts(graduated, 1000) == [("calls:tier-1", D("100.00"))]                     # not 0.08 for the 1,000th
    assert amounts(graduated, 1001) == [("calls:tier-1", D("100.00")), ("calls:tier-2", D("0.08"))]


def test_free_units_keep_their_places_in_the_tiers_and_may_span_two():
    graduated = card(charge={"price": "graduated", "tiers": TIERS, "free_units": 1500})
    # (0, 1000] and (1000, 1500] are free: 500 units of tier 2 are billed, none of tier 1.
    assert amounts(graduated, 2000) == [("calls:tier-2", D("40.00"))]
    assert amounts(graduated, 1400) == []


def test_a_tiers_flat_amount_comes_with_its_first_billed_unit():
    tiers = [TIERS[0], {**TIERS[1], "flat_amount": "5"}, TIERS[2]]
    graduated = card(charge={"price": "graduated", "tiers": tiers})
    assert amounts(graduated, 1000) == [("calls:tier-1", D("100.00"))]
    assert amounts(graduated, D("1000.5")) == [("calls:tier-1", D("100.00")), ("calls:tier-2", D("5.04"))]


def test_a_volume_tier_jump_bills_every_unit_at_the_new_tiers_price():
    volume = card(charge={"price": "volume", "tiers": TIERS})
    assert amounts(volume, 5000) == [("calls:tier-2", D("400.00"))]
    assert amounts(volume, 5001) == [("calls:tier-3", D("250.05"))]  # the bill drops: every unit at 0.05


def test_packages_are_whole_after_the_free_units():
    packages = card(charge={"price": "package", "package_size": 100, "package_amount": "1.50", "free_units": 50})
    assert amounts(packages, 251) == [("calls:package", D("4.50"))]  # 201 billed: 3 packages
    assert amounts(packages, 150) == [("calls:package", D("1.50"))]
    assert amounts(packages, 50) == []


def test_the_discount_comes_before_the_cap_then_the_fee_then_the_commitment_true_up():
    priced = card(charge={"price": "graduated", "tiers": TIERS, "discount_percent": 10}, spend_cap=50,
                  flat_fee=20, minimum_commitment=100)
    rating = rate(priced, {"calls": D(1001)})
    assert [(line.kind, line.amount) for line in rating.lines] == [
        ("usage", D("100.00")), ("usage", D("0.08")),
        ("discount", D("-10.01")),      # 10% of 100.08 = 10.008, rounded away from zero once
        ("spend_cap", D("-40.07")),     # usage 90.07 capped at 50
        ("flat_fee", D("20.00")),
        ("commitment", D("30.00")),     # 70 up to the commitment of 100
    ]
    assert rating.total == D("100.00") == sum(line.amount for line in rating.lines)


def test_each_line_is_rounded_once_half_away_from_zero():
    assert [round_line(D(v)) for v in ("0.005", "0.0049999", "-0.005", "1.234999999999")] == [
        D("0.01"), D("0.00"), D("-0.01"), D("1.23")]


def test_rating_again_gives_the_same_line_ids():
    priced = card(charge={"price": "graduated", "tiers": TIERS, "discount_percent": 5}, flat_fee=9)
    assert rate(priced, {"calls": D(6000)}) == rate(priced, {"calls": D(6000)})
    assert [line.id for line in rate(priced, {"calls": D(6000)}).lines] == [
        "calls:tier-1", "calls:tier-2", "calls:tier-3", "calls:discount", "flat_fee"]


@pytest.mark.parametrize(("entry", "message"), [
    ({"price": "graduated", "tiers": [{"up_to": 10, "unit_amount": 1}, {"up_to": 5, "unit_amount": 1}, {}]},
     "tiers overlap or are out of order: up_to 10, 5 must strictly ascend"),
    ({"price": "graduated", "tiers": [{"up_to": 10}, {"up_to": 10}, {}]}, "tiers overlap or are out of order"),
    ({"price": "graduated", "tiers": [{"unit_amount": 1}, {"up_to": 10}]}, "every tier but the last needs up_to"),
    ({"price": "volume", "tiers": [{"up_to": 10, "unit_amount": 1}]}, "the last has none"),
    ({"price": "unit"}, "a unit price needs unit_amount"),
    ({"price": "package", "package_size": 10}, "needs package_size and package_amount"),
    ({"price": "unit", "unit_amount": -1}, "greater than or equal to 0"),
])
def test_a_bad_rate_card_is_one_line_naming_the_entry(tmp_path, entry, message):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump({"charges": [{"id": "calls", "metric": "requests", **entry}]},
                                   default_flow_style=True))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as raised:
        load_model(path, RateCard)
    assert str(raised.value).startswith(f"{path}: charges.0") and "\n" not in str(raised.value)


amounts_st = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
charges_st = st.one_of(
    st.builds(lambda a, f: charge(price="unit", unit_amount=a, free_units=f), amounts_st, amounts_st),
    st.builds(lambda a, s, f: charge(price="package", package_amount=a, package_size=s, free_units=f),
              amounts_st, st.decimals(min_value="0.5", max_value=100, places=2), amounts_st),
    st.builds(lambda bounds, prices, flats, f: charge(price="graduated", free_units=f, tiers=[
        *({"up_to": b, "unit_amount": p, "flat_amount": fl} for b, p, fl in zip(sorted(set(bounds)), prices, flats)),
        {"unit_amount": prices[-1]}]),
        st.lists(st.decimals(min_value=1, max_value=5000, places=2), min_size=1, max_size=4),
        st.lists(amounts_st, min_size=5, max_size=5), st.lists(amounts_st, min_size=5, max_size=5), amounts_st),
)


@settings(max_examples=300, deadline=None)
@given(charges_st, st.lists(st.decimals(min_value=0, max_value=800, places=3), min_size=1, max_size=30))
def test_per_event_increments_add_up_to_the_rating_of_the_period_in_any_split(priced, quantities):
    total, streamed = Decimal(0), Decimal(0)
    for quantity in quantities:  # one event each, in this order
        streamed += increment(priced, total, total + quantity)
        total += quantity
    rated = sum((line.unrounded for line in rate(RateCard(charges=[priced]), {"calls": total}).lines), Decimal(0))
    assert streamed == rated
    backwards, running = Decimal(0), Decimal(0)
    for quantity in reversed(quantities):
        backwards += increment(priced, running, running + quantity)
        running += quantity
    assert backwards == rated


@settings(max_examples=200, deadline=None)
@given(st.lists(st.decimals(min_value=0, max_value=3000, places=1), min_size=1, max_size=20), amounts_st)
def test_a_volume_charge_is_settled_by_its_true_up_line(quantities, free):
    volume = charge(price="volume", tiers=TIERS, free_units=free)
    total, streamed = Decimal(0), Decimal(0)
    for quantity in quantities:
        streamed += increment(volume, total, total + quantity)
        total += quantity
    rated = sum((line.unrounded for line in rate(RateCard(charges=[volume]), {"calls": total}).lines), Decimal(0))
    assert streamed + volume_true_up(volume, total, streamed) == rated


volume_st = st.builds(lambda bounds, prices, flats, f, per: charge(price="volume", free_units=f, per=per, tiers=[
    *({"up_to": b, "unit_amount": p, "flat_amount": fl} for b, p, fl in zip(sorted(set(bounds)), prices, flats)),
    {"unit_amount": prices[-1]}]),
    st.lists(st.decimals(min_value=1, max_value=50, places=2), min_size=1, max_size=4),
    st.lists(amounts_st, min_size=5, max_size=5), st.lists(amounts_st, min_size=5, max_size=5), amounts_st,
    st.sampled_from([1, 10, 1000]))


@settings(max_examples=400, deadline=None)
@given(st.one_of(charges_st, volume_st), st.lists(st.decimals(min_value=0, max_value=800, places=3), min_size=1,
                                                   max_size=30))
def test_the_streams_straight_pieces_agree_with_increment(priced, quantities):
    """The stream prices an event on its charge's current straight piece (``segment_of``) when it
    stays on it: that must be exactly ``increment``, for every price type, free units, flat
    amounts and ``per``."""
    total = Decimal(0)
    for quantity in quantities:
        piece, after = segment_of(priced, total), total + quantity
        if piece is not None and piece[0] < total and (piece[1] is None or after <= piece[1]):
            assert (after - total) * piece[2] == increment(priced, total, after)
        total = after


def test_straight_pieces_end_at_tier_bounds_and_free_units():
    graduated = charge(price="graduated", tiers=TIERS, free_units=500, per=10)
    assert segment_of(graduated, D(100)) == (D("-Infinity"), D(500), D(0))          # free: nothing to pay
    assert segment_of(graduated, D(500)) is None                                      # the first billed unit
    assert segment_of(graduated, D(501)) == (D(500), D(10_000), D("0.01"))           # tier 1: 0.10 per 10 units
    assert segment_of(graduated, D(10_000)) is None                                   # on the bound: tier 2 opens
    assert segment_of(graduated, D(50_001)) == (D(50_000), None, D("0.005"))
    assert segment_of(charge(price="package", package_size=10, package_amount=1), D(20)) is None


@settings(max_examples=400, deadline=None)
@given(st.one_of(charges_st, volume_st), st.lists(st.decimals(min_value=0, max_value=800, places=3), min_size=1,
                                                   max_size=30), st.sampled_from([0, 15, 100]))
def test_a_reservations_revenue_bound_is_never_below_what_the_call_adds(priced, quantities, discount):
    """A ``revenue_usd`` hard cap holds ``increment_bound`` before the call: whatever the period
    counted before it, the call may add no more than that (net of the discount)."""
    priced = priced.model_copy(update={"discount_percent": Decimal(discount)})
    total = Decimal(0)
    for quantity in quantities:
        added = net(priced, increment(priced, total, total + quantity))
        assert added <= increment_bound(priced, quantity)
        total += quantity
