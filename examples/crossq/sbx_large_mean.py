"""Where sbx's BatchRenorm and normzoo's part: inputs whose mean is large against their spread.

    pip install 'normzoo[rl]'
    python -m examples.crossq.sbx_large_mean      # writes examples/crossq/results/sbx_large_mean.md

sbx computes the batch variance as ``E[x^2] - E[x]^2`` (flax's fast formula); in float32 that
loses about ``log10((mean/std)^2)`` of its 7 digits, and all of them once ``|mean| >~ 3e3 std``.
normzoo computes ``E[(x - E[x])^2]``. Both layers, in training mode with sbx's defaults
(epsilon 1e-3) and ``momentum=0`` (so the running variance is the batch variance), see the same
batch ``offset + N(0, 1)`` (256 x 8, float32); each is compared with a float64 NumPy reference of
the same formula: the largest error of the outputs and the relative error of the stored variance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

import normzoo.sbx

RESULTS = Path(__file__).resolve().parent / "results"
OFFSETS = (0.0, 10.0, 100.0, 1e3, 1e4)


def _errors(layer_cls, x: np.ndarray, epsilon: float) -> tuple[float, float]:
    layer = layer_cls(use_running_average=False, momentum=0.0, epsilon=epsilon)
    variables = layer.init(jax.random.key(0), x)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    mean, var = x64.mean(0), x64.var(0)
    reference = (x64 - mean) / np.sqrt(var + epsilon)   # scale 1, bias 0, before the warm-up ends
    out_error = float(np.max(np.abs(np.asarray(y, np.float64) - reference)))
    var_error = float(np.max(np.abs(np.asarray(updates["batch_stats"]["var"], np.float64) - var) / var))
    return out_error, var_error


def measure(offsets=OFFSETS, shape=(256, 8), epsilon: float = 1e-3, seed: int = 0) -> list[dict]:
    """One row per offset: sbx's and normzoo's output error and variance relative error."""
    from sbx.common.jax_layers import BatchRenorm as SbxBatchRenorm

    base = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    rows = []
    for offset in offsets:
        x = (base + np.float32(offset)).astype(np.float32)
        sbx_out, sbx_var = _errors(SbxBatchRenorm, x, epsilon)
        ours_out, ours_var = _errors(normzoo.sbx.BatchRenorm, x, epsilon)
        rows.append({"offset": offset, "sbx_output": sbx_out, "normzoo_output": ours_out,
                     "sbx_variance": sbx_var, "normzoo_variance": ours_var})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| input | sbx: max output error | normzoo | sbx: variance relative error | normzoo |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['offset']:g} + N(0, 1) | {r['sbx_output']:.1e} | {r['normzoo_output']:.1e} | "
                     f"{r['sbx_variance']:.1e} | {r['normzoo_variance']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = measure()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sbx_large_mean.md").write_text(table(rows))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
