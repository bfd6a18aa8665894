"""Every normzoo layer against its flax.linen counterpart and the memory-bandwidth floor.

    python -m benchmarks.layers            # quick: CIFAR-sized shapes, < 5 minutes on 2 CPU cores
    python -m benchmarks.layers --full     # adds ImageNet- and transformer-sized shapes

For each (layer, shape, dtype, pass) the normzoo layer (A) and its flax counterpart (B) are
compiled, warmed up, then timed interleaved A B A B ... with ``block_until_ready``; we report the
median time of each and the median of the per-round ratios A/B (robust to the machine's noise).

The floor: a jitted ``x * 2`` over the same tensor measures the achievable bandwidth (bytes read +
written per second) in the same run. Each layer's "achieved" bandwidth assumes the minimum traffic
of a memory-bound normalizer, written down here so that it can be checked:

* forward: read x once, write y once: 2 * nbytes(x);
* forward + backward: the forward's 2 * nbytes, then read x and dy and write dx: 5 * nbytes(x).

Linear layers (WeightNorm, Cosine) are compute-bound; they are compared with plain ``nn.Dense`` /
``nn.Conv`` (the cost of the normalization) and with flax's ``nn.WeightNorm`` wrapper.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

import normzoo
from benchmarks import save


@dataclass
class Case:
    name: str
    ours: Callable[[], nn.Module]
    theirs: Callable[[], nn.Module]
    baseline: str          # what "theirs" is
    kind: str              # "norm" (memory-bound) or "linear"
    shapes: tuple[str, ...]
    train: bool | None = None  # call-time use_running_average = not train, where it applies


SHAPES = {
    "cifar_early": (128, 32, 32, 16),
    "cifar_late": (128, 8, 8, 64),
    "cifar_wide": (128, 32, 32, 64),  # the shape of the GroupNorm vs BatchNorm figure in issue 5
    "imagenet": (64, 56, 56, 256),
    "transformer": (16, 512, 1024),
    "dense": (1024, 512),
    "conv": (128, 16, 16, 32),
}
QUICK = {"cifar_early", "cifar_late", "cifar_wide", "dense", "conv"}
CNN = ("cifar_early", "cifar_late", "imagenet")


def cases() -> list[Case]:
    bn = lambda mod, **kw: (lambda: mod(use_running_average=False, **kw))  # noqa: E731
    return [
        Case("BatchNorm (train)", bn(normzoo.BatchNorm), bn(nn.BatchNorm), "nn.BatchNorm", "norm", CNN),
        Case("BatchNorm (eval)", lambda: normzoo.BatchNorm(use_running_average=True),
             lambda: nn.BatchNorm(use_running_average=True), "nn.BatchNorm", "norm", CNN),
        Case("BatchRenorm (train)", bn(normzoo.BatchRenorm, warmup_steps=0), bn(nn.BatchNorm),
             "nn.BatchNorm", "norm", CNN),
        Case("IBN (train)", bn(normzoo.IBN), bn(nn.BatchNorm), "nn.BatchNorm", "norm", CNN),
        Case("InstanceNorm", normzoo.InstanceNorm, nn.InstanceNorm, "nn.InstanceNorm", "norm", CNN),
        Case("GroupNorm (4 groups)", lambda: normzoo.GroupNorm(num_groups=4),
             lambda: nn.GroupNorm(num_groups=4), "nn.GroupNorm", "norm", CNN + ("cifar_wide",)),
        Case("GroupNorm (32 groups)", lambda: normzoo.GroupNorm(num_groups=32),
             lambda: nn.GroupNorm(num_groups=32), "nn.GroupNorm", "norm", ("cifar_wide",)),
        Case("GroupNorm (32 groups)", lambda: normzoo.GroupNorm(num_groups=32),
             bn(nn.BatchNorm), "nn.BatchNorm", "norm", ("cifar_wide",)),
        Case("LayerNorm", normzoo.LayerNorm, nn.LayerNorm, "nn.LayerNorm", "norm", CNN[:2] + ("transformer",)),
        Case("RMSNorm", normzoo.RMSNorm, nn.RMSNorm, "nn.RMSNorm", "norm", CNN[:2] + ("transformer",)),
        Case("WeightNormDense", lambda: normzoo.WeightNormDense(512), lambda: nn.WeightNorm(nn.Dense(512)),
             "nn.WeightNorm(nn.Dense)", "linear", ("dense",)),
        Case("WeightNormDense", lambda: normzoo.WeightNormDense(512), lambda: nn.Dense(512),
             "nn.Dense", "linear", ("dense",)),
        Case("CosineDense", lambda: normzoo.CosineDense(512), lambda: nn.Dense(512), "nn.Dense", "linear", ("dense",)),
        Case("WeightNormConv", lambda: normzoo.WeightNormConv(32, (3, 3)), lambda: nn.Conv(32, (3, 3)),
             "nn.Conv", "linear", ("conv",)),
        Case("CosineConv", lambda: normzoo.CosineConv(32, (3, 3)), lambda: nn.Conv(32, (3, 3)),
             "nn.Conv", "linear", ("conv",)),
    ]


def _fns(module: nn.Module, x: jax.Array):
    variables = module.init(jax.random.key(0), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def fwd(params, x):
        y = module.apply({"params": params, **rest}, x, mutable=list(rest))
        return y[0] if isinstance(y, tuple) else y

    def fwd_bwd(params, x, dy):
        y, vjp = jax.vjp(fwd, params, x)
        return vjp(dy)

    return params, jax.jit(fwd), jax.jit(fwd_bwd)


def _time(f, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def interleaved(fa, args_a, fb, args_b, rounds: int, min_time: float, fc=None, args_c=None):
    """Median time of A and B (and C) and the medians of the per-round ratios A/B (and A/C),
    timed round-robin A B C A B C ..."""
    fns = [(fa, args_a), (fb, args_b)] + ([(fc, args_c)] if fc is not None else [])
    for _ in range(2):  # compile and warm up
        for f, args in fns:
            _time(f, *args)
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < rounds or (time.perf_counter() - start < min_time and len(times[0]) < 10 * rounds):
        for t, (f, args) in zip(times, fns):
            t.append(_time(f, *args))
    medians = [statistics.median(t) for t in times]
    ratios = [statistics.median(a / b for a, b in zip(times[0], t)) for t in times[1:]]
    return medians, ratios, len(times[0])


def bandwidth(x: jax.Array, rounds: int) -> float:
    """Achievable bytes/s of a jitted read-scale-write of ``x``."""
    f = jax.jit(lambda a: a * 2)
    _time(f, x)
    times = [_time(f, x) for _ in range(rounds)]
    return 2 * x.nbytes / statistics.median(times)


def run(full: bool = False, rounds: int = 7, min_time: float = 0.5, only: str | None = None,
        shapes: dict | None = None, dtypes=(jnp.float32, jnp.bfloat16)) -> dict:
    shapes = shapes or SHAPES
    rows = []
    bw_cache = {}
    for case in cases():
        if only and only.lower() not in case.name.lower():
            continue
        for shape_name in case.shapes:
            if shape_name not in shapes or (not full and shape_name not in QUICK and shapes is SHAPES):
                continue
            for dtype in dtypes:
                x = jax.random.normal(jax.random.key(1), shapes[shape_name], jnp.float32).astype(dtype)
                ours, theirs = case.ours().clone(dtype=dtype), case.theirs()
                if isinstance(theirs, nn.WeightNorm):  # the wrapper has no dtype; its layer does
                    theirs = nn.WeightNorm(theirs.layer_instance.clone(dtype=dtype))
                else:
                    theirs = theirs.clone(dtype=dtype)
                pa, fa, ga = _fns(ours, x)
                pb, fb, gb = _fns(theirs, x)
                # Like with like: flax's stable mode too, where it has one.
                stable = "use_fast_variance" in {f.name for f in dataclasses.fields(theirs)}
                pc, fc, gc = _fns(theirs.clone(use_fast_variance=False), x) if stable else (None, None, None)
                key = (shape_name, str(jnp.dtype(dtype)))
                if key not in bw_cache:
                    bw_cache[key] = bandwidth(x, rounds)
                for pass_name, a, b, c in (("fwd", fa, fb, fc), ("fwd+bwd", ga, gb, gc)):
                    if pass_name == "fwd+bwd":
                        dy = jnp.ones_like(fa(pa, x))
                        args_a, args_b, args_c = (pa, x, dy), (pb, x, dy), (pc, x, dy)
                    else:
                        args_a, args_b, args_c = (pa, x), (pb, x), (pc, x)
                    (t_a, t_b, *t_c), (ratio, *ratio_c), n = interleaved(
                        a, args_a, b, args_b, rounds, min_time, c, args_c if stable else None)
                    row = {"layer": case.name, "baseline": case.baseline, "shape": "x".join(map(str, x.shape)),
                           "dtype": str(jnp.dtype(dtype)), "pass": pass_name, "normzoo_ms": t_a * 1e3,
                           "baseline_ms": t_b * 1e3, "ratio": ratio, "rounds": n}
                    if stable:
                        row["stable_ms"], row["stable_ratio"] = t_c[0] * 1e3, ratio_c[0]
                    if case.kind == "norm":
                        traffic = (2 if pass_name == "fwd" else 5) * x.nbytes
                        row["floor_fraction"] = traffic / t_a / bw_cache[key]
                        row["baseline_floor_fraction"] = traffic / t_b / bw_cache[key]
                    rows.append(row)
                    print(_fmt_row(row), flush=True)
    dev = jax.devices()[0]
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
            "host": f"{platform.machine()}, {platform.system()}",
            "versions": {"jax": jax.__version__, "flax": flax.__version__, "normzoo": normzoo.__version__},
            "full": full, "rounds": rounds,
            "bandwidth_GBps": {f"{k[0]} {k[1]}": v / 1e9 for k, v in bw_cache.items()},
        },
        "rows": rows,
    }


def _fmt_row(r) -> str:
    floor = f" | {100 * r['floor_fraction']:.0f}% | {100 * r['baseline_floor_fraction']:.0f}%" if "floor_fraction" in r else " | | "
    stable = f"{r['stable_ms']:.2f} | {r['stable_ratio']:.2f}" if "stable_ms" in r else " | "
    return (f"| {r['layer']} | {r['baseline']} | {r['shape']} | {r['dtype']} | {r['pass']} | "
            f"{r['normzoo_ms']:.2f} | {r['baseline_ms']:.2f} | {r['ratio']:.2f} | {stable}{floor} |")


def to_markdown(result: dict) -> str:
    m = result["meta"]
    bw = ", ".join(f"{k}: {v:.1f} GB/s" for k, v in m["bandwidth_GBps"].items())
    lines = [
        f"Measured {m['date']} on {m['device']} ({m['host']}); jax {m['versions']['jax']}, "
        f"flax {m['versions']['flax']}; {'full' if m['full'] else 'quick'} run, median of >= {m['rounds']} "
        "interleaved rounds.",
        "",
        f"Measured bandwidth (jitted x*2): {bw}.",
        "",
        "| layer | baseline | shape | dtype | pass | normzoo ms | baseline ms | ratio (median of rounds) "
        "| baseline stable ms | ratio to stable | normzoo % of floor | baseline % of floor |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [_fmt_row(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="add the large ImageNet/transformer shapes")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", default=None, help="only layers whose name contains this")
    p.add_argument("--out", default="benchmarks/results", help="folder for layers.json and layers.md")
    args = p.parse_args(argv)
    result = run(full=args.full, rounds=args.rounds, only=args.only)
    tag = "layers_full" if args.full else "layers"
    save(result, args.out, tag, to_markdown)
    print(f"written to {Path(args.out) / tag}.{{json,md}}")


if __name__ == "__main__":
    main()

