"""End to end: one worker's throughput and latency, against the ceiling of a minimal loop.

    scripts/kafka start && .venv/bin/python bench/e2e.py [--events 100000] [--tenants 1000]

1. Throughput. Empty topics and an empty embedded ClickHouse (isolated prefix and home), N
   simulated events (the ``costline simulate`` mix) produced to usage.raw first; then one worker
   (role ``all``) starts, and runs until all N rows are queryable in ClickHouse (the row count is
   polled every 0.2 s). The sustained rate runs from the first poll that finds rows (the first
   batch is through) to the last; the rate from the worker's start runs from its health endpoint's
   first answer, and so also counts what happens once per start (joining the consumer group, the
   first transaction, the first fetch). Also: the worker's peak RSS and CPU seconds per 100k
   events; the cores it kept busy while sustained, in all and in its busiest thread (the batch
   loop's: one core is its limit); and what its resident memory is made of at the end of this
   phase: its own (anonymous) memory and mapped files, mostly shared libraries' code.
2. Latency, at a fixed rate of half the sustained rate (or ``--latency-rate``) for ``--latency-s``
   seconds, on the same worker: event produced → row visible in ClickHouse (the n-th event
   produced is taken as visible when the ledger first holds n rows of this phase: rows land in
   batches in about the order they were produced; polled every 50 ms), and event produced → quota
   state on quota.state (each state record against the production time of the newest event it
   counts).
3. The ceiling: a confluent-kafka consumer reads the same N records, parses the JSON and inserts
   them column-oriented into an embedded ClickHouse table, in batches of the worker's size.

``--role stream`` runs the worker that publishes usage.attributed for a separate sink instead of
writing ClickHouse: the process then holds the quota state and Kafka clients but no database,
as a worker writing to a ClickHouse server does. Phase 1 then runs until the worker has committed
the offsets of all N events, and phase 2 is skipped.

Prints the figures, then one JSON object on the last line. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402

from schemas.usage import UsageEvent, epoch_ms  # noqa: E402
from streams.messaging.topics import ensure_topics  # noqa: E402
from streams.operations.processes import (  # noqa: E402
    ROOT,
    WorkerProcess,
    descendants,
    isolated_env,
    remove_isolated_topics,
    wait_for,
)
from streams.operations.simulate import Workload  # noqa: E402
from streams.runtime.kafka import group_id  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stages.plans import Plans  # noqa: E402
from streams.storage.query import query  # noqa: E402


def tree(pid: int) -> list[int]:
    """A process and those below it (``costline worker --processes N``: the supervisor and its children)."""
    return [pid, *descendants(pid)]


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a process and those below it, from /proc: for several
    processes, the sum of their peaks (an upper bound of the peak of their sum)."""
    pids = tree(pid)
    return (sum(proc_status_mb(p)["VmHWM"] for p in pids),
            sum(cpu_s(Path(f"/proc/{p}/stat")) for p in pids))


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process and those below it, by thread id, from /proc."""
    seconds = {}
    for process in tree(pid):
        for task in Path(f"/proc/{process}/task").iterdir():
            try:
                seconds[int(task.name)] = cpu_s(task / "stat")
            except FileNotFoundError:  # a thread (or a process) that has just ended
                continue
    return seconds


def cpu_s(stat: Path) -> float:
    """User and system CPU seconds from a /proc stat file (of a process or of one of its threads)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_status_mb(pid: int) -> dict[str, float]:
    """``proc_status_mb`` summed over a process and those below it."""
    figures = [proc_status_mb(p) for p in tree(pid)]
    return {name: sum(f[name] for f in figures) for name in figures[0]}


