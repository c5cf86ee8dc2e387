"""The compiled Native writer (streams/storage/_native.pyx) against the Python encoder it replaces:
the same bytes for a batch of one block, the same stored values on the real engine, and the same
refusals of values a column cannot hold. Then its reader (``read_block``), which the sink role
runs on every ledger block before inserting it: what it reads back, and that a block it accepts
is one the engine takes."""

import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.attributed import ZERO
from schemas.quota import QuotaAlert
from schemas.trusted import json_writer
from schemas.usage import TokenUsage, UsageEvent, epoch_ms
from streams.messaging.topics import LEDGER_BLOCK_BYTES, MAX_LEDGER_RECORD_BYTES
from streams.settings import Settings, SettingsError
from streams.stages.validation import MAX_EVENT_BYTES_CEILING
from streams.storage.tables import (
    ALERTS,
    AUDIT,
    INVOICE_LINES,
    INVOICES,
    LEDGER,
    REPRICE_RUNS,
    Blocks,
    IssuedInvoice,
    RecordBatch,
    Superseded,
)

AT = datetime(2026, 6, 1, 9, 30, 0, 123_456, tzinfo=UTC)

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
optional_texts = st.none() | texts
money = st.decimals(min_value=0, max_value=Decimal("999999"), places=12, allow_nan=False, allow_infinity=False)
zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30)),
                         ZoneInfo("Europe/Paris"), ZoneInfo("America/St_Johns")])
# From 1931 to 2058: before 1970 epoch milliseconds are negative, and floored, not truncated.
times = st.builds(lambda s, us, zone: (AT + timedelta(seconds=s, microseconds=us)).astimezone(zone),
                  st.integers(-3 * 10**9, 10**9), st.integers(0, 999_999), zones)


@st.composite
def ledger_records(draw, attribution):
    """An attributed call with every column's kind of value drawn: None where the ledger allows it,
    any text, shared and unshared zeros, maps, JSON, times in other zones and before 1970."""
    event = UsageEvent(
        event_id=draw(st.text("abcdef0123456789-", min_size=1, max_size=36)), timestamp=AT, tenant_id="t",
        provider="openai", model="gpt-4o",
        usage=TokenUsage(input_tokens=draw(st.integers(10**6, 10**9)), output_tokens=draw(st.integers(0, 10**6)),
                         cache_read_tokens=draw(st.integers(0, 10**6))),
        user_id=draw(st.none() | st.text(min_size=1, max_size=20).filter(str.strip)),
        tags=draw(st.dictionaries(st.text(min_size=1, max_size=8), texts, max_size=3)),
        latency_ms=draw(st.none() | st.integers(0, 2**32 - 1)))
    record = attribution.attribute(event, AT)
    cost = dataclasses.replace(record.cost, reasoning=draw(st.sampled_from([ZERO, Decimal("0E-12"), Decimal("0.5")])))
    return record.model_copy(update={
        "event_time": draw(times), "attributed_at": draw(times), "cost": cost, "service": draw(optional_texts),
        "revenue_usd": draw(st.none() | money), "cost_usd": draw(money),
        "extra": draw(st.dictionaries(st.text(max_size=5), st.integers() | texts, max_size=2)),
        "raw_usage": draw(st.none() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9)})),
        "late": draw(st.booleans()), "batch": draw(st.booleans())})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_writer_gives_the_python_encoders_bytes_for_any_ledger_record(attribution, data):
    records = data.draw(st.lists(ledger_records(attribution), min_size=1, max_size=6))
    batch = RecordBatch(LEDGER)
    for record in records:
        batch.add(record)
    # Under 4,096 rows the client writes one block, as the compiled writer always does.
    assert LEDGER.native(batch) == LEDGER.native(records) == LEDGER.native_reference(records)


def test_every_table_but_two_is_written_by_the_compiled_writer():
    # REPRICE_RUNS (a nullable time, nullable text) and INVOICE_LINES (UInt16) are one row a run
    # or a line: they keep the Python encoder, whose bytes the writer's tables are tested against.
    assert [t.name for t in (LEDGER, ALERTS, AUDIT, INVOICES) if t.writer() is None] == []
    assert [t.writer() for t in (REPRICE_RUNS, INVOICE_LINES)] == [None, None]


def test_an_alert_batch_gives_the_python_encoders_bytes():
    alerts = [QuotaAlert(alert_id=f"a{i}", tenant_id="t", limit_id="daily", metric="cost_usd", scope="tenant",
                         scope_value="", window_start=AT, window_end=AT + timedelta(days=1),
                         threshold_percent=Decimal("80"), level="warning", usage=Decimal("8.000000000001"),
                         limit=Decimal(10), crossed_at=AT + timedelta(seconds=i), event_id=f"e{i}")
              for i in range(3)]
    assert ALERTS.native(alerts) == ALERTS.native_reference(alerts)


