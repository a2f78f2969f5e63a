"""Provenance records (gpunet.provenance) and how `gpunet reproduce` compares and checks
them (gpunet.reproduce), on values and records made here; the records of real cells
are tested at the end, on the shared embedded network."""

from __future__ import annotations

import base64
import copy

import numpy as np
import pytest

from gpunet import codec, provenance
from gpunet.kernels import Tolerance
from gpunet.reproduce import (
    DIFFERENT,
    SAME,
    WITHIN,
    compare_cell,
    compare_output,
    html_report,
    max_differences,
)

TOL = Tolerance(1e-5, 1e-8)


def test_a_value_entry_uses_the_codec_digest_and_keeps_small_values():
    value = {"b": np.arange(4.0), "a": (1, "x")}
    entry = provenance.describe_value(value, TOL)
    assert entry["digest"] == codec.digest(value)
    assert entry["class"] == "float" and entry["tolerance"] == {"rtol": 1e-5, "atol": 1e-8, "max_mismatch": 0.0}
    kept = provenance.kept_value(entry)
    assert codec.digest(kept) == entry["digest"]
    assert provenance.describe_value(7)["class"] == "exact"


def test_a_large_float_array_keeps_a_summary_not_its_values():
    big = np.linspace(0, 1, provenance.KEEP_VALUE_BYTES)  # 8 bytes each: over the limit
    entry = provenance.describe_value(big, TOL)
    assert "value" not in entry and entry["summary"]["shape"] == [big.size]
    assert entry["summary"]["max"] == 1.0 and entry["digest"] == codec.digest(big)