def proc_status_mb(pid: int) -> dict[str, float]:
    """A process's memory figures from /proc/PID/status, in MB: VmHWM (peak RSS), and of the RSS now,
    RssAnon (its own heap and stacks) and RssFile (mapped files, mostly shared libraries' code: the
    embedded ClickHouse's library alone is about 550 MB on disk, of which 200-250 MB gets resident)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {name: int(rest.split()[0]) / 1024 for name, _, rest in (line.partition(":") for line in status.splitlines())
            if name in ("VmHWM", "RssAnon", "RssFile")}


def producer(servers: str) -> Producer:
    return Producer({"bootstrap.servers": servers, "enable.idempotence": True, "acks": "all",
                     "partitioner": "murmur2_random", "linger.ms": 5, "compression.type": "lz4"})


def send(p: Producer, topic: str, event: UsageEvent, value: bytes) -> None:
    send_raw(p, topic, event.kafka_key(), value, event.timestamp_ms())


def send_raw(p: Producer, topic: str, key: bytes, value: bytes, timestamp_ms: int) -> None:
    while True:
        try:
            p.produce(topic, key=key, value=value, timestamp=timestamp_ms)
            break
        except BufferError:
            p.poll(0.05)
    p.poll(0)


#: A time no event of a run has, replaced in each latency event's JSON by its planned send time.
_STAND_IN_TIME = datetime(2001, 2, 3, 4, 5, 6, 789_000, tzinfo=UTC)


def events(count: int, tenants: int, seed: int, start: datetime, distinct: bool) -> list[UsageEvent]:
    """The simulate mix; with ``distinct``, tenants round-robin so that every one of them occurs."""
    generated = list(Workload(count, tenants=tenants, seed=seed, start=start).generate())
    if distinct:
        generated = [e.model_copy(update={"tenant_id": f"tenant-{i % tenants:06d}"}) for i, e in enumerate(generated)]
    return generated


def fill(servers: str, topic: str, batch: list[UsageEvent]) -> None:
    p = producer(servers)
    for event in batch:
        send(p, topic, event, event.model_dump_json(exclude_none=True).encode())
    assert p.flush(60) == 0


def ledger_rows(settings: Settings) -> int:
    return int(query(settings, "SELECT count() FROM usage_ledger").rows[0][0])


def committed_events(settings: Settings) -> int:
    """Records of usage.raw (an empty topic at the start) the worker's consumer group has committed."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group_id(settings),
                         "enable.auto.commit": False})
    try:
        topic = settings.topics.raw
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(max(tp.offset, 0) for tp in consumer.committed([TopicPartition(topic, p) for p in partitions],
                                                                  timeout=10))
    finally:
        consumer.close()


def latency_phase(settings: Settings, rate: int, seconds: float, tenants: int, distinct: bool,
                  rows_before: int) -> tuple[list[float], list[float]]:
    """Produces at ``rate`` events/s; returns (event → queryable, event → quota state) latencies in ms."""
    servers = settings.kafka_bootstrap_servers
    count = int(rate * seconds)
    # Event times are the planned send times, known only once everything is prepared: each event
    # is encoded with a stand-in time, replaced as it is sent. (Planned from a start fixed before
    # the preparation, which takes longer than any fixed head start on a busy 2-core host, the first
    # seconds' events were all due at once: a burst, measured as the rate's latency.)
    planned = events(count, tenants, 29, _STAND_IN_TIME, distinct)
    keys = [e.kafka_key() for e in planned]
    stand_in = _STAND_IN_TIME.isoformat().replace("+00:00", "Z").encode()
    values = [e.model_copy(update={"timestamp": _STAND_IN_TIME}).model_dump_json(exclude_none=True).encode()
              for e in planned]
    assert all(value.count(stand_in) == 1 for value in values[:100])
    step = 1 / rate
    # The quota states and the ledger's row count are watched from a process of their own: on
    # threads of this one, they waited for the GIL behind the producing loop (which keeps it while
    # it sends thousands of events a second), and the wait was measured as the worker's latency.
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    results, results_in = context.Pipe(duplex=False)
    watcher = context.Process(target=watch, args=(settings, rows_before, ready, stop, results_in), daemon=True)
    watcher.start()
    if not ready.wait(60):
        raise SystemExit("the latency watcher did not start within 60 s")
    start = datetime.now(UTC) + timedelta(seconds=1)
    sent_at: list[float] = []
    p = producer(servers)
    begin = start.timestamp()
    while time.time() < begin:
        time.sleep(0.001)
    # Every event due is sent, then the loop sleeps until the next is due (at least 1 ms): it
    # spun between events before, a whole core of this 2-core host taken from the worker and the
    # broker at any rate above 500 events/s, and the worker's latency measured on what was left.
    i = 0
    while i < count:
        now = time.time()
        while i < count and begin + i * step <= now:
            at = start + timedelta(seconds=i * step)
            sent_at.append(time.time())
            send_raw(p, settings.topics.raw, keys[i],
                     values[i].replace(stand_in, at.isoformat().replace("+00:00", "Z").encode()), epoch_ms(at))
            i += 1
        if i < count:
            time.sleep(max(0.001, begin + i * step - time.time()))
    p.flush(30)
    deadline = time.monotonic() + 120
    while ledger_rows(settings) - rows_before < count and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    counts, states = results.recv() if results.poll(30) else ([], [])
    watcher.join(5)
    state_lag = [(read_at - as_of) * 1000 for read_at, as_of in states if as_of >= begin]
    if not counts or counts[-1][1] < count:
        raise SystemExit(f"only {counts[-1][1] if counts else 0} of {count} latency events became queryable within 120s")
    visible_at: list[float] = []  # the n-th event counts as visible at the first poll that saw n rows
    for when, landed in counts:
        visible_at.extend([when] * (min(landed, count) - len(visible_at)))
    return [(v - s) * 1000 for s, v in zip(sent_at, visible_at, strict=True)], state_lag