def test_audit_and_invoice_batches_give_the_python_encoders_bytes():
    audit = [Superseded(reprice_id="r1", superseded_at=AT, event_id=f"e{i}", event_time=AT - timedelta(days=20_000 * i),
                        tenant_id="t", attributed_at=AT, cost_usd=Decimal("0.1"), new_cost_usd=Decimal("0E-12"),
                        priced=bool(i % 2), price_source="genai-prices", pricing_version="v1", new_pricing_version="v2",
                        revenue_usd=None if i % 2 else Decimal("1.5"), new_revenue_usd=Decimal(i))
             for i in range(4)]
    assert AUDIT.native(audit) == AUDIT.native_reference(audit)
    invoices = [IssuedInvoice(invoice_id=f"i{i}", tenant_id="t", period="2026-06", period_start=AT,
                              period_end=AT + timedelta(days=30), issued_at=AT + timedelta(microseconds=i),
                              currency="USD", total=Decimal("12.30"), cost_usd=Decimal("4.000000000001"),
                              margin_usd=Decimal("-1"), streamed_revenue_usd=Decimal(0), rated_usage_usd=Decimal("8.3"),
                              unrated_calls=i)
                for i in range(3)]
    assert INVOICES.native(invoices) == INVOICES.native_reference(invoices)


def test_a_refused_record_leaves_the_batch_as_it_was(attribution):
    good = [attribution.attribute(UsageEvent(event_id=f"e{i}", timestamp=AT, tenant_id="t", provider="openai",
                                             model="gpt-4o", usage=TokenUsage(input_tokens=1), tags={"k": "v"},
                                             latency_ms=5), AT) for i in range(2)]
    refused = [good[0].model_copy(update={"latency_ms": 2**40}),  # after its null flag is written
               good[0].model_copy(update={"tags": {"a": "b", "c": 1}}),  # after a first entry
               good[0].model_copy(update={"late": True, "attributed_at": "now"})]  # after most columns
    batch = RecordBatch(LEDGER)
    batch.add(good[0])
    for record in refused:
        with pytest.raises((TypeError, OverflowError)):
            batch.add(record)
    batch.add(good[1])
    assert list(batch) == good
    assert LEDGER.native(batch) == LEDGER.native_reference(good)


def test_a_batch_lands_as_the_python_encoders_batch_on_the_engine(ch_client, attribution):
    # 9,000 rows: the Python encoder sends three blocks, the writer one; the table holds the same.
    records = [attribution.attribute(UsageEvent(
        event_id=f"n-{i}", timestamp=AT + timedelta(seconds=i), tenant_id="t-writer", provider="anthropic",
        model="claude-sonnet-4-5", usage=TokenUsage(input_tokens=1000 + i, output_tokens=i % 300,
                                                    cache_write_tokens=i % 3),
        tags={"k": str(i % 5)} if i % 2 else {}, latency_ms=i if i % 4 else None), AT)
        for i in range(9_000)]
    records = [r.model_copy(update={"revenue_usd": (Decimal(i) / 7).quantize(Decimal("1e-12")) if i % 3 else None})
               for i, r in enumerate(records)]
    ch_client.command("CREATE TABLE ledger_reference AS usage_ledger")
    try:
        LEDGER.send(ch_client, LEDGER.encode(records))
        reference = LEDGER.encode(records)
        ch_client.raw_insert("ledger_reference", LEDGER.column_names, LEDGER.native_reference(records), fmt="Native",
                             settings={"input_format_native_allow_types_conversion": 1})
        select = "SELECT * EXCEPT landed_at FROM {} WHERE tenant_id = 't-writer' ORDER BY event_id"
        landed = ch_client.query(select.format("usage_ledger")).result_rows
        assert len(landed) == 9_000 and reference.rows == 9_000
        assert landed == ch_client.query(select.format("ledger_reference")).result_rows
        total = ch_client.query("SELECT sum(cost_usd), sum(revenue_usd), countIf(latency_ms IS NULL) "
                                "FROM usage_ledger WHERE tenant_id = 't-writer'").result_rows
        assert total == [(sum(r.cost_usd for r in records), sum(r.revenue_usd or 0 for r in records), 2_250)]
    finally:
        ch_client.command("DROP TABLE ledger_reference")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("event_id", None, "event_id: expected a str, got NoneType"),
    ("latency_ms", -1, "can't convert negative value to uint32_t"),
    ("input_tokens", 1.5, "input_tokens: expected an int, got float"),
    ("tags", {"k": 1}, "tags: expected str keys and values"),
    ("event_time", "2026-06-01", "event_time: expected a datetime, got str"),
])
def test_a_value_its_column_cannot_hold_is_refused(attribution, field, value, message):
    record = attribution.attribute(UsageEvent(event_id="e", timestamp=AT, tenant_id="t", provider="openai",
                                              model="gpt-4o", usage=TokenUsage(input_tokens=1)), AT)
    if field == "input_tokens":
        bad = record.model_copy(update={"usage": record.usage.model_copy(update={field: value})})
    else:
        bad = record.model_copy(update={field: value})
    with pytest.raises((TypeError, OverflowError), match=message):
        LEDGER.writer().add(bad)
    if field != "input_tokens":  # (the client writes a float's integer part; the writer refuses it)
        with pytest.raises(Exception):  # noqa: B017 - the client's own error types vary by column
            LEDGER.native_reference([bad])


