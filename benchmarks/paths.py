"""The two statistics paths against flax, in one interleaved run.

    python -m benchmarks.paths                  # writes benchmarks/results/paths.{md,json}

For each layer (fwd+bwd as in ``benchmarks.layers``: ``jax.vjp`` with a cotangent of ones, float32): normzoo on the checked path (XLA:CPU's default: fast sums,
checked), normzoo on the shifted path (every other platform's), flax's default (fast variance)
and flax's stable mode (``use_fast_variance=False``). Then an ensemble of 8 BatchNorms under
``jax.vmap`` on both paths: under vmap the check is taken once for the whole ensemble (a
``custom_vmap`` predicate), so the checked path must cost no more than the shifted one.

Each function is compiled and warmed up, then all of a row's variants are timed round-robin
(A B C D A B C D ...) with ``block_until_ready``; the table reports medians and the median of
the per-round ratios to flax's default.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

import normzoo
from benchmarks import save
from benchmarks.layers import _fns
from normzoo import _stats

SHAPE = (64, 32, 32, 64)  # the shape of the measurement in the straighter-core issue


def _layers():
    bn = dict(use_running_average=False)
    return {
        "BatchNorm": (lambda: normzoo.BatchNorm(**bn), lambda **kw: nn.BatchNorm(**bn, **kw)),
        "BatchRenorm": (lambda: normzoo.BatchRenorm(**bn, warmup_steps=0), lambda **kw: nn.BatchNorm(**bn, **kw)),
        "InstanceNorm": (normzoo.InstanceNorm, nn.InstanceNorm),
        "GroupNorm(4)": (lambda: normzoo.GroupNorm(4), lambda **kw: nn.GroupNorm(4, **kw)),
        "LayerNorm": (normzoo.LayerNorm, nn.LayerNorm),
    }


def _fwd_bwd(module, x):
    """Forward and backward (``jax.vjp`` with a cotangent of ones), as ``benchmarks.layers``."""
    params, fwd, fwd_bwd = _fns(module, x)
    return fwd_bwd, (params, x, jnp.ones_like(fwd(params, x)))


def _ensemble(module, x, members=8):
    """``members`` independent copies of ``module`` applied by ``jax.vmap``, fwd+bwd."""
    xs = jnp.stack([x] * members)
    v = jax.vmap(lambda k: module.init(k, x))(jax.random.split(jax.random.key(0), members))
    rest = {k: a for k, a in v.items() if k != "params"}

    def fwd(params, xs):
        def one(p, r, x):
            return module.apply({"params": p, **r}, x, mutable=["batch_stats"])[0]
        return jax.vmap(one)(params, rest, xs)

    def fwd_bwd(params, xs, dy):
        return jax.vjp(fwd, params, xs)[1](dy)

    return jax.jit(fwd_bwd), (v["params"], xs, jnp.ones_like(xs))


def _compile(make, path):
    """(function, args) traced and compiled on ``path`` ("checked", "shifted" or None)."""
    with _stats.statistics_path(path):
        f, args = make()
        compiled = f.lower(*args).compile()
    return compiled, args


def _time(f, args):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def race(variants: dict, rounds: int) -> dict:
    """Round-robin timing of compiled ``{name: (f, args)}``: median ms, and median ratio to the first."""
    for f, args in variants.values():
        for _ in range(2):
            _time(f, args)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (f, args) in variants.items():
            times[k].append(_time(f, args))
    base = next(iter(variants))
    return {k: {"ms": 1e3 * statistics.median(t),
                "ratio": statistics.median(a / b for a, b in zip(t, times[base]))} for k, t in times.items()}


def run(shape=SHAPE, rounds: int = 15, members: int = 8) -> dict:
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    rows = []
    for name, (ours, theirs) in _layers().items():
        variants = {
            "flax (fast)": _compile(lambda: _fwd_bwd(theirs(), x), None),
            "flax (stable)": _compile(lambda: _fwd_bwd(theirs(use_fast_variance=False), x), None),
            "normzoo (checked)": _compile(lambda: _fwd_bwd(ours(), x), "checked"),
            "normzoo (shifted)": _compile(lambda: _fwd_bwd(ours(), x), "shifted"),
        }
        rows.append({"layer": name, "shape": "x".join(map(str, shape)), **race(variants, rounds)})
        print(rows[-1], flush=True)
    small = tuple(s // 2 if i else s // 4 for i, s in enumerate(shape[:-1])) + shape[-1:]
    xe = x[: small[0], : small[1], : small[2]]
    variants = {
        "normzoo (shifted)": _compile(lambda: _ensemble(normzoo.BatchNorm(use_running_average=False), xe, members), "shifted"),
        "normzoo (checked)": _compile(lambda: _ensemble(normzoo.BatchNorm(use_running_average=False), xe, members), "checked"),
        "flax (fast)": _compile(lambda: _ensemble(nn.BatchNorm(use_running_average=False), xe, members), None),
    }
    ensemble = {"members": members, "shape": "x".join(map(str, xe.shape)), **race(variants, rounds)}
    print(ensemble, flush=True)
    dev = jax.devices()[0]
    return {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__, "rounds": rounds,
            "rows": rows, "ensemble": ensemble}


def to_markdown(r: dict) -> str:
    cols = ["flax (fast)", "flax (stable)", "normzoo (checked)", "normzoo (shifted)"]
    lines = [f"fwd+bwd, float32, median of {r['rounds']} round-robin rounds on {r['device']}, jax {r['jax']}; "
             "ms (ratio to flax's default)", "",
             "| layer | shape | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
    for row in r["rows"]:
        lines.append(f"| {row['layer']} | {row['shape']} | "
                     + " | ".join(f"{row[c]['ms']:.2f} ({row[c]['ratio']:.2f})" for c in cols) + " |")
    e = r["ensemble"]
    lines += ["", f"{e['members']} BatchNorms under `jax.vmap` ({e['shape']} each), ratio to the shifted path:", "",
              "| variant | ms | ratio |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {e[k]['ms']:.2f} | {e[k]['ratio']:.2f} |" for k in ("normzoo (shifted)", "normzoo (checked)", "flax (fast)")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    result = run(rounds=a.rounds)
    print(save(result, a.out, "paths", to_markdown))


if __name__ == "__main__":
    main()
