"""sbx's own CrossQ on Pendulum-v1, stock and with normzoo's BatchRenorm switched in (one call).

    pip install 'normzoo[rl]'                            # sbx-rl, gymnasium (a CPU torch first)
    python -m examples.crossq.sbx_pendulum               # writes examples/crossq/results/sbx_pendulum.*

Both runs start from the same seed (the same initial weights, the same environment and replay
draws), the second inside ``normzoo.sbx.use_in_sbx()``, which makes sbx's critics and actor build
``normzoo.sbx.BatchRenorm`` instead of sbx's layer. Measured: evaluation returns along training
(10 deterministic episodes each), the wall time of training (the whole run, and the median of
interleaved turns of more training, the fair comparison of speed), and how far the runs drift
apart (the relative difference of the critics' parameters, every 10 updates over the first 300,
then after each chunk): the layers
compute the same formula, normzoo's variance stably, so they differ by float32 rounding, which an
actor-critic loop amplifies. A third run switches only sbx's variance to the stable formula (sbx's
layer, flax's ``use_fast_variance=False`` statistics) to show that the drift is rounding, not the
algorithm.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import normzoo.sbx

RESULTS = Path(__file__).resolve().parent / "results"


def _stable_sbx_statistics():
    """sbx's layer with flax's stable variance: the control for the rounding drift."""
    from flax.linen import normalization
    from sbx.common import jax_layers

    original = jax_layers._compute_stats
    jax_layers._compute_stats = functools.partial(normalization._compute_stats, use_fast_variance=False)
    return lambda: setattr(jax_layers, "_compute_stats", original)


def _flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(params)])


@contextlib.contextmanager
def _variant(variant: str):
    """sbx's layer as shipped, normzoo's switched in, or sbx's with a stable variance."""
    undo = None
    if variant == "normzoo":
        undo = normzoo.sbx.use_in_sbx().undo
    elif variant == "sbx_stable":
        undo = _stable_sbx_statistics()
    try:
        yield
    finally:
        if undo is not None:
            undo()


def run(variant: str, steps: int, chunk: int, learning_starts: int, warmup: int, net_arch, seed: int):
    """One CrossQ run: (critic parameters at every snapshot, eval returns, seconds, the model)."""
    from sbx import CrossQ
    from stable_baselines3.common.evaluation import evaluate_policy

    with _variant(variant):
        model = CrossQ("MlpPolicy", "Pendulum-v1", learning_starts=learning_starts, seed=seed, verbose=0,
                       policy_kwargs={"net_arch": net_arch, "renorm_warmup_steps": warmup})
        snapshots, returns, seconds = [], [], 0.0
        done = 0
        evals = set(range(steps // 5, steps + 1, steps // 5))
        for stop in tqdm(_boundaries(steps, chunk, learning_starts), desc=variant, leave=False):
            start = time.perf_counter()
            model.learn(stop - done, reset_num_timesteps=done == 0, progress_bar=False)
            jax.block_until_ready(model.policy.qf_state.params)
            seconds += time.perf_counter() - start
            done = stop
            snapshots.append(_flat(model.policy.qf_state.params))
            if done in evals:
                mean, _ = evaluate_policy(model, model.get_env(), n_eval_episodes=10, deterministic=True)
                returns.append((done, float(mean)))
        return snapshots, returns, seconds, model


def interleaved_seconds(models: dict, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds of ``steps`` more training steps per model, the models taking turns
    (``rounds`` turns each), so that the machine's drift hits every variant alike."""
    times = {v: [] for v in models}
    for _ in tqdm(range(rounds), desc="timing", leave=False):
        for v, model in models.items():
            with _variant(v):
                start = time.perf_counter()
                model.learn(steps, reset_num_timesteps=False, progress_bar=False)
                jax.block_until_ready(model.policy.qf_state.params)
                times[v].append(time.perf_counter() - start)
    return {v: float(np.median(t)) for v, t in times.items()}


def _boundaries(steps: int, chunk: int, learning_starts: int) -> list[int]:
    """Where to snapshot: every 10 steps over the first 300 updates (where the runs part), then
    every ``chunk``, and at the evaluations."""
    fine = range(learning_starts, min(learning_starts + 300, steps) + 1, 10)
    return sorted(set(fine) | set(range(chunk, steps + 1, chunk)) | set(range(steps // 5, steps + 1, steps // 5)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=250, help="environment steps between snapshots")
    parser.add_argument("--learning-starts", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=1000, help="BatchRenorm's renorm_warmup_steps")
    parser.add_argument("--net-arch", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=500, help="steps per timed turn (interleaved)")
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = {v: run(v, args.steps, args.chunk, args.learning_starts, args.warmup, args.net_arch, args.seed)
            for v in ("sbx", "normzoo", "sbx_stable")}
    updates = [max(0, b - args.learning_starts) for b in _boundaries(args.steps, args.chunk, args.learning_starts)]

    def drift(a, b):
        return [float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(runs[a][0], runs[b][0])]

    results = {
        "config": vars(args) | {"out": str(args.out)},
        "updates": updates,
        "drift_normzoo_vs_sbx": drift("normzoo", "sbx"),
        "drift_sbx_stable_vs_sbx": drift("sbx_stable", "sbx"),
        "returns": {v: r[1] for v, r in runs.items()},
        "train_seconds": {v: r[2] for v, r in runs.items()},
        "interleaved_seconds": interleaved_seconds({v: r[3] for v, r in runs.items()}, args.timing_steps,
                                                   args.timing_rounds),
        "versions": {"jax": jax.__version__},
    }
    try:
        import sbx
        results["versions"]["sbx"] = sbx.__version__
    except AttributeError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sbx_pendulum.json").write_text(json.dumps(results, indent=1))
    timed = results["interleaved_seconds"]
    lines = ["| run | eval return at " + " / ".join(str(s) for s, _ in runs["sbx"][1])
             + f" steps | training (s, whole run) | {args.timing_steps} more steps, median of "
             + f"{args.timing_rounds} interleaved (s) | ratio to sbx |",
             "| --- | --- | ---: | ---: | ---: |"]
    for v, (_, returns, seconds, _) in runs.items():
        lines.append(f"| {v} | {' / '.join(f'{r:.0f}' for _, r in returns)} | {seconds:.1f} | {timed[v]:.2f} | "
                     f"{timed[v] / timed['sbx']:.2f} |")
    (args.out / "sbx_pendulum.md").write_text("\n".join(lines) + "\n")
    _plot(results, args.out / "sbx_pendulum.png")
    print("\n".join(lines))
    return results


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    u = np.maximum(results["updates"], 1)
    a.loglog(u, np.maximum(results["drift_normzoo_vs_sbx"], 1e-12), label="normzoo's layer vs sbx's")
    a.loglog(u, np.maximum(results["drift_sbx_stable_vs_sbx"], 1e-12), "--", label="sbx's layer, stable variance, vs sbx's")
    a.set_xlabel("critic updates")
    a.set_ylabel("relative difference of critic parameters")
    a.legend(fontsize=8)
    for v, returns in results["returns"].items():
        b.plot([s for s, _ in returns], [r for _, r in returns], marker="o", label=v)
    b.set_xlabel("environment steps")
    b.set_ylabel("eval return (10 episodes)")
    b.legend(fontsize=8)
    fig.suptitle("sbx CrossQ on Pendulum-v1: stock vs normzoo.sbx.use_in_sbx()")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
