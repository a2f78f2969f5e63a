"""The reuse table and keys (gpunet.reuse), pure."""

from __future__ import annotations

from gpunet import provenance
from gpunet.reuse import ReuseTable, reuse_key


def _record(code="y = x + 1", **inputs):
    return provenance.Recorder.for_cell(code, inputs, map_name=None, items=None, flags={"verify": "replicate"}).record


def test_the_key_follows_code_and_inputs_only():
    assert reuse_key(_record(x=1)) == reuse_key(_record(x=1))
    assert reuse_key(_record(x=1)) != reuse_key(_record(x=2))
    assert reuse_key(_record("y = x + 2", x=1)) != reuse_key(_record(x=1))


def test_an_input_without_a_digest_has_no_key():
    assert reuse_key(_record(x=object())) is None


def test_the_table_drops_the_least_recently_used_and_refuses_what_is_too_large():
    table = ReuseTable(max_bytes=100, max_entry_bytes=60)
    assert table.put("a", {"v": 1}, 50) and table.put("b", {"v": 2}, 40)
    assert table.get("a") == {"v": 1}  # a is now the most recently used
    assert table.put("c", {"v": 3}, 30)
    assert table.get("b") is None and table.get("a") == {"v": 1} and table.size == 80
    assert not table.put("d", {"v": 4}, 61) and len(table) == 2
