"""The ledger, migrations and the sink on the real ClickHouse engine (embedded)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.insert import InsertContext

from schemas.usage import TokenUsage, UsageEvent
from streams.backoff import Backoff
from streams.storage.migrations import applied_versions, discover, migrate
from streams.storage.query import QueryError, connect_readonly, run_readonly
from streams.storage.sink import ClickHouseSink, SinkFailed
from streams.storage.tables import LEDGER, RecordBatch

AT = datetime(2026, 6, 1, 9, 30, tzinfo=UTC)


def records(attribution, n, tenant, start=0):
    return [
        attribution.attribute(UsageEvent(event_id=f"{tenant}-{i}", timestamp=AT + timedelta(seconds=i), tenant_id=tenant,
                             provider="openai", model="gpt-4o", usage=TokenUsage(input_tokens=1000, output_tokens=100),
                             tags={"k": "v"}, extra_field=i))
        for i in range(start, start + n)
    ]


def ledger(client, tenant):
    rows = client.query(f"SELECT count(), sum(cost_usd) FROM usage WHERE tenant_id = '{tenant}'").result_rows
    return rows[0][0], rows[0][1]


def test_migrations_are_recorded_and_idempotent(ch_client):
    assert applied_versions(ch_client) == {m.version for m in discover()}
    assert migrate(ch_client) == []


def test_the_ledger_merges_its_parts_column_by_column(ch_client):
    # sql/0008: a horizontal merge of a few 5,000-row parts held 197-289 MB of the engine's memory.
    engine = ch_client.query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
                             "AND name = 'usage_ledger'").result_rows[0][0]
    assert "vertical_merge_algorithm_min_rows_to_activate = 1" in engine
    assert "vertical_merge_algorithm_min_columns_to_activate = 1" in engine


def test_batch_lands_with_exact_decimal_costs(ch_client, attribution):
    batch = records(attribution, 3, "t-exact")
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    # gpt-4o: 1000 × $2.50/M + 100 × $10/M = $0.0035 per call.
    assert ledger(ch_client, "t-exact") == (3, Decimal("0.0105"))
    row = ch_client.query("SELECT tags, extra, cost_input, cost_output FROM usage WHERE event_id = 't-exact-1'")
    assert row.result_rows == [({"k": "v"}, '{"extra_field":1}', Decimal("0.0025"), Decimal("0.001"))]


def test_a_record_batch_lands_the_rows_read_as_its_records_were_added(ch_client, attribution):
    batch = RecordBatch(LEDGER)
    for record in records(attribution, 3, "t-rows"):
        batch.add(record)
    assert LEDGER.to_columns(batch) == LEDGER.to_columns(list(batch))
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    assert ledger(ch_client, "t-rows") == (3, Decimal("0.0105"))


def test_times_land_to_the_millisecond_whether_a_batch_shares_one_attribution_time_or_not(ch_client, attribution):
    at = datetime(2026, 6, 1, 10, 0, 0, 123_999, tzinfo=UTC)   # floored to .123, as ClickHouse's client does
    shared = [r.model_copy(update={"attributed_at": at}) for r in records(attribution, 3, "t-times")]
    each = [r.model_copy(update={"attributed_at": at + timedelta(seconds=i)})
            for i, r in enumerate(records(attribution, 2, "t-times", start=3))]
    for batch in (shared, each):
        LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    rows = ch_client.query("SELECT event_id, event_time, attributed_at FROM usage_ledger "
                           "WHERE tenant_id = 't-times' ORDER BY event_id").result_rows
    millis = timedelta(microseconds=123_000)
    assert [(e, t.replace(tzinfo=UTC), a.replace(tzinfo=UTC)) for e, t, a in rows] == [
        (f"t-times-{i}", AT + timedelta(seconds=i), at.replace(microsecond=0) + millis + timedelta(seconds=max(i - 3, 0)))
        for i in range(5)]


def test_the_encoded_batch_lands_as_the_clients_own_insert_of_its_columns(ch_client, attribution):
    # More rows than one Native block holds (4,096 rows of 512 to 1,023 bytes), so the body has several blocks.
    batch = [r.model_copy(update={"user_id": f"u-{i % 7}", "trace_id": "t" * (400 + i % 50), "latency_ms": i or None})
             for i, r in enumerate(records(attribution, 9_000, "t-native"))]
    sizing = InsertContext("ledger_twin", LEDGER.column_names, [get_from_name(t) for t in LEDGER.wire_types],
                           data=LEDGER.to_columns(batch), column_oriented=True)
    assert sizing.block_row_count == 4_096
    ch_client.command("CREATE TABLE ledger_twin AS usage_ledger")
    try:
        ch_client.insert("ledger_twin", LEDGER.to_columns(batch), column_names=LEDGER.column_names,
                         column_type_names=LEDGER.wire_types, column_oriented=True,
                         settings={"input_format_native_allow_types_conversion": 1})
        encoded = LEDGER.encode(batch)
        assert encoded.rows == 9_000 and encoded.token == LEDGER.dedup_token(batch)
        LEDGER.send(ch_client, encoded)
        select = "SELECT * EXCEPT landed_at FROM {} WHERE tenant_id = 't-native' ORDER BY event_id"
        landed = ch_client.query(select.format("usage_ledger")).result_rows
        assert len(landed) == 9_000
        assert landed == ch_client.query(select.format("ledger_twin")).result_rows
    finally:
        ch_client.command("DROP TABLE ledger_twin")


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_a_compressed_batch_lands_as_the_uncompressed_one(ch_client, attribution, compression):
    batch = records(attribution, 500, f"t-{compression}")
    encoded = LEDGER.encode(batch, compression)
    assert encoded.compression == compression and len(encoded.body) < len(LEDGER.native(batch)) / 2
    LEDGER.send(ch_client, encoded)
    assert ledger(ch_client, f"t-{compression}") == (500, Decimal("1.75"))


def test_batches_are_compressed_as_the_writer_client_compresses_its_own_inserts(ch_client):
    assert ClickHouseSink(writer=ch_client, reader=ch_client).compression is None  # the embedded engine
    # An HTTP client negotiates its write compression with the server (lz4 by default); none is here.
    for negotiated, sent in (("lz4", "lz4"), ("zstd", "zstd"), ("gzip", None)):
        sink = ClickHouseSink(writer=SimpleNamespace(write_compression=negotiated), reader=None)
        assert sink.compression == sent


def test_retried_batch_is_deduplicated_at_insert(ch_client, attribution):
    batch = records(attribution, 5, "t-retry")
    token = LEDGER.dedup_token(batch)
    LEDGER.insert(ch_client, batch, token)
    LEDGER.insert(ch_client, batch, token)
    raw = ch_client.query("SELECT count() FROM usage_ledger WHERE tenant_id = 't-retry'").result_rows[0][0]
    assert raw == 5
    assert ledger(ch_client, "t-retry") == (5, Decimal("0.0175"))


def test_copies_of_an_event_in_one_landing_are_collapsed_by_final_not_by_the_insert(ch_client, attribution):
    """Landings skip ClickHouse's merge at insert (``optimize_on_insert = 0``): two rows of one key
    in one block are both stored, and every reader's FINAL (the ``usage`` view) counts one, the
    later ``attributed_at``."""
    first = records(attribution, 3, "t-copies")
    copy = first[1].model_copy(update={"attributed_at": first[1].attributed_at + timedelta(seconds=5),
                                       "user_id": "the-copy"})
    LEDGER.insert(ch_client, [*first, copy])
    raw = ch_client.query("SELECT count() FROM usage_ledger WHERE tenant_id = 't-copies'").result_rows[0][0]
    assert raw == 4
    assert ledger(ch_client, "t-copies") == (3, Decimal("0.0105"))
    kept = ch_client.query("SELECT user_id FROM usage WHERE event_id = 't-copies-1'").result_rows
    assert kept == [("the-copy",)]


def test_the_dedup_token_tells_batches_apart_by_ids_order_and_attribution_time(attribution):
    batch = records(attribution, 4, "t-token")
    token = LEDGER.dedup_token(batch)
    assert LEDGER.dedup_token(list(batch)) == token
    assert LEDGER.dedup_token(batch[::-1]) != token
    assert LEDGER.dedup_token(batch[:3]) != token
    later = batch[2].attributed_at + timedelta(seconds=1)
    one_repriced = [*batch[:2], batch[2].model_copy(update={"attributed_at": later}), batch[3]]
    assert LEDGER.dedup_token(one_repriced) != token
    # the same ids and times, paired otherwise
    first, second = batch[0].attributed_at, later
    a = [r.model_copy(update={"attributed_at": first if i < 2 else second}) for i, r in enumerate(batch)]
    b = [r.model_copy(update={"attributed_at": first if i < 3 else second}) for i, r in enumerate(batch)]
    assert LEDGER.dedup_token(a) != LEDGER.dedup_token(b)


def test_redelivered_events_count_once_in_the_deduplicated_view(ch_client, attribution):
    first = records(attribution, 4, "t-replay")
    again = records(attribution, 4, "t-replay")  # a replay: same events, new attribution time, new token
    LEDGER.insert(ch_client, first, LEDGER.dedup_token(first))
    LEDGER.insert(ch_client, again, LEDGER.dedup_token(again))
    assert ledger(ch_client, "t-replay") == (4, Decimal("0.014"))


def test_the_sink_retries_a_failing_insert_with_the_same_bytes_and_token(ch_client, attribution):
    batch = records(attribution, 2, "t-flaky")
    tokens = []

    def flaky_send(client, encoded):
        tokens.append((encoded.token, encoded.body))
        if len(tokens) < 3:
            raise ConnectionError("ClickHouse is down")
        LEDGER.send(client, encoded)

    sink = ClickHouseSink(ch_client, ch_client, send=flaky_send, backoff=Backoff(first_s=0.01))
    assert sink.land([(LEDGER, batch), (LEDGER, [])]).result(timeout=10) is True
    stats = sink.stats["usage_ledger"]
    assert len(tokens) == 3 and len(set(tokens)) == 1 and tokens[0][0] == LEDGER.dedup_token(batch)
    assert (stats.errors, stats.landed, stats.batches, stats.failing_since) == (2, 2, 1, None)
    assert "ConnectionError: ClickHouse is down" == stats.last_error
    assert ledger(ch_client, "t-flaky") == (2, Decimal("0.007"))
    sink.close()


def test_a_sink_gives_up_only_when_stopped_or_after_the_attempts_it_was_given(ch_client, attribution):
    batch = records(attribution, 1, "t-down")

    def down(client, encoded):
        raise ConnectionError("Connection refused")

    sink = ClickHouseSink(ch_client, ch_client, send=down, backoff=Backoff(first_s=0.01, max_s=0.01))
    with pytest.raises(SinkFailed, match="ClickHouse refused 1 rows of usage_ledger 3 times: ConnectionError"):
        sink.land([(LEDGER, batch)], attempts=3).result(timeout=10)
    landing = sink.land([(LEDGER, batch)])
    assert sink.failing or not landing.done()
    sink.stopping.set()
    assert landing.result(timeout=10) is False
    assert sink.stats["usage_ledger"].errors >= 4 and ledger(ch_client, "t-down") == (0, Decimal(0))
    sink.close()


def test_query_clients_are_read_only_and_leave_the_writer_alone(ch_client, attribution):
    reader = connect_readonly(ch_client.path and f"chdb://{ch_client.path}")
    assert run_readonly(reader, "SELECT 1 + 1 AS two").rows == [[2]]
    with pytest.raises(QueryError, match="DROP is not a query"):
        run_readonly(reader, "DROP TABLE usage_ledger")
    with pytest.raises(DatabaseError, match="readonly"):  # the session refuses it too, statement check or not
        reader.command("DROP TABLE usage_ledger")
    batch = records(attribution, 1, "t-after-readonly")
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))  # the writer on the same engine still writes
    assert ledger(ch_client, "t-after-readonly") == (1, Decimal("0.0035"))
    reader.close()


def test_reprice_writes_new_versions_and_keeps_the_old_figures(ch_client, ch_sink, attribution, tmp_path):
    from streams.operations.reprice import reprice
    from streams.stages.attribution import Attribution
    from streams.stages.pricing import Pricer

    batch = records(attribution, 6, "t-reprice")  # gpt-4o at catalog price: $0.0035 a call
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    assert ledger(ch_client, "t-reprice") == (6, Decimal("0.021"))

    prices = tmp_path / "prices.yaml"
    prices.write_text("revision: 2\nmodels:\n  - {tenant: t-reprice, provider: openai, model: gpt-4o,\n"
                      "     effective_from: 2026-06-01T09:30:03Z,\n"
                      "     per_million_tokens: {input: 2.00, output: 8.00}}\n")
    contract = Attribution(Pricer.from_file(prices), attribution.paths)
    # Events 3..5 fall under the contract price: 1000 × 2 + 100 × 8 per million = $0.0028.
    result = reprice(ch_sink, contract, since=AT, tenant="t-reprice")
    assert (result.events, result.changed) == (6, 3)
    assert (result.old_cost_usd, result.new_cost_usd) == (Decimal("0.021"), Decimal("0.0189"))
    assert ledger(ch_client, "t-reprice") == (6, Decimal("0.0189"))
    versions = ch_client.query("SELECT DISTINCT pricing_version FROM usage WHERE tenant_id = 't-reprice'")
    assert versions.result_rows == [("genai-prices 0.2.3; prices.yaml r2",)]

    audit = ch_client.query(
        "SELECT event_id, cost_usd, new_cost_usd, pricing_version FROM attribution_audit "
        f"WHERE reprice_id = '{result.reprice_id}' AND cost_usd != new_cost_usd ORDER BY event_id").result_rows
    assert audit == [(f"t-reprice-{i}", Decimal("0.0035"), Decimal("0.0028"), "genai-prices 0.2.3; prices.yaml r0")
                     for i in (3, 4, 5)]
    run = ch_client.query(f"SELECT events, changed, new_cost_usd FROM reprice_runs "
                          f"WHERE reprice_id = '{result.reprice_id}'").result_rows
    assert run == [(6, 3, Decimal("0.0189"))]

    # Re-pricing again with the same prices changes no figure and still counts every event once.
    again = reprice(ch_sink, contract, since=AT, until=AT + timedelta(seconds=4), tenant="t-reprice")
    assert (again.events, again.changed) == (4, 0)
    assert ledger(ch_client, "t-reprice") == (6, Decimal("0.0189"))


def test_reprice_stops_at_a_cost_the_ledger_cannot_hold_and_writes_nothing_of_its_page(ch_client, ch_sink, attribution,
                                                                                     tmp_path):
    from streams.operations.reprice import RepriceRefused, reprice
    from streams.stages.attribution import Attribution
    from streams.stages.pricing import Pricer

    batch = records(attribution, 3, "t-typo")  # $0.0035 a call
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    prices = tmp_path / "prices.yaml"  # a typo from the third call on: 2,000 USD a token
    prices.write_text("revision: 3\nmodels:\n  - {tenant: t-typo, provider: openai, model: gpt-4o,\n"
                      "     effective_from: 2026-06-01T09:30:02Z,\n"
                      "     per_million_tokens: {input: 2000000000, output: 0}}\n")
    typo = Attribution(Pricer.from_file(prices), attribution.paths)

    with pytest.raises(RepriceRefused) as refused:
        reprice(ch_sink, typo, since=AT, tenant="t-typo", page_size=2)
    assert str(refused.value) == (
        "event 't-typo-2' of tenant 't-typo': cost 2000000.000000000000 USD of openai/gpt-4o is beyond the "
        "ledger's 999999.999999999999 USD a call; check the token counts, or the price in config/prices.yaml "
        "(prices.yaml models[0]); then re-price again (2 events were re-priced before its page, "
        "none of that page)")
    # The first page (calls 0 and 1, priced as before) was written again; the third call's row is untouched.
    assert ledger(ch_client, "t-typo") == (3, Decimal("0.0105"))
    audited = ch_client.query("SELECT event_id FROM attribution_audit WHERE tenant_id = 't-typo' ORDER BY event_id")
    assert audited.result_rows == [("t-typo-0",), ("t-typo-1",)]
    assert ch_client.query("SELECT count() FROM reprice_runs WHERE tenant_id = 't-typo'").result_rows == [(0,)]


def test_views_roll_up_traces_paths_and_steps(ch_client, attribution):
    calls = [("tr-1", "retrieval", 2_000, 10), ("tr-1", "generation", 1_000, 500), ("tr-1", "refinement", 500, 200),
             ("tr-2", "generation", 1_000, 100)]
    batch = [attribution.attribute(UsageEvent(event_id=f"v-{i}", timestamp=AT, tenant_id="t-views", provider="openai",
                                  model="gpt-4o", usage=TokenUsage(input_tokens=tin, output_tokens=tout),
                                  service="support-bot", feature="answer", step=step, trace_id=trace))
             for i, (trace, step, tin, tout) in enumerate(calls)]
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch) + "-replayed")  # a replay must not count twice
    traces = ch_client.query("SELECT trace_id, calls, business_paths, cost_by_step, cost_usd FROM cost_by_trace "
                             "WHERE tenant_id = 't-views' ORDER BY trace_id").result_rows
    # gpt-4o 2.50 in / 10 out: retrieval 0.0051, generation 0.0075, refinement 0.00325
    assert traces == [
        ("tr-1", 3, ["support-bot/answer"],
         {"generation": Decimal("0.0075"), "refinement": Decimal("0.00325"), "retrieval": Decimal("0.0051")},
         Decimal("0.01585")),
        ("tr-2", 1, ["support-bot/answer"], {"generation": Decimal("0.0035")}, Decimal("0.0035")),
    ]
    steps = ch_client.query("SELECT step, calls, cost_usd FROM cost_by_step WHERE business_path = 'support-bot/answer' "
                            "ORDER BY step").result_rows
    assert steps == [("generation", 2, Decimal("0.011")), ("refinement", 1, Decimal("0.00325")),
                     ("retrieval", 1, Decimal("0.0051"))]


def test_reprice_re_rates_revenue_counting_the_periods_earlier_calls_first(ch_client, ch_sink, attribution):
    from streams.operations.reprice import reprice
    from streams.stages.plans import Plans
    from streams.stages.revenue import RevenueMeter, stamped

    def plans(tiers):
        card = {"charges": [{"id": "calls", "metric": "requests", "price": "graduated", "tiers": tiers}]}
        return Plans.model_validate({"default_plan": "p", "plans": {"p": {"rate_card": card}}})

    def revenue():
        return ch_client.query("SELECT event_id, revenue_usd FROM usage WHERE tenant_id = 't-rerate' "
                               "ORDER BY event_id").result_rows

    graduated = plans([{"up_to": 3, "unit_amount": "0.10"}, {"unit_amount": "0.05"}])
    meter, periods = RevenueMeter(graduated), {}
    batch = [stamped(r, meter.rate(r, periods, AT)) for r in records(attribution, 6, "t-rerate")]
    LEDGER.insert(ch_client, batch, LEDGER.dedup_token(batch))
    first = [(f"t-rerate-{i}", Decimal("0.10") if i < 3 else Decimal("0.05")) for i in range(6)]
    assert revenue() == first

    # From the 4th call on: the three calls before it are counted first, so the 4th is still in tier 2.
    later = reprice(ch_sink, attribution, since=AT + timedelta(seconds=3), tenant="t-rerate", plans=graduated)
    assert (later.events, later.changed, later.old_revenue_usd, later.new_revenue_usd) == (
        3, 0, Decimal("0.15"), Decimal("0.15"))
    assert revenue() == first

    # A new rate card, re-rated from the period's start: every call at 0.02.
    flat = plans([{"unit_amount": "0.02"}])
    whole = reprice(ch_sink, attribution, since=AT.replace(day=1, hour=0, minute=0), tenant="t-rerate", plans=flat)
    assert (whole.events, whole.changed, whole.old_revenue_usd, whole.new_revenue_usd) == (
        6, 6, Decimal("0.45"), Decimal("0.12"))
    assert revenue() == [(f"t-rerate-{i}", Decimal("0.02")) for i in range(6)]
    margins = ch_client.query("SELECT sum(margin_usd), sum(revenue_usd) - sum(cost_usd) FROM usage "
                              "WHERE tenant_id = 't-rerate'").result_rows
    assert margins[0][0] == margins[0][1] == Decimal("0.12") - Decimal("0.021")
    audit = ch_client.query(f"SELECT sum(revenue_usd), sum(new_revenue_usd) FROM attribution_audit "
                            f"WHERE reprice_id = '{whole.reprice_id}'").result_rows
    assert audit == [(Decimal("0.45"), Decimal("0.12"))]


class _Commands:
    """The embedded client, with the commands sent through it kept (and one refused on request)."""

    def __init__(self, client, refuse=None):
        self.client, self.refuse, self.commands = client, refuse, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def command(self, sql, *args, **kwargs):
        self.commands.append(sql)
        if sql == self.refuse:
            raise RuntimeError("Code: 48. DB::Exception: not implemented")
        return self.client.command(sql, *args, **kwargs)


def test_the_embedded_engine_gives_its_allocators_free_memory_back_after_a_landing_at_most_so_often(
        ch_client, attribution):
    purge = "SYSTEM JEMALLOC PURGE"
    writer = _Commands(ch_client)
    sink = ClickHouseSink(writer, ch_client, purge_every_s=3600)
    sink._purged -= 3600  # (as if the last purge were an hour ago)
    for i in range(3):
        assert sink.land([(LEDGER, records(attribution, 2, f"t-purge-{i}"))]).result(timeout=30) is True
    assert writer.commands == [purge]  # after the first landing, then not within the hour
    assert ledger(ch_client, "t-purge-2") == (2, Decimal("0.007"))
    sink.close()
    # An engine that refuses the command: the landing stands, and it is not asked again.
    refusing = _Commands(ch_client, refuse=purge)
    sink = ClickHouseSink(refusing, ch_client, purge_every_s=0)
    for i in range(2):
        assert sink.land([(LEDGER, records(attribution, 2, f"t-refused-{i}"))]).result(timeout=30) is True
    assert refusing.commands == [purge] and sink.purge_every_s is None
    assert ledger(ch_client, "t-refused-1") == (2, Decimal("0.007"))
    sink.close()


def test_a_purge_gives_the_engines_freed_memory_back_to_the_system(ch_client):
    """What the sink's purge is for, on the embedded engine itself: memory an insert and its merge
    freed is kept by the engine's allocator until purged."""
    def anonymous_kib() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

    ch_client.command("CREATE TABLE purge_probe (a UInt64, b String) ENGINE = MergeTree ORDER BY a")
    ch_client.command("SYSTEM JEMALLOC PURGE")
    for part in range(8):
        ch_client.command(f"INSERT INTO purge_probe SELECT number, repeat('x', 200) FROM numbers({part * 50000}, 50000)")
    ch_client.command("OPTIMIZE TABLE purge_probe FINAL")
    before = anonymous_kib()
    ch_client.command("SYSTEM JEMALLOC PURGE")
    assert before - anonymous_kib() > 20 * 1024, "the purge gave back less than 20 MiB"
    ch_client.command("DROP TABLE purge_probe")
