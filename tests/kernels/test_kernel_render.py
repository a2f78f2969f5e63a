"""Mandelbrot rendering: tiles assemble into the one-call image, reference agrees."""

from __future__ import annotations

import numpy as np
import pytest
from gpunet.kernels import allclose, compare, render

VIEW = render.View(height=61, width=83, max_iter=120)


@pytest.fixture(scope="module")
def whole() -> np.ndarray:
    return np.asarray(render.render(VIEW))


def test_matches_numpy_reference(whole: np.ndarray) -> None:
    ref = render.reference(VIEW)
    assert whole.dtype == np.int32 and whole.shape == (61, 83)
    assert compare(whole, ref, render.tolerance) is None
    assert whole.min() >= 1 and whole.max() == VIEW.max_iter  # the set is in view


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 1), (5, 7)])
def test_tiles_assemble_exactly(whole: np.ndarray, grid: tuple[int, int]) -> None:
    parts = [(t, render.render_tile(VIEW, t)) for t in render.tiles(VIEW, *grid)]
    image = render.assemble(VIEW, parts[::-1])
    assert np.array_equal(image, whole)
    assert allclose(image, whole, render.tolerance._replace(max_mismatch=0.0))


def test_a_tile_matches_the_reference_of_that_tile() -> None:
    tile = render.Tile(row=10, col=20, height=13, width=9)
    assert compare(render.render_tile(VIEW, tile), render.reference(VIEW, tile), render.tolerance) is None


def test_zoomed_view_differs_and_stays_exact_in_tiles() -> None:
    view = render.View(-0.75, -0.73, 0.1, 0.12, height=40, width=40, max_iter=300)
    img = np.asarray(render.render(view))
    parts = [(t, render.render_tile(view, t)) for t in render.tiles(view, 3, 3)]
    assert np.array_equal(render.assemble(view, parts), img)
    assert img.std() > 0


def test_assemble_rejects_gaps_and_overlaps(whole: np.ndarray) -> None:
    tiles = render.tiles(VIEW, 2, 2)
    parts = [(t, whole[t.row : t.row + t.height, t.col : t.col + t.width]) for t in tiles]
    with pytest.raises(ValueError, match="covered 0 times"):
        render.assemble(VIEW, parts[1:])
    with pytest.raises(ValueError, match="covered 2 times"):
        render.assemble(VIEW, parts + parts[:1])


def test_colorize_shape() -> None:
    rgb = render.colorize(np.array([[1, 120]]), 120)
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8 and rgb[0, 1].sum() == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: render.render(VIEW._replace(width=0)), "Expected width to be an int >= 1, got 0"),
        (lambda: render.render(VIEW._replace(x_max=-3.0)), "x_max > x_min"),
        (lambda: render.render_tile(VIEW, render.Tile(60, 0, 2, 5)), "inside the 61x83 image"),
        (lambda: render.tiles(VIEW, 0, 2), "got rows=0, cols=2"),
    ],
)
def test_bad_inputs_name_the_value(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()


def test_cost_worst_case_and_actual(whole: np.ndarray) -> None:
    worst = render.cost(61, 83, 120)
    actual = render.cost(61, 83, 120, iterations=int(whole.sum()))
    assert actual.flops <= worst.flops and worst.bytes == 4 * 61 * 83


@pytest.mark.parametrize("max_iter", [1, render.UNROLL - 1, render.UNROLL, render.UNROLL + 1])
def test_iteration_cap_is_exact_around_the_unroll(max_iter: int) -> None:
    view = VIEW._replace(max_iter=max_iter)
    got = np.asarray(render.render(view))
    assert got.max() == max_iter and got.min() >= 1
    assert compare(got, render.reference(view), render.tolerance) is None
