"""Inference with normalizers folded (normzoo.deploy.fold) vs as trained, CIFAR ResNet-20 and VGG.

    python -m benchmarks.deploy            # writes benchmarks/results/deploy.{json,md}

Each model in inference mode (``train=False``), jitted, at batch 1 and 128: the unfolded model,
and the folded one (every BatchNorm folded into the convolution before it; for WeightNorm the
kernel materialized). Timed round-robin with ``block_until_ready`` after two warm-up calls each;
medians of the rounds and the median ratio folded / unfolded. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import save, steady_allocator
from benchmarks.paths import race
from examples.cifar.models import VGG, ResNet20
from normzoo import deploy

MODELS = {"resnet20": lambda norm: ResNet20(norm=norm), "vgg": lambda norm: VGG(norm=norm)}


def _trained_looking(variables, seed=0):
    """Running statistics away from (0, 1) (means ~ N(0, 0.2), variances ~ U(0.5, 2)), so that
    folding really changes the kernels and the activations stay alive."""
    r = np.random.default_rng(seed)

    def new(path, a):
        if str(path[-1].key) == "var":
            return jnp.asarray(r.uniform(0.5, 2.0, a.shape), a.dtype)
        return jnp.asarray(r.normal(0.0, 0.2, a.shape), a.dtype) if str(path[-1].key) == "mean" else a

    stats = jax.tree_util.tree_map_with_path(new, variables.get("batch_stats", {}))
    return {**variables, **({"batch_stats": stats} if stats else {})}


def run(rounds: int = 15, batches=(1, 128), norms=("batch", "weight"), models=tuple(MODELS)) -> dict:
    rows = []
    for model_name in models:
        for norm in norms:
            model = MODELS[model_name](norm)
            for batch in batches:
                x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
                variables = _trained_looking(model.init(jax.random.key(1), x, train=False))
                folded = deploy.fold(model, variables, x, train=False)
                plain = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
                fast = jax.jit(lambda v, x, folded=folded: folded.apply(v, x, train=False))
                timings = race({"unfolded": (plain, (variables, x)), "folded": (fast, (folded.variables, x))}, rounds)
                statuses = sorted({s for _, _, s, _ in folded.report})
                rows.append({"model": model_name, "norm": norm, "batch": batch, "folded_layers": len(folded.folded),
                             "statuses": statuses, "max_error": folded.max_error, **timings})
                print(rows[-1], flush=True)
    dev = jax.devices()[0]
    return {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__, "rounds": rounds, "rows": rows}


def to_markdown(r: dict) -> str:
    lines = [f"Inference (train=False), jitted, median of {r['rounds']} round-robin rounds on {r['device']}, "
             f"jax {r['jax']}, {r.get('allocator', 'glibc default')}; ms", "",
             "| model | norm | batch | unfolded | folded | folded / unfolded | layers folded | max rel. error |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['norm']} | {row['batch']} | {row['unfolded']['ms']:.2f} | "
                     f"{row['folded']['ms']:.2f} | {row['folded']['ratio']:.2f} | {row['folded_layers']} "
                     f"({', '.join(row['statuses'])}) | {row['max_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batches", default="1,128")
    p.add_argument("--norms", default="batch,weight")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    allocator = "fixed malloc thresholds" if steady_allocator() else "glibc default"
    result = {**run(a.rounds, tuple(int(b) for b in a.batches.split(",")), tuple(a.norms.split(",")),
                    tuple(a.models.split(","))), "allocator": allocator}
    print(save(result, a.out, "deploy", to_markdown))


if __name__ == "__main__":
    main()
