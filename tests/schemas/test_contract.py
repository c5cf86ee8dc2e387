import pytest

from schemas.export import stale_files
from streams.settings import Settings, SettingsError


def test_json_schema_files_are_current():
    assert stale_files() == [], "run: python -m schemas.export"


def test_settings_defaults_and_prefix(tmp_path):
    s = Settings.from_env({"COSTLINE_HOME": str(tmp_path), "COSTLINE_TOPIC_PREFIX": "stg."})
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert s.clickhouse_url == f"chdb://{tmp_path.resolve()}/chdb"
    assert s.topics.raw == "stg.usage.raw" and s.topics.state == "stg.quota.state"


def test_bad_setting_names_the_variable():
    with pytest.raises(SettingsError, match=r"COSTLINE_PARTITIONS='zero' is invalid"):
        Settings.from_env({"COSTLINE_PARTITIONS": "zero"})
