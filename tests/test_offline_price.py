"""`costline price`: JSON lines in, one JSON line out per input, no Kafka and no ClickHouse."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_price(lines: list[str], config_dir: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "streams.cli", "price"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COSTLINE_CONFIG_DIR": str(config_dir)})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_one_output_line_per_input_line_and_errors_do_not_stop_it(tmp_path):
    (tmp_path / "paths.yaml").write_text("rules:\n  - path: support-bot/answer\n    when: {service: support-bot}\n")
    base = {"timestamp": "2026-06-01T12:00:00Z", "tenant_id": "acme", "service": "support-bot"}
    lines = [
        json.dumps({**base, "event_id": "a", "provider": "anthropic", "model": "claude-sonnet-4-5",
                    "raw_usage": {"input_tokens": 100, "cache_creation_input_tokens": 2000,
                                  "cache_read_input_tokens": 5000, "output_tokens": 300}}),
        '{"event_id": "b", "timestamp": ',
        json.dumps({**base, "event_id": "c", "provider": "openai", "model": "gpt-4o",
                    "usage": {"input_tokens": -1}}),
        json.dumps({**base, "event_id": "d", "provider": "acme-ai", "model": "homegrown-1",
                    "usage": {"input_tokens": 10, "output_tokens": 1}}),
        json.dumps({**base, "event_id": "e", "provider": "openai", "model": "gpt-4o-mini",
                    "usage": {"input_tokens": 1, "cache_read_tokens": 1}, "service": "search"}),
    ]
    out = run_price(lines, tmp_path)
    assert len(out) == 5
    a, b, c, d, e = out
    assert (a["event_id"], a["cost_usd"], a["priced"], a["business_path"]) == ("a", "0.013800000000", True,
                                                                              "support-bot/answer")
    assert a["cost"] == {"input": "0.000300000000", "cache_read": "0.001500000000", "cache_write": "0.007500000000",
                         "output": "0.004500000000", "reasoning": "0.000000000000", "input_audio": "0.000000000000",
                         "input_image": "0.000000000000", "output_audio": "0.000000000000",
                         "output_image": "0.000000000000", "request": "0.000000000000"}
    assert a["raw_usage_format"] == "anthropic_messages" and a["matched_model"] == "claude-sonnet-4-5"
    assert b == {"event_id": None, "error": b["error"]} and b["error"].startswith("invalid_json: ")
    assert c["event_id"] == "c" and c["error"].startswith("invalid_event: usage.input_tokens")
    assert (d["priced"], d["cost_usd"]) == (False, "0.000000000000") and "homegrown-1" in d["unpriced_reason"]
    assert (e["cost_usd"], e["business_path"]) == ("0.000000075000", "unattributed")


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "paths.yaml").write_text("rules:\n  - path: '{nope}'\n")
    done = subprocess.run([sys.executable, "-m", "streams.cli", "price"], input="", capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", "COSTLINE_CONFIG_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == (f"costline: error: {tmp_path / 'paths.yaml'}: rules.0.path: Value error, "
                                   "unknown placeholder {nope}: use one of service, route, feature, step, provider, "
                                   "model, tenant_id or tags[name]")
