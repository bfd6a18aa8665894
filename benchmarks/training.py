"""Training throughput of CIFAR ResNet-20 per normalizer, and the cost of synced BatchNorm.

    python -m benchmarks.training            # quick (width 8, batch 128): < 5 minutes on 2 CPU cores
    python -m benchmarks.training --full     # width 16, more rounds

Part 1 times one jitted training step (forward, backward, SGD update) for every registry name,
interleaved with the ``none`` baseline in the same run (rounds A B A B ...), and reports images/s
and the median per-round time ratio to ``none``: the cost each normalizer adds.

Part 2 (run in a subprocess with 8 simulated CPU devices) times the same BatchNorm model under
``jax.jit`` with the batch sharded over the 8 devices, synced (normzoo layers, statistics reduced
across devices by the compiler) against unsynced (``virtual_batch_size`` = the per-device batch, i.e.
every device normalizes with its own statistics, no cross-device reduction of statistics).
Simulated devices share the same cores, so this measures the overhead of the extra collectives and
their scheduling, not network cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import normzoo
from benchmarks import save
from examples.cifar.models import ResNet20


def make_step(norm: str, width: int, batch: int, **norm_overrides):
    model = ResNet20(norm=norm, width=width, norm_overrides=tuple(sorted(norm_overrides.items())))
    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = model.init(jax.random.key(2), x, train=True)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    opt = tx.init(variables["params"])

    def step(variables, opt, x, y):
        def loss_fn(params):
            logits, upd = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                      rngs={"noise": jax.random.key(0)})  # noisy_batch's stream (timing only)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt = tx.update(grads, opt, variables["params"])
        return {**variables, **upd, "params": optax.apply_updates(variables["params"], updates)}, opt, loss

    return jax.jit(step), (variables, opt, x, y)


def _time(f, args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def per_normalizer(width: int, batch: int, rounds: int) -> list[dict]:
    base_f, base_args = make_step("none", width, batch)
    _time(base_f, base_args)
    rows = []
    for norm in normzoo.available():
        f, args = make_step(norm, width, batch)
        _time(f, args), _time(f, args), _time(base_f, base_args)
        ta, tb = [], []
        for _ in range(rounds):
            ta.append(_time(f, args))
            tb.append(_time(base_f, base_args))
        t = statistics.median(ta)
        row = {"norm": norm, "step_ms": t * 1e3, "images_per_s": batch / t,
               "none_step_ms": statistics.median(tb) * 1e3,
               "ratio_to_none": statistics.median(a / b for a, b in zip(ta, tb))}
        rows.append(row)
        print(f"| {norm} | {row['step_ms']:.1f} | {row['images_per_s']:.0f} | {row['ratio_to_none']:.2f} |", flush=True)
    return rows


def input_pipeline_rate(batch: int, rounds: int) -> dict:
    """Images/s of the data part of a training step alone: gather from the on-device training set,
    augment (crop + flip) and standardize, jitted exactly as inside the step."""
    from examples.cifar import input_pipeline

    images = jax.random.randint(jax.random.key(0), (50000, 32, 32, 3), 0, 256).astype(jnp.uint8)
    perm = jax.random.permutation(jax.random.key(1), 50000)

    @jax.jit
    def data_part(step):
        idx = jax.lax.dynamic_slice_in_dim(perm, (step % (50000 // batch)) * batch, batch)
        x = input_pipeline.augment(jax.random.fold_in(jax.random.key(2), step), images[idx])
        return input_pipeline.standardize(x)

    _time(data_part, (0,))
    times = [_time(data_part, (i,)) for i in range(1, rounds * 4)]
    t = statistics.median(times)
    return {"data_ms": t * 1e3, "data_images_per_s": batch / t}


def synced_overhead(width: int, batch: int, rounds: int) -> dict:
    """Runs in a process with 8 simulated devices (see the module docstring)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    out = {"devices": n}
    fns = {}
    for label, overrides in (("synced", {}), ("unsynced", {"virtual_batch_size": batch // n})):
        f, (v, opt, x, y) = make_step("batch", width, batch, **overrides)
        args = (jax.device_put(v, NamedSharding(mesh, P())), jax.device_put(opt, NamedSharding(mesh, P())),
                jax.device_put(x, shard), jax.device_put(y, shard))
        _time(f, args), _time(f, args)
        fns[label] = (f, args)
    ts = {"synced": [], "unsynced": []}
    for _ in range(rounds):
        for label in ("synced", "unsynced"):
            ts[label].append(_time(*fns[label]))
    for label in ts:
        out[f"{label}_step_ms"] = statistics.median(ts[label]) * 1e3
    out["ratio_synced_to_unsynced"] = statistics.median(a / b for a, b in zip(ts["synced"], ts["unsynced"]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--synced-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    width = args.width or (16 if args.full else 8)
    rounds = args.rounds or (15 if args.full else 5)
    if args.synced_only:
        print(json.dumps(synced_overhead(width, args.batch, rounds)))
        return
    dev = jax.devices()[0]
    print("| normalizer | step ms | images/s | time ratio to none |\n| --- | ---: | ---: | ---: |", flush=True)
    rows = per_normalizer(width, args.batch, rounds)
    data = input_pipeline_rate(args.batch, rounds)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "benchmarks.training", "--synced-only", f"--width={width}",
           f"--batch={args.batch}", f"--rounds={rounds}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    synced = json.loads(res.stdout.strip().splitlines()[-1])
    result = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})", "jax": jax.__version__,
                 "width": width, "batch": args.batch, "rounds": rounds},
        "per_normalizer": rows,
        "input_pipeline": data,
        "synced": synced,
    }
    print(save(result, args.out, "training_full" if args.full else "training", to_markdown))


def to_markdown(result: dict) -> str:
    m, s = result["meta"], result["synced"]
    lines = [f"Measured {m['date']} on {m['device']}, jax {m['jax']}: ResNet-20 width {m['width']}, batch {m['batch']}, "
             f"one jitted SGD step, median of {m['rounds']} interleaved rounds.", "",
             "| normalizer | step ms | images/s | time ratio to `none` |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['norm']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['ratio_to_none']:.2f} |"
              for r in result["per_normalizer"]]
    d = result["input_pipeline"]
    batch_step = next(r["step_ms"] for r in result["per_normalizer"] if r["norm"] == "batch")
    lines += ["", f"Input pipeline alone (gather + crop/flip + standardize, jitted): {d['data_ms']:.2f} ms per batch "
              f"({d['data_images_per_s']:.0f} images/s), {100 * d['data_ms'] / batch_step:.1f}% of a BatchNorm step."]
    lines += ["", f"Synced BatchNorm on {s['devices']} simulated CPU devices (jit + NamedSharding): "
              f"synced {s['synced_step_ms']:.1f} ms vs unsynced {s['unsynced_step_ms']:.1f} ms per step, "
              f"ratio {s['ratio_synced_to_unsynced']:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
