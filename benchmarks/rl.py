"""BatchRenorm at reinforcement-learning shapes: CrossQ's critic update, on the CPU.

    python -m benchmarks.rl                 # writes benchmarks/results/rl.{md,json}

CrossQ (Bhatt et al., ICLR 2024) trains SAC with BatchRenorm in the critic: an MLP
256 -> 2048 -> 2048 -> 1 with BatchRenorm (then ReLU) after each hidden layer, and a joint forward
pass of ``(s, a)`` and ``(s', a')`` concatenated, so that both go through the same batch
statistics (2 x 256 rows). Two jitted steps are timed:

* **critic**: one critic update: the joint forward pass, the squared TD error against the
  stop-gradient target ``r + 0.99 Q(s', a')``, its gradient and an SGD step (batch_stats updated);
* **actor-critic**: that critic update, then an actor update (MLP 240 -> 256 -> 256 -> 16, tanh)
  through the critic in eval mode (``use_running_average=True``), as SAC does;
* **layer alone**: one normalization layer's forward and backward on the critic's hidden
  activations (512 x 2048), where the variants differ and the matmuls do not dilute it.

Variants: normzoo's ``BatchRenorm`` with CrossQ's settings (``warmup_schedule="step"``,
``epsilon=1e-3``), ``normzoo.sbx.BatchRenorm`` (sbx's layer, drop-in), each on the statistics path
the CPU uses (checked) and, for the first, the shifted path of other platforms; an sbx-style layer
(``benchmarks/sbx_style.py``: their formula, flax's fast variance) and flax's ``nn.BatchNorm``.
BatchRenorm is past its warm-up (r and d active). All variants are compiled and warmed up, then
timed round-robin with ``block_until_ready``; the table gives medians and the median of the
per-round ratios to the sbx-style layer. glibc's malloc thresholds are fixed first
(:func:`benchmarks.steady_allocator`; ``--default-allocator`` leaves them): with its moving
defaults, which variant of a shared-process race lands on fresh page-faulting memory depends on
the others, and that, not the arithmetic, made normzoo's critic step 1.03-1.09x the sbx-style
one (each measured in a process of its own, they were equal).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

import normzoo
from benchmarks import save, steady_allocator
from benchmarks.paths import _compile, _fwd_bwd, race
from benchmarks.sbx_style import SbxStyle

OBS, ACT, BATCH, HIDDEN = 240, 16, 256, 2048  # critic input 256 = obs + action


def norms(epsilon=1e-3):
    """``{name: (factory(use_running_average) -> layer, statistics path)}``."""
    ours = lambda ra: normzoo.BatchRenorm(  # noqa: E731
        use_running_average=ra, epsilon=epsilon, warmup_steps=0, warmup_schedule="step")
    return {
        "sbx-style": (lambda ra: SbxStyle(use_running_average=ra, warmup_steps=0), None),
        "normzoo BatchRenorm": (ours, None),
        "normzoo.sbx BatchRenorm": (lambda ra: normzoo.sbx.BatchRenorm(use_running_average=ra, warmup_steps=0), None),
        "normzoo BatchRenorm (shifted path)": (ours, "shifted"),
        "flax BatchNorm": (lambda ra: nn.BatchNorm(use_running_average=ra, epsilon=epsilon), None),
    }


class Critic(nn.Module):
    norm: object  # use_running_average -> normalization layer
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(2):
            x = nn.relu(self.norm(not train)(nn.Dense(self.hidden)(x)))
        return nn.Dense(1)(x)[:, 0]


class Actor(nn.Module):
    act: int = ACT

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(256)(obs))
        x = nn.relu(nn.Dense(256)(x))
        return jnp.tanh(nn.Dense(self.act)(x))


def _sgd(params, grads, lr=1e-3):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def make_steps(norm, batch=BATCH, hidden=HIDDEN, obs=OBS, act=ACT):
    """(critic_step, actor_critic_step, state, batch) for one normalizer."""
    critic, actor = Critic(norm, hidden), Actor(act)
    k = jax.random.split(jax.random.key(0), 6)
    data = dict(obs=jax.random.normal(k[0], (batch, obs)), act=jnp.tanh(jax.random.normal(k[1], (batch, act))),
                rew=jax.random.normal(k[2], (batch,)), next_obs=jax.random.normal(k[3], (batch, obs)))
    cv = critic.init(k[4], jnp.zeros((2 * batch, obs + act)))
    state = dict(critic=cv["params"], stats=cv["batch_stats"], actor=actor.init(k[5], data["obs"])["params"])

    def critic_update(state, d):
        next_act = actor.apply({"params": state["actor"]}, d["next_obs"])

        def loss(params):
            x = jnp.concatenate([jnp.concatenate([d["obs"], d["act"]], 1),
                                 jnp.concatenate([d["next_obs"], next_act], 1)], 0)
            q, upd = critic.apply({"params": params, "batch_stats": state["stats"]}, x, mutable=["batch_stats"])
            q, q_next = jnp.split(q, 2)
            target = jax.lax.stop_gradient(d["rew"] + 0.99 * q_next)
            return jnp.mean((q - target) ** 2), upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(state["critic"])
        return {**state, "critic": _sgd(state["critic"], grads), "stats": stats}, value

    def actor_critic_update(state, d):
        state, critic_loss = critic_update(state, d)

        def loss(params):
            a = actor.apply({"params": params}, d["obs"])
            q = critic.apply({"params": state["critic"], "batch_stats": state["stats"]},
                             jnp.concatenate([d["obs"], a], 1), train=False)
            return -jnp.mean(q)

        value, grads = jax.value_and_grad(loss)(state["actor"])
        return {**state, "actor": _sgd(state["actor"], grads)}, (critic_loss, value)

    return jax.jit(critic_update), jax.jit(actor_critic_update), state, data


def run(rounds: int = 21, batch=BATCH, hidden=HIDDEN, steps=("critic", "actor-critic")) -> dict:
    rows = []
    for step in steps:
        variants = {}
        for name, (norm, path) in norms().items():
            def make(norm=norm):
                c, ac, state, data = make_steps(norm, batch, hidden)
                return (c if step == "critic" else ac), (state, data)
            variants[name] = _compile(make, path)
        rows.append({"step": step, **race(variants, rounds)})
        print(rows[-1], flush=True)
    # The normalization alone, at the critic's hidden shape: what the layers differ in.
    x = jax.random.normal(jax.random.key(1), (2 * batch, hidden)) * 3.0 + 1.0
    variants = {name: _compile(lambda norm=norm: _fwd_bwd(norm(False), x), path) for name, (norm, path) in norms().items()}
    rows.append({"step": f"layer alone, {2 * batch}x{hidden} fwd+bwd", **race(variants, 5 * rounds)})
    print(rows[-1], flush=True)
    dev = jax.devices()[0]
    return {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__, "rounds": rounds,
            "batch": batch, "hidden": hidden, "rows": rows}


def to_markdown(r: dict) -> str:
    names = list(norms())
    lines = [f"CrossQ critic {OBS + ACT} -> {r['hidden']} -> {r['hidden']} -> 1, batch {r['batch']} "
             f"(joint forward of 2 x {r['batch']} rows), one jitted SGD step, median of {r['rounds']} "
             f"round-robin rounds on {r['device']}, jax {r['jax']}, {r.get('allocator', 'glibc default')}; "
             "ms (ratio to the sbx-style layer)", "",
             "| step | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for row in r["rows"]:
        lines.append(f"| {row['step']} | " + " | ".join(f"{row[n]['ms']:.2f} ({row[n]['ratio']:.2f})" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's moving malloc thresholds as they are (see steady_allocator)")
    a = p.parse_args(argv)
    allocator = "glibc default" if a.default_allocator or not steady_allocator() else "fixed malloc thresholds"
    result = {**run(a.rounds, a.batch, a.hidden), "allocator": allocator}
    print(save(result, a.out, "rl", to_markdown))


if __name__ == "__main__":
    main()