def watch(settings: Settings, rows_before: int, ready: Any, stop: Any, out: Any) -> None:
    """(In a process of its own, until ``stop``.) The ledger's rows of the latency phase every 50 ms,
    as (when, rows); and each quota state record from the topic's end onwards, as (when it was
    read, its ``as_of``: the last counted event's time, i.e. its planned send time). Sent through ``out``."""
    topic = settings.topics.state
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": f"bench-{time.time_ns()}",
                         "enable.auto.commit": False, "isolation.level": "read_committed", "fetch.wait.max.ms": 10})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts]
    consumer.assign([TopicPartition(topic, p, end) for p, end in zip(parts, ends, strict=True)])
    counts: list[tuple[float, int]] = []
    states: list[tuple[float, float]] = []

    def poll_ledger() -> None:
        while not stop.is_set():
            counts.append((time.time(), ledger_rows(settings) - rows_before))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_ledger, daemon=True)
    poller.start()
    ready.set()
    while not stop.is_set():
        for msg in consumer.consume(1000, timeout=0.05):
            if msg.error() is None and msg.value():
                read_at = time.time()
                states.append((read_at, datetime.fromisoformat(json.loads(msg.value())["as_of"]).timestamp()))
    poller.join(5)
    consumer.close()
    out.send((counts, states))


def ceiling(servers: str, topic: str, events: int, batch: int, path: Path) -> float:
    import clickhouse_connect

    client = clickhouse_connect.get_client(interface="chdb", path=str(path))
    client.command("CREATE TABLE t (event_id String, tenant_id String, model String, input UInt64, output UInt64, "
                   "ts DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY (tenant_id, event_id)")
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"ceiling-{time.time_ns()}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    names = ["event_id", "tenant_id", "model", "input", "output", "ts"]
    types = ["String", "String", "String", "UInt64", "UInt64", "DateTime64(3, 'UTC')"]
    done = 0
    started = time.perf_counter()
    while done < events:
        rows: list[list[object]] = [[] for _ in names]
        for msg in consumer.consume(batch, timeout=1.0):
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise SystemExit(f"ceiling consumer: {msg.error()}")
                continue
            e = json.loads(msg.value())
            for column, value in zip(rows, (e["event_id"], e["tenant_id"], e["model"], e["usage"]["input_tokens"],
                                            e["usage"]["output_tokens"], datetime.fromisoformat(e["timestamp"])),
                                     strict=True):
                column.append(value)
        if rows[0]:
            client.insert("t", rows, column_names=names, column_type_names=types, column_oriented=True)
            done += len(rows[0])
    elapsed = time.perf_counter() - started
    consumer.close()
    client.close()
    return events / elapsed