def test_a_naive_time_is_written_as_utc_as_the_ledger_returns_it(attribution):
    record = attribution.attribute(UsageEvent(event_id="e", timestamp=AT, tenant_id="t", provider="openai",
                                              model="gpt-4o", usage=TokenUsage(input_tokens=1)), AT)
    naive = record.model_copy(update={"event_time": AT.replace(tzinfo=None)})
    assert LEDGER.native([naive]) == LEDGER.native([record])


# ---- reading blocks back ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_block_reads_back_to_its_records_values(attribution, data):
    records = data.draw(st.lists(ledger_records(attribution), min_size=1, max_size=6))
    rows = LEDGER.block_rows(LEDGER.native(records))
    to_json = json_writer()
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert (row["event_id"], row["user_id"], row["service"], row["tags"], row["latency_ms"]) == (
            record.event_id, record.user_id or "", record.service or "", record.tags, record.latency_ms)
        assert (row["cost_usd"], row["revenue_usd"], row["cost_reasoning"]) == (
            record.cost_usd, record.revenue_usd, record.cost.reasoning)
        assert (row["event_time"], row["attributed_at"]) == (epoch_ms(record.event_time), epoch_ms(record.attributed_at))
        assert (row["input_tokens"], row["late"], row["batch"]) == (record.usage.input_tokens, record.late, record.batch)
        assert row["extra"] == (to_json(record.extra) if record.extra else "")


def _two_rows(attribution) -> bytes:
    return LEDGER.native([attribution.attribute(UsageEvent(
        event_id=f"r-{i}", timestamp=AT, tenant_id="t-read", provider="openai", model="gpt-4o",
        usage=TokenUsage(input_tokens=1000 * (i + 1), output_tokens=7), tags={"k": "v"} if i else {},
        latency_ms=None if i else 12), AT).model_copy(update={"revenue_usd": Decimal("0.25") if i else None})
        for i in range(2)])


def test_every_cut_of_a_block_is_refused_with_where_it_ends(attribution):
    block = _two_rows(attribution)
    assert LEDGER.read_block(block) == 2
    for end in range(len(block)):  # (none may crash the reader, and none is a block)
        with pytest.raises(ValueError, match="the block ends inside|a block of|an empty message"):
            LEDGER.read_block(block[:end])
    with pytest.raises(ValueError, match="1 bytes after the block's last column"):
        LEDGER.read_block(block + b"\0")


@pytest.mark.parametrize(("old", "new", "message"), [
    (b"\x08event_id", b"\x08eventXid", "column 1 is eventXid String; the ledger sends event_id String"),
    (b"\x06String", b"\x06Strong", "column 1 is event_id Strong"),
    (b"0.002570000000", b"0.00257x000000", "column cost_usd: '0.00257x000000' in row 0 is not a decimal number"),
    (b"0.25", b"-.25", r"column revenue_usd: '-.25' in row 1 is not a decimal number"),
])
def test_a_block_of_another_layout_or_a_bad_decimal_is_refused(attribution, old, new, message):
    block = _two_rows(attribution)
    assert block.count(old) >= 1
    with pytest.raises(ValueError, match=message):
        LEDGER.read_block(block.replace(old, new, 1))


def _insert(client, table: str, block: bytes) -> bool:
    """Whether the engine takes ``block`` into ``table``."""
    try:
        client.raw_insert(table, LEDGER.column_names, block, fmt="Native",
                          settings={"input_format_native_allow_types_conversion": 1})
    except Exception:  # noqa: BLE001 - any refusal
        return False
    return True


def _accepted(block: bytes) -> bool:
    try:
        LEDGER.read_block(block)
    except ValueError:
        return False
    return True


# cost_usd is a Decimal(18, 12): at most 18 digits before the point, 6 integer digits in value.
@pytest.mark.parametrize("text", [
    "999999.99999999", "1000000.0000000", "1E+5", "1E+6", "0E+10", "0E+6", "12.5E+5", "1.25E+6", "99999900E-2",
    "9999999E-1", "0.00257000000E1", "-999999.9999999", "1" + "0" * 40 + "E-40", "0." + "0" * 80 + "1",
    "0E+7", "0.0E+7", "0.001E+8", "0.0025700000E7", "0.5E+6", "0.5E+7", "000000123.5", "1E-2147483649",
    "1E-2147483647", "-0E-12", "1.0E-7"])
