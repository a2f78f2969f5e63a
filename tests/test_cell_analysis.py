"""Cell inputs and outputs found with ast, checked against cases in tests/data/cells.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpunet.cell import analyze
from gpunet.errors import CellSyntaxError

CASES = json.loads((Path(__file__).parent / "data" / "cells.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[case["description"] for case in CASES])
def test_inputs_and_outputs(case):
    analysis = analyze(case["code"])
    assert list(analysis.inputs) == case["inputs"]
    assert list(analysis.outputs) == case["outputs"]


def test_last_expression_is_displayed_unless_silenced():
    assert analyze("x = 1\nx").displays_last_expression
    assert not analyze("x = 1\nx;").displays_last_expression
    assert not analyze("x = 1").displays_last_expression


def test_syntax_error_names_the_line():
    with pytest.raises(CellSyntaxError) as caught:
        analyze("a = 1\nb = 2\nc = (3\n")
    assert caught.value.lineno in (3, 4)
    assert "syntax error at line" in str(caught.value)
    assert "Nothing was sent" in str(caught.value)


def test_digest_identifies_the_code():
    assert analyze("x = 1").digest == analyze("x = 1").digest != analyze("x = 2").digest


def test_magic_syntax_gets_a_hint():
    with pytest.raises(CellSyntaxError, match="magics and shell escapes"):
        analyze("x = 1\n!ls\n")