class Progress:
    """A count polled until it reaches a total, remembering when it was first above zero and what it was
    then: the sustained rate runs from there (the worker's first batch is through) to the end, so that
    it leaves out what happens once per start (joining the group, the first transaction, the first fetch)."""

    def __init__(self, count: Callable[[], int], total: int, on_first: Callable[[], Any]) -> None:
        self.count, self.total, self.on_first = count, total, on_first
        self.first: tuple[float, int] | None = None
        #: What ``on_first`` returned when the count was first above zero.
        self.at_first: Any = None

    def done(self) -> bool:
        n = self.count()
        if n and self.first is None:
            self.first = (time.perf_counter(), n)
            self.at_first = self.on_first()
        return n >= self.total

    def sustained_eps(self, end: float) -> float:
        assert self.first is not None
        at, n = self.first
        return (self.total - n) / (end - at) if end > at and n < self.total else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def without_rating(path: Path, keep_cards: bool) -> None:
    """Rewrites a plans.yaml without the limits that need rate cards (and without the cards)."""
    plans = Plans.from_file(path).without_rating(keep_cards)
    path.write_text(yaml.safe_dump(plans.model_dump(mode="json", exclude_unset=True)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--distinct-tenants", action="store_true",
                        help="spread events round-robin over all --tenants (every tenant occurs)")
    parser.add_argument("--latency-s", type=float, default=10.0, help="length of the latency phase (0 skips it)")
    parser.add_argument("--latency-rate", type=int, help="events/s of the latency phase (default: half the sustained "
                                                             "rate measured in phase 1), to compare runs at one rate")
    parser.add_argument("--plans", type=Path, help="a plans.yaml to use instead of config/plans.yaml")
    parser.add_argument("--without-revenue-limits", action="store_true",
                        help="keep the rate cards, strip the revenue_usd and margin_percent limits")
    parser.add_argument("--without-rating", action="store_true",
                        help="strip the plans' rate cards and revenue limits: the baseline that revenue rating in "
                             "the stream is measured against (run it paired with a run without this flag)")
    parser.add_argument("--stream-workers", type=int, default=0,
                        help="run costline worker --processes N: N stream workers and one sink (figures summed "
                             "over the processes)")
    parser.add_argument("--role", choices=["all", "stream"], default="all",
                        help="stream: the worker publishes its ledger blocks on usage.ledger instead of writing the embedded "
                             "ClickHouse, so its RSS holds no database; timed until its offsets are committed, "
                             "without the latency phase")
    args = parser.parse_args()
    if args.role == "stream":
        args.latency_s = 0
    servers = Settings.from_env().kafka_bootstrap_servers
    work = Path(tempfile.mkdtemp(prefix="costline-bench-"))
    config = work / "config"
    shutil.copytree(ROOT / "config", config)
    if args.plans:
        shutil.copy(args.plans, config / "plans.yaml")
    if args.without_rating or args.without_revenue_limits:
        without_rating(config / "plans.yaml", keep_cards=not args.without_rating)
    env = isolated_env(work / "home", servers, config, COSTLINE_ROLE=args.role)
    worker = WorkerProcess(env, work / "worker.log", processes=args.stream_workers)
    settings = worker.settings
    ensure_topics(settings)
    rows_lag: list[float] = []
    state_lag: list[float] = []
    try:
        backlog = events(args.events, args.tenants, 11, datetime.now(UTC) - timedelta(hours=1), args.distinct_tenants)
        fill(servers, settings.topics.raw, backlog)
        del backlog
        started = time.perf_counter()
        worker.start()
        ready = time.perf_counter() - started
        threads = lambda: thread_cpu_s(worker.process.pid)  # noqa: E731
        if args.role == "all":
            progress = Progress(lambda: ledger_rows(settings), args.events, threads)
            wait_for(progress.done, 1800, f"{args.events} rows", alive=worker, interval_s=0.2)
        else:
            progress = Progress(lambda: committed_events(settings), args.events, threads)
            wait_for(progress.done, 1800, f"{args.events} committed events", alive=worker, interval_s=0.2)
        ended = time.perf_counter()
        elapsed = ended - started - ready
        rss_mb, cpu_s = proc_stats(worker.process.pid)
        rss_now = tree_status_mb(worker.process.pid)  # at the end of phase 1, when the state is largest
        # Cores in use while sustained: the whole worker, and its busiest thread (the batch loop's).
        used = {tid: cpu - progress.at_first.get(tid, 0.0) for tid, cpu in threads().items()}
        sustained_s = ended - progress.first[0]
        worker_cores, busiest_cores = sum(used.values()) / sustained_s, max(used.values()) / sustained_s
        eps_from_start = args.events / elapsed
        eps = progress.sustained_eps(ended)
        rate = args.latency_rate or max(int(eps / 2), 1)
        if args.latency_s > 0:
            rows_lag, state_lag = latency_phase(settings, rate, args.latency_s, args.tenants,
                                                args.distinct_tenants, args.events)
            rss_mb = max(rss_mb, proc_stats(worker.process.pid)[0])
        worker.stop()
        ceiling_eps = ceiling(servers, settings.topics.raw, args.events, settings.sink_batch, work / "ceiling")
    finally:
        worker.stop()
        remove_isolated_topics(settings)
        shutil.rmtree(work, ignore_errors=True)

    print(f"events                      {args.events:>12,}")
    print(f"tenants                     {args.tenants:>12,}{' (all occur)' if args.distinct_tenants else ''}")
    print(f"worker role                 {args.role:>12}"
          + (f"  ({args.stream_workers} stream workers and a sink)" if args.stream_workers else ""))
    print(f"worker start-up s           {ready:>12.1f}")
    print(f"costline events/s           {eps:>12,.0f}  (sustained: from the first batch through to the last)")
    print(f"  from the worker's start   {eps_from_start:>12,.0f}  (its first batch through after "
          f"{progress.first[0] - started - ready:.1f} s)")
    print(f"ceiling events/s            {ceiling_eps:>12,.0f}")
    print(f"ratio                       {eps / ceiling_eps:>12.3f}")
    print(f"worker peak RSS MB          {rss_mb:>12.0f}")
    print(f"  RSS after phase 1 MB      {rss_now['RssAnon'] + rss_now['RssFile']:>12.0f}  (own memory "
          f"{rss_now['RssAnon']:,.0f}, mapped files {rss_now['RssFile']:,.0f})")
    print(f"CPU s per 100k events       {cpu_s * 100_000 / args.events:>12.1f}")
    print(f"cores busy, sustained       {worker_cores:>12.2f}  (busiest thread {busiest_cores:.2f})")
    if rows_lag:
        print(f"latency phase               {len(rows_lag):>12,} events at {rate:,}/s")
        print(f"event → queryable ms        p50 {pct(rows_lag, .5):,.0f}  p95 {pct(rows_lag, .95):,.0f}  "
              f"p99 {pct(rows_lag, .99):,.0f}  max {max(rows_lag):,.0f}")
    if state_lag:
        print(f"event → quota state ms      p50 {pct(state_lag, .5):,.0f}  p95 {pct(state_lag, .95):,.0f}  "
              f"p99 {pct(state_lag, .99):,.0f}  ({len(state_lag):,} state records, mean "
              f"{statistics.fmean(state_lag):,.0f})")
    print(json.dumps({"events": args.events, "eps": round(eps), "eps_from_start": round(eps_from_start),
                      "ceiling_eps": round(ceiling_eps),
                      "ratio": round(eps / ceiling_eps, 3),
                      "latency_rate": rate if rows_lag else None,
                      "p50_ms": round(pct(rows_lag, .5)) if rows_lag else None,
                      "p99_ms": round(pct(rows_lag, .99)) if rows_lag else None,
                      "state_p50_ms": round(pct(state_lag, .5)) if state_lag else None,
                      "state_p99_ms": round(pct(state_lag, .99)) if state_lag else None,
                      "rss_mb": round(rss_mb), "rss_anon_mb": round(rss_now["RssAnon"]),
                      "rss_file_mb": round(rss_now["RssFile"]), "cpu_s_per_100k": round(cpu_s * 100_000 / args.events, 1),
                      "cores": round(worker_cores, 2), "busiest_thread_cores": round(busiest_cores, 2),
                      "tenants": args.tenants, "distinct_tenants": args.distinct_tenants, "role": args.role,
                      "stream_workers": args.stream_workers}))


if __name__ == "__main__":
    main()
