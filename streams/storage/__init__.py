"""ClickHouse: table encodings, the one sink every write goes through, migrations and queries."""