def test_the_reader_refuses_exactly_the_decimals_the_engine_refuses(ch_client, attribution, text):
    block = _two_rows(attribution)
    damaged = block.replace(b"\x0e0.002570000000", bytes([len(text)]) + text.encode(), 1)
    assert damaged != block
    ch_client.command("CREATE TABLE IF NOT EXISTS ledger_decimals AS usage_ledger")
    try:
        assert _accepted(damaged) == _insert(ch_client, "ledger_decimals", damaged)
    finally:
        ch_client.command("DROP TABLE ledger_decimals")


def test_a_damaged_block_the_reader_accepts_is_one_the_engine_takes(ch_client, attribution):
    block = _two_rows(attribution)
    rng = random.Random(7)
    accepted = refused = 0
    ch_client.command("CREATE TABLE ledger_damaged AS usage_ledger")
    try:
        for _ in range(400):  # one to three bytes changed anywhere
            damaged = bytearray(block)
            for _ in range(rng.randint(1, 3)):
                damaged[rng.randrange(len(damaged))] ^= rng.randint(1, 255)
            if _accepted(bytes(damaged)):
                accepted += 1
                assert _insert(ch_client, "ledger_damaged", bytes(damaged)), bytes(damaged)
            else:
                refused += 1
    finally:
        ch_client.command("DROP TABLE ledger_damaged")
    assert accepted >= 40 and refused >= 40  # (both sides of the check were exercised)


def test_blocks_cut_by_size_land_in_one_insert_as_one_block_lands(ch_client, attribution):
    records = [attribution.attribute(UsageEvent(
        event_id=f"b-{i}", timestamp=AT + timedelta(seconds=i), tenant_id="t-blocks", provider="openai",
        model="gpt-4o-mini", usage=TokenUsage(input_tokens=100 + i, output_tokens=i % 50), tags={"i": str(i)}), AT)
        for i in range(3_000)]
    batch = RecordBatch(LEDGER, block_bytes=64 * 1024)
    for record in records:
        batch.add(record)
    blocks = batch.blocks()
    sizes = [LEDGER.read_block(block) for block in blocks]
    assert len(blocks) > 5 and sum(sizes) == 3_000 and max(map(len, blocks)) < 64 * 1024 + 2_000
    ch_client.command("CREATE TABLE ledger_one_block AS usage_ledger")
    try:
        LEDGER.send(ch_client, LEDGER.encode(Blocks(blocks, [f"b:{i}" for i in range(len(blocks))], sum(sizes))))
        ch_client.raw_insert("ledger_one_block", LEDGER.column_names, LEDGER.native(records), fmt="Native",
                             settings={"input_format_native_allow_types_conversion": 1})
        select = "SELECT * EXCEPT landed_at FROM {} WHERE tenant_id = 't-blocks' ORDER BY event_id"
        landed = ch_client.query(select.format("usage_ledger")).result_rows
        assert len(landed) == 3_000 and landed == ch_client.query(select.format("ledger_one_block")).result_rows
        parts = ch_client.query("SELECT count() FROM system.parts WHERE active AND table = 'usage_ledger' "
                                "AND database = currentDatabase() AND rows = 3000").result_rows
        assert parts == [(1,)]  # one insert, one part, however many blocks
    finally:
        ch_client.command("DROP TABLE ledger_one_block")


def test_the_row_of_the_largest_event_fits_a_ledger_record_after_a_full_block(attribution):
    # An event as large as COSTLINE_MAX_EVENT_BYTES may be, of text whose JSON grows most when
    # written escaped (DEL: 1 byte in the event, 6 in the row's JSON column).
    event = {"event_id": "big", "timestamp": "2026-06-01T09:00:00Z", "tenant_id": "t", "provider": "openai",
             "model": "gpt-4o", "usage": {"input_tokens": 1}, "notes": ""}
    event["notes"] = "\x7f" * (MAX_EVENT_BYTES_CEILING - len(json.dumps(event)) - 8)
    raw = json.dumps(event, ensure_ascii=False).encode()
    assert MAX_EVENT_BYTES_CEILING - 16 < len(raw) <= MAX_EVENT_BYTES_CEILING
    record = dataclasses.replace(attribution, max_bytes=MAX_EVENT_BYTES_CEILING).attribute_raw(raw, AT)
    row = LEDGER.native([record])
    assert len(row) > 5.9 * len(raw)
    assert LEDGER_BLOCK_BYTES + len(row) <= MAX_LEDGER_RECORD_BYTES
    with pytest.raises(SettingsError, match="COSTLINE_MAX_EVENT_BYTES"):  # and no event may be larger
        Settings.from_env(environ={"COSTLINE_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES_CEILING + 1)})
