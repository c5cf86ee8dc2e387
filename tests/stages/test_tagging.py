from datetime import UTC, datetime

import pytest

from schemas.usage import TokenUsage, UsageEvent
from streams.config import ConfigError
from streams.stages.tagging import UNATTRIBUTED, PathRules

RULES = """
rules:
  - path: support-bot/answer
    when: {service: support-bot, feature: [answer, answer-v*]}
  - path: "evals/{tags[suite]}"
    when: {tags: {suite: "*"}}
  - path: "premium/{service}"
    when: {tenant_id: "vip-*", service: "*"}
  - path: "{service}/{feature}"
    when: {service: "*"}
"""


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "paths.yaml"
    path.write_text(RULES)
    return PathRules.from_file(path)


def event(**context):
    tenant = context.pop("tenant_id", "acme")
    return UsageEvent(event_id="e", timestamp=datetime(2026, 6, 1, tzinfo=UTC), tenant_id=tenant, provider="openai",
                      model="gpt-4o", usage=TokenUsage(input_tokens=1), **context)


@pytest.mark.parametrize(("context", "path"), [
    ({"service": "support-bot", "feature": "answer"}, "support-bot/answer"),
    ({"service": "support-bot", "feature": "answer-v2", "tags": {"suite": "x"}}, "support-bot/answer"),  # first wins
    ({"service": "search", "tags": {"suite": "regression"}}, "evals/regression"),
    ({"service": "search", "tenant_id": "vip-7"}, "premium/search"),
    ({"service": "search", "feature": "summarize"}, "search/summarize"),
    ({"service": "search"}, UNATTRIBUTED),       # the template needs a feature the event lacks
    ({"feature": "answer"}, UNATTRIBUTED),       # no service: "*" does not match a missing field
    ({"service": "Support-Bot", "feature": "answer"}, "Support-Bot/answer"),  # globs are case-sensitive
])
def test_first_matching_rule_names_the_path(rules, context, path):
    assert rules.path_for(event(**context)) == path


def test_no_file_means_everything_is_unattributed(tmp_path):
    assert PathRules.from_file(tmp_path / "missing.yaml").path_for(event(service="a", feature="b")) == UNATTRIBUTED


@pytest.mark.parametrize(("text", "message"), [
    ("rules: [{path: x, when: {servise: a}}]", "rules.0.when.servise: Extra inputs are not permitted"),
    ("rules: [{when: {service: a}}]", "rules.0.path: Field required"),
    ("rules: [{path: '{tags}'}]", "unknown placeholder {tags}"),
])
def test_bad_rules_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "paths.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        PathRules.from_file(path)


def test_shipped_config_files_are_valid():
    from pathlib import Path

    from streams.stages.attribution import Attribution

    attribution = Attribution.from_config_dir(Path(__file__).resolve().parents[2] / "config")
    assert attribution.pricer.version == "genai-prices 0.2.3; prices.yaml r1"
    assert attribution.paths.path_for(event(service="support-bot", feature="answer")) == "support-bot/answer"
