"""The hot-path helpers for values the pipeline computed itself."""

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.trusted import json_writer

trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(trees)
def test_json_writer_writes_what_json_dumps_writes(tree):
    for ascii_only in (True, False):
        assert json_writer(ascii_only=ascii_only)(tree) == json.dumps(tree, separators=(",", ":"),
                                                                      ensure_ascii=ascii_only)


def test_json_writer_hands_other_types_to_its_default_and_refuses_them_without_one():
    assert json_writer(default=str)({"usage": Decimal("0.5")}) == '{"usage":"0.5"}'
    with pytest.raises(TypeError, match="Decimal is not JSON serializable"):
        json_writer()({"usage": Decimal("0.5")})
