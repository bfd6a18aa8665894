"""A CrossQ-sized critic on a drifting regression task: does eval mode agree with training?

    python -m examples.crossq.main                   # writes examples/crossq/results/

Reinforcement learning trains its critic on a distribution that keeps moving (the policy, and so
the visited states, change), and then uses the critic in eval mode. With BatchNorm the two modes
normalize differently: training uses the batch's statistics, eval the running averages, which
lag behind a moving distribution. BatchRenorm (Ioffe 2017; CrossQ, Bhatt et al. 2024) trains with
the running statistics' normalization (its r and d), so what is learned is what eval computes.

The task, deterministic and small enough for a CPU: a critic MLP (``in -> 256 -> 256 -> 1``, the
normalizer after each hidden Dense, then ReLU) regresses a fixed smooth target ``Q(s)`` while the
inputs ``s ~ N(mu_t, diag(sd^2))`` drift: ``mu_t`` moves along a fixed direction by ``drift`` per
step. Every ``eval_every`` steps, on a fresh batch from the current distribution, we measure the
mean squared error in **eval mode** (what an agent acts and bootstraps with) and in **train mode**
(batch statistics, running statistics not updated). Normalizers: ``none``, ``batch``
(``normzoo.BatchNorm``), ``batch_renorm`` (``normzoo.sbx.BatchRenorm`` with CrossQ's settings: a
hard switch after ``warmup_steps``), each trained with Adam from the same initial weights and data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import normzoo

NORMS = ("none", "batch", "batch_renorm")


def make_norm(name: str, warmup_steps: int, momentum: float = 0.99):
    """``use_running_average -> layer`` for a normalizer name."""
    if name == "none":
        return None
    if name == "batch":
        return lambda ra: normzoo.BatchNorm(use_running_average=ra, momentum=momentum, epsilon=1e-3)  # as renorm
    if name == "batch_renorm":
        return lambda ra: normzoo.sbx.BatchRenorm(use_running_average=ra, momentum=momentum, warmup_steps=warmup_steps)
    raise ValueError(f"norm={name!r} is not one of {NORMS}")


class Critic(nn.Module):
    norm: object = None
    hidden: int = 256

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Dense(self.hidden)(x)
            if self.norm is not None:
                x = self.norm(not train)(x)
            x = nn.relu(x)
        return nn.Dense(1)(x)[:, 0]


def target(s, w):
    """The fixed regression target: a smooth function of the state."""
    return jnp.sin(s @ w[0]) + 0.5 * jnp.cos(s @ w[1])


def run_one(norm: str, steps: int = 4000, batch: int = 256, dim: int = 16, drift: float = 1e-2,
            warmup_steps: int = 500, eval_every: int = 100, lr: float = 1e-3, seed: int = 0,
            momentum: float = 0.99, progress: bool = True) -> dict:
    """Trains one critic; returns its eval- and train-mode errors over time."""
    kw, kd, kinit, kdata = jax.random.split(jax.random.key(seed), 4)
    w = jax.random.normal(kw, (2, dim)) / np.sqrt(dim)
    direction = jax.random.normal(kd, (dim,))
    direction = direction / jnp.linalg.norm(direction)
    sd = 1.0
    model = Critic(make_norm(norm, warmup_steps, momentum))
    variables = model.init(kinit, jnp.zeros((batch, dim)), train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.adam(lr)
    opt = tx.init(params)

    def sample(key, t):
        s = direction * drift * t + sd * jax.random.normal(key, (batch, dim))
        return s, target(s, w)

    @jax.jit
    def train_step(params, stats, opt, key, t):
        s, q = sample(key, t)

        def loss(p):
            pred, upd = model.apply({"params": p, "batch_stats": stats}, s, train=True, mutable=["batch_stats"])
            return jnp.mean((pred - q) ** 2), upd.get("batch_stats", {})

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, value

    @jax.jit
    def measure(params, stats, key, t):
        s, q = sample(key, t)
        v = {"params": params, "batch_stats": stats}
        eval_pred = model.apply(v, s, train=False)
        train_pred, _ = model.apply(v, s, train=True, mutable=["batch_stats"])  # statistics untouched
        return jnp.mean((eval_pred - q) ** 2), jnp.mean((train_pred - q) ** 2)

    history = {"step": [], "eval_mse": [], "train_mode_mse": [], "train_loss": []}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"crossq/{norm}", disable=not progress, leave=False)
    for t in bar:
        params, stats, opt, value = train_step(params, stats, opt, jax.random.fold_in(kdata, t), t)
        if (t + 1) % eval_every == 0:
            e, tr = measure(params, stats, jax.random.fold_in(kdata, 10**9 + t), t)
            history["step"].append(t + 1)
            history["eval_mse"].append(float(e))
            history["train_mode_mse"].append(float(tr))
            history["train_loss"].append(float(value))
            bar.set_postfix(eval_mse=f"{float(e):.4f}", train_mode_mse=f"{float(tr):.4f}")
    late = slice(len(history["step"]) // 2, None)  # the second half: after BatchRenorm's switch
    summary = {
        "norm": norm, "steps": steps, "seconds": time.perf_counter() - start,
        "eval_mse_late": float(np.mean(history["eval_mse"][late])),
        "train_mode_mse_late": float(np.mean(history["train_mode_mse"][late])),
    }
    summary["eval_over_train_mode"] = summary["eval_mse_late"] / summary["train_mode_mse_late"]
    return {"history": history, "summary": summary}


def to_markdown(results: dict, config: dict) -> str:
    lines = [f"Drifting regression, {config['steps']} steps of batch {config['batch']}, drift "
             f"{config['drift']} per step, BatchRenorm switch at step {config['warmup_steps']}; "
             "errors averaged over the second half of training (seeds: "
             f"{', '.join(map(str, config['seeds']))}).", "",
             "| normalizer | eval-mode MSE | train-mode MSE | eval / train mode |", "| --- | ---: | ---: | ---: |"]
    for name, runs in results.items():
        e = [r["summary"]["eval_mse_late"] for r in runs]
        t = [r["summary"]["train_mode_mse_late"] for r in runs]
        ratio = [r["summary"]["eval_over_train_mode"] for r in runs]
        fmt = lambda a, p: f"{np.mean(a):.{p}f} ± {np.std(a):.{p}f}" if len(a) > 1 else f"{a[0]:.{p}f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(e, 4)} | {fmt(t, 4)} | {fmt(ratio, 2)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(results.items(), ("tab:gray", "tab:blue", "tab:orange")):
        h = runs[0]["history"]
        ax.plot(h["step"], h["eval_mse"], color=color, label=f"{name}: eval mode")
        ax.plot(h["step"], h["train_mode_mse"], color=color, linestyle=":", label=f"{name}: train mode")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE on the current distribution")
    ax.set_title("Critic under a drifting input distribution (seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--drift", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--norms", default=",".join(NORMS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    config = {"steps": a.steps, "batch": a.batch, "drift": a.drift, "warmup_steps": a.warmup_steps,
              "seeds": [int(s) for s in a.seeds.split(",")]}
    results = {name: [run_one(name, a.steps, a.batch, drift=a.drift, warmup_steps=a.warmup_steps,
                              eval_every=a.eval_every, seed=s, progress=not a.no_progress)
                      for s in config["seeds"]] for name in a.norms.split(",")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "runs": results}, indent=1))
    (out / "results.md").write_text(to_markdown(results, config))
    plot(results, out / "drift.png")
    print(to_markdown(results, config))
    return results


if __name__ == "__main__":
    main()
