"""Throughput of every kernel in gpunet.kernels next to its NumPy reference.

Run:  .venv/bin/python benchmarks/kernels.py [--quick]

To compare with NumPy's BLAS on a host where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
are set (they slow a current NumPy), unset both for this command alone:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/kernels.py

Every figure is measured when the script runs: JAX on its default device (the
CPU here), NumPy on the CPU. Warm-up (compilation) is excluded; each figure is
the median of several timed runs. Where the default JAX device is a GPU, the
matmul and bandwidth figures are also printed as a fraction of the device's
spec-sheet peak; where it is not, the script says that no GPU figure was
measured and prints none. Prints; never fails on a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gpunet.kernels import frames, mlp, montecarlo, nbody, probe, render

# Vendor spec-sheet peaks (dense, no sparsity), by a substring of JAX's device_kind:
# (float32 TFLOP/s without tensor cores, TF32 TFLOP/s, bfloat16 TFLOP/s, memory GB/s).
# They are denominators only; the numerators are always measured.
GPU_PEAKS: dict[str, tuple[float, float, float, float]] = {
    "H200": (67.0, 494.7, 989.4, 4800.0),
    "H100 NVL": (60.0, 417.5, 835.0, 3900.0),
    "H100 PCIe": (51.0, 378.0, 756.0, 2000.0),
    "H100": (67.0, 494.7, 989.4, 3350.0),  # SXM5 80GB HBM3
    "A100-SXM4-80GB": (19.5, 156.0, 312.0, 2039.0),
    "A100 80GB PCIe": (19.5, 156.0, 312.0, 1935.0),
    "A100": (19.5, 156.0, 312.0, 1555.0),  # 40GB
    "L40S": (91.6, 183.0, 362.0, 864.0),
    "L4": (30.3, 60.0, 121.0, 300.0),
    "A10": (31.2, 62.5, 125.0, 600.0),
}


def timed(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median wall seconds of ``fn()`` (its result blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed_pair(
    first: Callable[[], Any], second: Callable[[], Any], repeat: int = 7, pause: float = 0.25
) -> tuple[float, float]:
    """Median seconds of two functions timed alternately, so that a busy neighbour on a
    shared host slows both alike (after one warm-up call each).

    Each timed call waits ``pause`` seconds first: BLAS and XLA worker threads spin for
    a while after a call, and without the pause one library's spinning threads take
    cores from the other's next call (measured here: NumPy right before JAX cost JAX
    about a third of its matmul rate).
    """
    jax.block_until_ready(first())
    jax.block_until_ready(second())
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in zip((first, second), samples):
            time.sleep(pause)
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def row(name: str, unit: str, jax_value: float, numpy_value: float | None, note: str = "") -> None:
    ratio = f"{jax_value / numpy_value:6.2f}x" if numpy_value else "     - "
    ref = f"{numpy_value:10.2f}" if numpy_value is not None else "         -"
    print(f"{name:<34} {unit:<14} {jax_value:10.2f} {ref} {ratio}  {note}")


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed: BLAS kernel not shown"
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(
        f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} threads={i.get('num_threads')}"
        for i in libs
    ) or "no BLAS found by threadpoolctl"


def bench_matmul(n: int) -> tuple[float, float]:
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    flops = 2.0 * n**3
    f32 = jax.jit(lambda x, y: x @ y)
    an, bn = np.asarray(a), np.asarray(b)
    jax_s, np_s = timed_pair(lambda: f32(a, b), lambda: an @ bn)
    jax_f32, np_f32 = flops / jax_s / 1e9, flops / np_s / 1e9
    row(f"matmul float32 n={n}", "GFLOP/s", jax_f32, np_f32, "aim: within 20% of NumPy's BLAS (timed alternately)")
    bf = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    jax_bf16 = flops / timed(lambda: bf(a16, b16), 7) / 1e9
    row(f"matmul bfloat16 n={n}", "GFLOP/s", jax_bf16, np_f32, "vs NumPy float32 (NumPy has no bfloat16 BLAS)")
    return jax_f32, jax_bf16


def bench_stream(elements: int) -> float:
    jax_gbs = probe.stream_bandwidth(elements, device=jax.devices("cpu")[0], budget_s=0.5)
    x = np.ones(elements, np.float32)
    y = np.empty_like(x)

    def numpy_stream() -> None:
        np.multiply(x, np.float32(1.000001), out=y)
        np.add(y, np.float32(0.5), out=y)

    np_gbs = 8.0 * elements / timed(numpy_stream, 7) / 1e9
    row(f"stream y=a*x+b {elements * 4 >> 20} MiB", "GB/s", jax_gbs, np_gbs, "read+write of x and y counted once")
    return jax_gbs


def bench_montecarlo(n: int) -> None:
    key = jax.random.key(0)
    spec = montecarlo.EuropeanOption(100.0, 105.0, 0.03, 0.2, 1.0)
    jax_rate = n / timed(lambda: montecarlo.price_chunk(key, spec, 0, n)) / 1e6
    rng = np.random.default_rng(0)
    m = max(n // 10, 1)
    np_rate = m / timed(lambda: montecarlo.reference(spec, rng.standard_normal(m)), 3) / 1e6
    row(f"montecarlo {n:,} paths", "Mpaths/s", jax_rate, np_rate, "NumPy: PCG64 normals + float64 payoff")


def bench_nbody(n: int, steps: int) -> None:
    state = nbody.init(jax.random.key(0), n)
    seconds = timed(lambda: nbody.simulate(state, 0.001, steps), 3)
    jax_rate = n * n * steps / seconds / 1e9
    ref_steps = 2
    ref_seconds = timed(lambda: nbody.reference(state, 0.001, ref_steps), 1)
    np_rate = n * n * (ref_steps + 1) / ref_seconds / 1e9  # reference: one extra force evaluation
    gflops = nbody.cost(n, steps).flops / seconds / 1e9
    row(f"nbody N={n} x {steps} steps", "Ginteract/s", jax_rate, np_rate, f"= {gflops:.1f} GFLOP/s at 20 FLOP/pair")


def bench_render(size: int, max_iter: int) -> None:
    view = render.View(height=size, width=size, max_iter=max_iter)
    image = np.asarray(render.render(view))
    iterations = float(image.sum())
    jax_rate = iterations / timed(lambda: render.render(view), 3) / 1e6
    small = view._replace(height=size // 2, width=size // 2)
    small_iters = float(render.reference(small).sum())
    np_rate = small_iters / timed(lambda: render.reference(small), 1) / 1e6
    row(f"render {size}x{size} max_iter={max_iter}", "Miter/s", jax_rate, np_rate, "pixel iterations")


def bench_mlp(batch: int, sizes: tuple[int, ...]) -> None:
    x, y = mlp.make_data(jax.random.key(0), batch, sizes[0], sizes[-1])
    params = mlp.init(jax.random.key(1), sizes)
    opt = mlp.sgd(0.01)
    state = opt.init(params)
    seconds = timed(lambda: mlp.train_step(params, state, x, y, opt), 7)
    xn, yn = np.asarray(x), np.asarray(y)
    np_seconds = timed(lambda: mlp.reference(params, xn, yn, 0.01, 1), 3)
    flops = mlp.cost(batch, sizes).flops
    row(f"mlp SGD step B={batch} {'-'.join(map(str, sizes))}", "GFLOP/s", flops / seconds / 1e9,
        flops / np_seconds / 1e9, "NumPy: float64 hand-written backprop")


def bench_frames(n_rows: int, n_groups: int) -> None:
    df = frames.make_frame(0, n_rows, n_groups)
    rate = n_rows / timed(lambda: frames.aggregate(df, backend="pandas"), 5) / 1e6
    np_rate = n_rows / timed(lambda: frames.reference(df), 3) / 1e6
    row(f"frames group-by {n_rows:,} rows", "Mrows/s", rate, np_rate, "pandas backend (cuDF only on a GPU)")


def spec_peak(kind: str) -> tuple[float, float, float, float] | None:
    """Spec-sheet peaks for a device kind, or None where the table has no entry."""
    return next((v for k, v in GPU_PEAKS.items() if k.lower() in kind.lower()), None)


def gpu_section(device: Any, cap: probe.Capability, quick: bool) -> None:
    """Figures measured on the GPU, and each as a fraction of the spec-sheet peak."""
    kind = cap.device.kind
    peak = spec_peak(kind)
    print(f"\nOn the GPU {kind} (measured now; peaks from the vendor's spec sheet, dense):")
    print(f"  probe: float32 {cap.tflops_f32:.1f} TFLOP/s, TF32 {cap.tflops_tf32 or 0:.1f}, "
          f"bfloat16 {cap.tflops_bf16 or 0:.1f}, bandwidth {cap.bandwidth_gbs:.0f} GB/s")
    if peak is None:
        print(f"  no spec-sheet peak known for {kind!r}: no fraction printed")
    else:
        f32, tf32, bf16, gbs = peak
        print(f"  fraction of peak: float32 {cap.tflops_f32 / f32:.0%}, TF32 {(cap.tflops_tf32 or 0) / tf32:.0%}, "
              f"bfloat16 {(cap.tflops_bf16 or 0) / bf16:.0%}, bandwidth {cap.bandwidth_gbs / gbs:.0%}")
    f32_peak = peak[0] * 1e12 if peak else None
    gbs_peak = peak[3] * 1e9 if peak else None

    def report(name: str, cost: Any, seconds: float, bound: str) -> None:
        flops, moved = cost.flops / seconds, cost.bytes / seconds
        frac = ""
        if bound == "flops" and f32_peak:
            frac = f"  {flops / f32_peak:.0%} of float32 peak"
        elif bound == "bytes" and gbs_peak:
            frac = f"  {moved / gbs_peak:.0%} of bandwidth peak"
        print(f"  {name:<36} {flops / 1e12:8.2f} TFLOP/s {moved / 1e9:8.1f} GB/s{frac}")

    with jax.default_device(device):
        try:
            n_paths = 50_000_000 if quick else 500_000_000
            key = jax.random.key(0)
            spec = montecarlo.EuropeanOption(100.0, 105.0, 0.03, 0.2, 1.0)
            report(f"montecarlo {n_paths:,} paths", montecarlo.cost(n_paths),
                   timed(lambda: montecarlo.price_chunk(key, spec, 0, n_paths), 3), "flops")
            n, steps = (8192, 5) if quick else (32768, 10)
            state = nbody.init(jax.random.key(0), n)
            report(f"nbody N={n} x {steps} steps", nbody.cost(n, steps),
                   timed(lambda: nbody.simulate(state, 0.001, steps), 3), "flops")
            view = render.View(height=2048, width=2048, max_iter=1024)
            iters = int(np.asarray(render.render(view)).sum())
            report("render 2048x2048 max_iter=1024", render.cost(2048, 2048, 1024, iters),
                   timed(lambda: render.render(view), 3), "flops")
            sizes, batch = (1024, 4096, 4096, 10), 16384
            x, y = mlp.make_data(jax.random.key(0), batch, sizes[0], sizes[-1])
            params = mlp.init(jax.random.key(1), sizes)
            opt = mlp.sgd(0.01)
            state0 = opt.init(params)
            report(f"mlp SGD step B={batch} {'-'.join(map(str, sizes))}", mlp.cost(batch, sizes),
                   timed(lambda: mlp.train_step(params, state0, x, y, opt), 5), "flops")
        except Exception as exc:  # noqa: BLE001 - print what failed; never invent a figure
            print(f"  a GPU kernel benchmark failed, so no further GPU figure: {type(exc).__name__}: {exc}")
    if frames.backend() == "cudf":
        df = frames.make_frame(0, 10_000_000, 1000)
        report("frames group-by 10,000,000 rows (cuDF)", frames.cost(len(df), 1000),
               timed(lambda: frames.aggregate(df, backend="cudf"), 5), "bytes")
    else:
        print("  frames: cuDF not available here, no GPU figure")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    args = parser.parse_args(argv)
    quick = args.quick
    device = jax.devices()[0]
    info = probe.describe_device(device)
    cpu = probe.describe_device(jax.devices("cpu")[0])
    print(f"JAX {jax.__version__}, NumPy {np.__version__}; CPU: {cpu.kind} ({cpu.cores} cores); "
          f"JAX's default device: {info.platform} {info.kind}")
    print(f"NumPy BLAS: {blas_info()}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"note: {var}={os.environ[var]} is set; it slows NumPy (see the docstring)")
    print("\nOn the CPU, JAX next to NumPy (median of several runs, compilation excluded):")
    print(f"{'kernel':<34} {'unit':<14} {'JAX':>10} {'NumPy':>10} {'JAX/NumPy':>7}")
    with jax.default_device(jax.devices("cpu")[0]):
        bench_matmul(1024 if quick else 2048)
        bench_stream((8 if quick else 64) * 2**20)
        bench_montecarlo(2_000_000 if quick else 20_000_000)
        bench_nbody(512 if quick else 2048, 5 if quick else 20)
        bench_render(256 if quick else 512, 256)
        bench_mlp(1024 if quick else 4096, (64, 512, 512, 10))
        bench_frames(1_000_000 if quick else 10_000_000, 1000)
    if info.platform == "gpu":
        gpu_section(device, probe.probe(device, seconds=3.0), quick)
    else:
        print(f"\nNo GPU present (JAX's default device is {info.platform}): no GPU figure measured, "
              "so no fraction of a GPU's peak is printed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
