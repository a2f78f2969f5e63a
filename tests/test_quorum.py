"""Judging verified copies is a pure function: cases from tests/data/quorum_cases.json,
no Dask, no network."""

from __future__ import annotations

import json
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from gpunet.kernels import Tolerance
from gpunet.verify.quorum import ACCEPT, judge, result_digest
from gpunet.wire import JobResult

CASES = json.loads((Path(__file__).parent / "data" / "quorum_cases.json").read_text())


def _result(spec) -> JobResult | None:
    """A copy's result from a case: a value, {"error": [ename, evalue]}, {"array": [...]},
    {"outputs": {name: value}} for a cell, or null for a copy that gave none."""
    if spec is None:
        return None
    result = JobResult("job", None, "tcp://127.0.0.1:1", "cpu", 0.0, 1.0)
    if isinstance(spec, dict) and "error" in spec:
        ename, evalue = spec["error"]
        result.error = {"ename": ename, "evalue": evalue, "traceback": "", "exception": None}
    elif isinstance(spec, dict) and "outputs" in spec:
        result.outputs = {name: cloudpickle.dumps(value) for name, value in spec["outputs"].items()}
    elif isinstance(spec, dict) and "array" in spec:
        result.value = cloudpickle.dumps(np.array(spec["array"]))
    else:
        result.value = cloudpickle.dumps(spec)
    return result


@pytest.mark.parametrize("case", CASES, ids=[case["description"] for case in CASES])
def test_judge(case):
    tolerance = Tolerance(case.get("rtol", 1e-5), case.get("atol", 1e-8))
    judgement = judge([_result(spec) for spec in case["results"]], tolerance, case["quorum"],
                      running=case.get("running", 0), extra_left=case.get("extra_left", 0))
    assert judgement.verdict == case["expect"]
    assert [list(group) for group in judgement.groups] == case["groups"]
    assert judgement.agreeing == (tuple(case["groups"][0]) if case["expect"] == ACCEPT else ())


def test_digests_differ_exactly_when_the_bytes_do():
    one, same, other = _result(1.5), _result(1.5), _result(1.5000001)
    assert result_digest(one) == result_digest(same)
    assert result_digest(one) != result_digest(other)
    assert result_digest(_result({"error": ["E", "x"]})) != result_digest(_result({"error": ["E", "y"]}))
