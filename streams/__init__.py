"""Costline: the cost of every AI model call, attributed as it happens.

| subpackage     | what it holds                                                                 |
|----------------|-------------------------------------------------------------------------------|
| ``stages``     | the pure stages: validate, price, tag (``attribution``), quota windows        |
| ``runtime``    | the worker: batch processor, checkpoint, loop, their Kafka seams, Faust host  |
| ``storage``    | ClickHouse: tables, the sink, migrations, queries                             |
| ``messaging``  | topics, and the producer SDK applications publish usage events with          |
| ``enforcement``| the quota enforcer and its client                                             |
| ``operations`` | re-pricing, dead-letter replay and backfill, the workload simulator, child processes |

docs/architecture.md walks one batch through them.
"""