def test_a_list_of_large_arrays_is_not_encoded_twice_to_find_it_is_large():
    parts = [np.zeros(provenance.KEEP_VALUE_BYTES // 8) for _ in range(3)]
    entry = provenance.describe_value(parts, TOL)
    assert "value" not in entry and entry["digest"] == codec.digest(parts)


def test_a_value_the_codec_cannot_carry_has_no_digest_and_says_why():
    entry = provenance.describe_value(object())
    assert entry["digest"] is None and "does not carry a object" in entry["no_digest"]


def test_seeds_are_found_in_the_source():
    seeds = provenance.seeds_in("import jax\nk = jax.random.key(42)\nrng = np.random.default_rng(seed)\n")
    assert seeds == [{"call": "jax.random.key", "line": 2, "seed": 42},
                     {"call": "np.random.default_rng", "line": 3, "expression": "seed"}]


def _record(code="y = x * 2", x=3, y=6.0):
    recorder = provenance.Recorder.for_cell(f"%%gpunet\n{code}", {"x": x}, map_name=None, items=None, flags={})
    record = dict(recorder.record, outputs={"y": provenance.describe_value(y, TOL)})
    return provenance.seal(record)


def test_an_intact_record_checks_out_with_its_cell():
    record = _record()
    assert provenance.check_record(record, "%%gpunet\ny = x * 2\n") == []


def test_an_edited_output_digest_is_caught_even_when_the_record_is_resealed():
    record = _record()
    record["outputs"]["y"]["digest"] = codec.digest(7.0)
    problems = provenance.check_record(record)
    assert any("record digest does not match" in p for p in problems)
    assert any("output 'y'" in p and "does not match the value kept beside it" in p for p in problems)
    resealed = provenance.seal(record)
    assert [p for p in provenance.check_record(resealed) if "output 'y'" in p]


def test_edited_code_is_caught():
    assert any("code digest" in p for p in provenance.check_record(_record(), "%%gpunet\ny = x * 3\n"))


def test_a_record_that_is_not_an_object_is_refused():
    assert provenance.check_record(["x"]) == ["the record is a list, not an object"]


def test_outputs_compare_same_within_tolerance_and_different():
    a = provenance.describe_value(np.array([1.0, 2.0]), TOL)
    same, _ = compare_output("z", a, copy.deepcopy(a))
    near, difference = compare_output("z", a, provenance.describe_value(np.array([1.0, 2.0 + 1e-7]), TOL))
    far, far_difference = compare_output("z", a, provenance.describe_value(np.array([1.0, 2.5]), TOL))
    assert (same, near, far) == (SAME, WITHIN, DIFFERENT)
    assert "max abs difference 1e-07" in difference.how
    assert "max abs difference 0.5" in far_difference.how and far_difference.rerun == "array([1. , 2.5])"


def test_large_outputs_compare_by_their_summaries():
    big = np.linspace(0, 1, provenance.KEEP_VALUE_BYTES)
    a = provenance.describe_value(big, TOL)
    assert compare_output("z", a, provenance.describe_value(big * (1 + 1e-9), TOL))[0] == WITHIN
    assert compare_output("z", a, provenance.describe_value(big * 2, TOL))[0] == DIFFERENT


def test_a_cell_whose_input_changed_is_different_and_says_which_input():
    outcome = compare_cell(3, "cell 4", [_record(x=3, y=6.0)], [_record(x=4, y=8.0)])
    assert outcome.status == DIFFERENT
    assert "input x differ from the recorded ones" in outcome.details[0]
    report = html_report("nb.ipynb", [outcome])
    assert "<pre>6.0</pre>" in report and "<pre>8.0</pre>" in report


def test_a_rerun_without_records_is_different():
    outcome = compare_cell(0, "cell 1", [_record()], [], error="NameError: name 'x' is not defined")
    assert outcome.status == DIFFERENT and "NameError" in outcome.details[0]


def test_max_differences_walks_structures():
    assert max_differences({"a": [1.0, np.array([2.0, 4.0])]}, {"a": [1.0, np.array([2.0, 5.0])]}) == (1.0, 0.25)


def test_the_text_line_is_one_discreet_line():
    record = _record()
    record.update(seconds=1.2, ran=[{"provider": "P", "device": "cpu: X", "worker": "w"}],
                  verification={"policy": "replicate:2", "verdict": "verified"},
                  payment={"metered": True, "holds": ["h_0123456789"], "credits_estimate": 3})
    line = provenance.bundle(record)["text/plain"]
    assert line == "gpunet: ran on provider P (cpu: X), 1.20 s, ≈3 credits, verified by replicate:2 · hold h_012345"


def test_a_percent_gpunet_cell_leaves_a_record(ip):
    ip.run_cell("import numpy as np\nx = 3\nxs = np.linspace(0, 1, 5)")
    result = ip.run_cell("%%gpunet\nimport numpy as np\ny = x * 2\nz = np.sin(xs) * x")
    result.raise_error()
    record = ip.user_ns["_gpunet"].provenance
    assert provenance.check_record(record, "%%gpunet\nimport numpy as np\ny = x * 2\nz = np.sin(xs) * x") == []
    assert record["inputs"]["x"]["digest"] == codec.digest(3)
    assert record["outputs"]["z"]["digest"] == codec.digest(np.sin(np.linspace(0, 1, 5)) * 3)
    assert record["outputs"]["z"]["class"] == "float"
    (ran,) = record["ran"]
    assert ran["software"]["python"] and ran["software"]["numpy"] == np.__version__
    assert ran["software"]["gpunet"] and ran["device"].startswith("cpu:")
    assert record["payment"]["metered"] and len(record["payment"]["holds"]) == 1
    assert record["verification"] == {"policy": "none", "verdict": "not verified"}


def test_net_run_and_map_from_a_notebook_leave_records(ip):
    from IPython.utils.capture import capture_output

    ip.run_cell("import gpunet\nk = 10\nnet = gpunet.current()").raise_error()
    with capture_output() as captured:  # keeps displays, as a notebook does
        ip.run_cell("v = net.run(lambda a: a + k, 5)\nvs = net.map(lambda a: a * k, [1, 2])").raise_error()
    assert (ip.user_ns["v"], ip.user_ns["vs"]) == (15, [10, 20])
    run, mapped = [output.data[provenance.MIME_TYPE] for output in captured.outputs]
    assert run["inputs"]["reads k"]["digest"] == codec.digest(10) == mapped["inputs"]["reads k"]["digest"]
    assert run["outputs"]["value"]["digest"] == codec.digest(15)
    assert mapped["kind"] == "map" and mapped["outputs"]["value"]["digest"] == codec.digest([10, 20])
    assert provenance.bundle(run)["text/plain"].startswith("gpunet: ran on provider ")
    record = provenance.Recorder.for_call(lambda a: a + 1, {"args": [5], "kwargs": {}}, flags={}).record
    assert record["kind"] == "run" and record["inputs"]["args"]["digest"] == codec.digest([5])


def test_a_record_edited_into_another_shape_is_different_not_a_crash():
    broken = _record()
    broken["outputs"]["y"]["tolerance"] = {"rtol": 1}  # no atol
    broken["outputs"]["y"]["digest"] = "sha256:0"
    outcome = compare_cell(0, "cell 1", [broken], [_record()])
    assert outcome.status == DIFFERENT and "cannot be read" in outcome.details[0]
