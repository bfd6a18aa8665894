"""The figure of docs/layers.md: how far each BatchNorm's batch variance is from the truth when the
inputs' mean is large against their spread (float32, 256 x 8 batches of offset + N(0, 1)).

    python -m docs.figures.large_mean        # writes docs/figures/large_mean.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

import normzoo

OUT = Path(__file__).resolve().parent / "large_mean.png"
OFFSETS = np.logspace(0, 5, 11)


def variance_errors(offsets=OFFSETS, seed: int = 0) -> dict[str, np.ndarray]:
    """Relative error of the stored batch variance (momentum 0) per layer, per offset."""
    layers = {"flax BatchNorm (default: fast variance)": nn.BatchNorm(use_running_average=False, momentum=0.0),
              "flax BatchNorm (use_fast_variance=False)": nn.BatchNorm(use_running_average=False, momentum=0.0,
                                                                       use_fast_variance=False),
              "normzoo BatchNorm": normzoo.BatchNorm(use_running_average=False, momentum=0.0)}
    base = np.random.default_rng(seed).standard_normal((256, 8)).astype(np.float32)
    errors = {name: [] for name in layers}
    for offset in offsets:
        x = base + np.float32(offset)
        true = x.astype(np.float64).var(0)
        for name, layer in layers.items():
            _, state = layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"])
            var = np.asarray(state["batch_stats"]["var"], np.float64)
            errors[name].append(float(np.max(np.abs(var - true) / true)))
    return {name: np.array(e) for name, e in errors.items()}


def main(out: Path = OUT) -> dict[str, np.ndarray]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    errors = variance_errors()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (name, e), style in zip(errors.items(), ("-o", "--s", "-^")):
        ax.loglog(OFFSETS, np.maximum(e, 1e-9), style, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="mean of the inputs / their standard deviation",
           ylabel="relative error of the batch variance", title="float32 statistics, 256 x 8 batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return errors


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
