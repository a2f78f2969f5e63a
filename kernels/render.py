"""Mandelbrot escape-time image, rendered in tiles that assemble into the whole.

Pixel ``(row, col)`` of an ``height x width`` image of :class:`View` samples the
point ``c = (x_min + (col + 0.5) * dx) + i (y_max - (row + 0.5) * dy)`` with
``dx = (x_max - x_min) / width`` and ``dy = (y_max - y_min) / height``, and its
value is the number of iterations of ``z <- z^2 + c`` (from ``z = 0``) before
``|z| > 2``, capped at ``max_iter`` (points that never escape read ``max_iter``).

``c`` depends only on the pixel's global indices, computed with the same
float32 operations whatever tile it falls in, so tiles rendered anywhere (any
sizes, uneven ones included) assemble into exactly the image of one render on
the same kind of device: the integer counts match bit for bit. Between devices
that fuse multiply-adds differently (and against the NumPy reference, which
does not fuse) a few pixels on the set's boundary differ, which
:data:`tolerance` allows.

Cost model for ``P = height * width`` pixels: each iteration of a pixel costs
``FLOPS_PER_ITER = 8`` FLOPs (``zr^2``, ``zi^2``, their sum for the escape test,
their difference plus ``cr``, ``2 zr zi + ci``); the worst case is
``8 * P * max_iter``, and the real count is ``8 * sum(counts)``, which a coarse
preview gives cheaply. Bytes: the ``4 * P`` of the int32 image written once; the
iteration stays in registers.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Chunk, Cost, Tolerance, chunks

logger = logging.getLogger(__name__)

__all__ = [
    "Tile",
    "View",
    "assemble",
    "colorize",
    "cost",
    "reference",
    "render",
    "render_tile",
    "tiles",
    "tolerance",
]

FLOPS_PER_ITER = 8.0
#: Iterations per test of the loop condition (speed only; counts do not change).
UNROLL = 8

#: Same device kind: exact. Between devices, or against the NumPy reference, up
#: to 1% of pixels may differ: XLA contracts ``zr*zr - zi*zi + cr`` into fused
#: multiply-adds (NumPy does not), and on the boundary of the set one rounding
#: changes the escape step. Measured against the reference: 0.2-0.3% of pixels
#: (39 of 12,707 at 97x131, 643 of 288,000 at 480x600, max_iter 200-256).
tolerance = Tolerance(rtol=0.0, atol=0.0, max_mismatch=1e-2)


class View(NamedTuple):
    """The region of the complex plane, image size in pixels, and iteration cap."""

    x_min: float = -2.2
    x_max: float = 0.8
    y_min: float = -1.2
    y_max: float = 1.2
    height: int = 480
    width: int = 600
    max_iter: int = 256


class Tile(NamedTuple):
    """Rows ``row .. row + height - 1`` and columns ``col .. col + width - 1``."""

    row: int
    col: int
    height: int
    width: int


def _check_view(view: View) -> None:
    if not isinstance(view, View):
        raise TypeError(f"Expected a render.View, got {type(view).__name__}: {view!r}")
    if not view.x_max > view.x_min or not view.y_max > view.y_min:
        raise ValueError(f"Expected x_max > x_min and y_max > y_min, got {view!r}")
    for name in ("height", "width", "max_iter"):
        value = getattr(view, name)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"Expected {name} to be an int >= 1, got {value!r}")


def _check_tile(view: View, tile: Tile) -> None:
    row, col, h, w = tile
    if h < 1 or w < 1 or row < 0 or col < 0 or row + h > view.height or col + w > view.width:
        raise ValueError(
            f"Expected a tile of at least 1x1 inside the {view.height}x{view.width} image, got {tile!r}"
        )


_Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


def _escape_counts(c_re: jax.Array, c_im: jax.Array, max_iter: jax.Array) -> jax.Array:
    def cond(s: _Carry) -> jax.Array:
        i, _, _, _, active = s
        return (i < max_iter) & jnp.any(active)

    def body(s: _Carry) -> _Carry:
        i, zr, zi, count, active = s
        # UNROLL iterations per loop test: the test (an all-pixel reduction, and on
        # a GPU a predicate read back by the host) runs UNROLL times less often.
        # Iterations past max_iter are masked off, so the counts are unchanged.
        for k in range(UNROLL):
            live = active & (i + k < max_iter)
            zr2 = zr * zr
            zi2 = zi * zi
            new_zr = zr2 - zi2 + c_re
            new_zi = 2.0 * zr * zi + c_im
            zr = jnp.where(live, new_zr, zr)
            zi = jnp.where(live, new_zi, zi)
            count = count + live.astype(jnp.int32)
            active = active & ~(live & (zr * zr + zi * zi > 4.0))
        return i + UNROLL, zr, zi, count, active

    zeros = jnp.zeros_like(c_re)
    start: _Carry = (jnp.int32(0), zeros, zeros, jnp.zeros(c_re.shape, jnp.int32), jnp.ones(c_re.shape, bool))
    _, _, _, count, _ = jax.lax.while_loop(cond, body, start)
    return count


def _render_tile(
    view_f: jax.Array, max_iter: jax.Array, row: jax.Array, col: jax.Array, shape: tuple[int, int]
) -> jax.Array:
    x_min, x_max, y_min, y_max, height, width = view_f
    dx = (x_max - x_min) / width
    dy = (y_max - y_min) / height
    rows = (row + jnp.arange(shape[0], dtype=jnp.int32)).astype(jnp.float32)
    cols = (col + jnp.arange(shape[1], dtype=jnp.int32)).astype(jnp.float32)
    c_re = x_min + (cols + 0.5) * dx
    c_im = y_max - (rows + 0.5) * dy
    c_re, c_im = jnp.broadcast_to(c_re[None, :], shape), jnp.broadcast_to(c_im[:, None], shape)
    return _escape_counts(c_re, c_im, max_iter)


_render_tile_jit = jax.jit(_render_tile, static_argnums=(4,))


def _view_args(view: View) -> tuple[jax.Array, jax.Array]:
    f = jnp.asarray([view.x_min, view.x_max, view.y_min, view.y_max, view.height, view.width], jnp.float32)
    return f, jnp.int32(view.max_iter)


def render_tile(view: View, tile: Tile) -> jax.Array:
    """Escape counts of one tile, ``int32 (tile.height, tile.width)``.

    The view's numbers and the tile's position are traced (one compilation per
    tile shape). Cost: ``cost(tile.height, tile.width, view.max_iter)`` at most.
    """
    _check_view(view)
    tile = Tile(*(int(v) for v in tile))
    _check_tile(view, tile)
    f, max_iter = _view_args(view)
    return _render_tile_jit(f, max_iter, jnp.int32(tile.row), jnp.int32(tile.col), (tile.height, tile.width))


def render(view: View) -> jax.Array:
    """The whole image in one call, ``int32 (view.height, view.width)``."""
    _check_view(view)
    return render_tile(view, Tile(0, 0, view.height, view.width))


def tiles(view: View, rows: int, cols: int) -> list[Tile]:
    """Split the image into a ``rows x cols`` grid of tiles (uneven sizes allowed)."""
    _check_view(view)
    if rows < 1 or cols < 1 or rows > view.height or cols > view.width:
        raise ValueError(
            f"Expected 1 <= rows <= {view.height} and 1 <= cols <= {view.width}, got rows={rows}, cols={cols}"
        )
    row_chunks: list[Chunk] = chunks(view.height, rows)
    col_chunks: list[Chunk] = chunks(view.width, cols)
    return [Tile(r.start, c.start, r.count, c.count) for r in row_chunks for c in col_chunks]


def assemble(view: View, parts: list[tuple[Tile, np.ndarray]]) -> np.ndarray:
    """Put rendered tiles back together; every pixel must be covered exactly once."""
    _check_view(view)
    image = np.zeros((view.height, view.width), np.int32)
    covered = np.zeros((view.height, view.width), np.int32)
    for tile, counts in parts:
        _check_tile(view, Tile(*tile))
        counts = np.asarray(counts)
        if counts.shape != (tile.height, tile.width):
            raise ValueError(f"Expected counts of shape {(tile.height, tile.width)} for {tile!r}, got {counts.shape}")
        image[tile.row : tile.row + tile.height, tile.col : tile.col + tile.width] = counts
        covered[tile.row : tile.row + tile.height, tile.col : tile.col + tile.width] += 1
    if not np.all(covered == 1):
        bad = np.argwhere(covered != 1)[0]
        raise ValueError(
            f"Expected tiles to cover every pixel exactly once; pixel {tuple(bad)} is covered "
            f"{covered[tuple(bad)]} times"
        )
    return image


def reference(view: View, tile: Tile | None = None) -> np.ndarray:
    """NumPy float32 escape counts: the kernel's arithmetic without fused multiply-adds."""
    _check_view(view)
    tile = Tile(0, 0, view.height, view.width) if tile is None else Tile(*tile)
    _check_tile(view, tile)
    f32 = np.float32
    x_min, x_max, y_min, y_max = (f32(v) for v in view[:4])
    dx = (x_max - x_min) / f32(view.width)
    dy = (y_max - y_min) / f32(view.height)
    cols = np.arange(tile.col, tile.col + tile.width).astype(f32)
    rows = np.arange(tile.row, tile.row + tile.height).astype(f32)
    c_re = np.broadcast_to(x_min + (cols + f32(0.5)) * dx, (tile.height, tile.width))
    c_im = np.broadcast_to((y_max - (rows + f32(0.5)) * dy)[:, None], (tile.height, tile.width))
    zr = np.zeros(c_re.shape, f32)
    zi = np.zeros(c_re.shape, f32)
    count = np.zeros(c_re.shape, np.int32)
    active = np.ones(c_re.shape, bool)
    for _ in range(view.max_iter):
        if not active.any():
            break
        new_zr = zr * zr - zi * zi + c_re
        new_zi = f32(2.0) * zr * zi + c_im
        zr = np.where(active, new_zr, zr)
        zi = np.where(active, new_zi, zi)
        count += active
        active &= ~(zr * zr + zi * zi > f32(4.0))
    return count


def colorize(counts: np.ndarray, max_iter: int) -> np.ndarray:
    """``uint8 (H, W, 3)`` picture of escape counts (inside of the set black)."""
    counts = np.asarray(counts)
    t = np.sqrt(counts / float(max_iter))
    rgb = np.stack([9 * (1 - t) * t**3, 15 * (1 - t) ** 2 * t**2, 8.5 * (1 - t) ** 3 * t], axis=-1)
    rgb = np.clip(rgb * 255 * 1.5, 0, 255).astype(np.uint8)
    rgb[counts >= max_iter] = 0
    return rgb


def cost(height: int, width: int, max_iter: int, iterations: int | None = None) -> Cost:
    """FLOPs and bytes of rendering ``height x width`` pixels (worst case unless
    ``iterations``, the sum of the escape counts, is known)."""
    if height < 0 or width < 0 or max_iter < 0:
        raise ValueError(f"Expected height, width, max_iter >= 0, got {height}, {width}, {max_iter}")
    pixels = float(height) * width
    iters = float(iterations) if iterations is not None else pixels * max_iter
    return Cost(FLOPS_PER_ITER * iters, 4.0 * pixels)
