"""One classifier run of the claims experiments, measured with ``normzoo.analysis``.

A run is a dict (``norm``, ``activation``, ``affine``, ``placement``, ``dropout``,
``init_scale``, ``learning_rate``, ``weight_decay``, ``train_subset``, ``steps`` and which
measurements to take); :func:`run` trains :class:`examples.claims.models.Net` on CIFAR-10 with SGD
(momentum ``config.momentum``, weight decay as an L2 term on every kernel) and returns its record:

* every ``log_every`` steps: the training loss and accuracy, and each layer's kernel gradient norm;
* every ``measure_every`` steps, on a fixed probe batch of training images (batch statistics of
  that batch): each block's pre-activation (what enters the activation function), as the share
  saturated (``|z| > 2``: sigmoid' < 0.105, tanh' < 0.071), the share in the near-linear region
  (``|z| < 1``), the share of dead channels (ReLU networks: z <= 0 on every probe example and
  position), the mean over channels of the channel mean and standard deviation;
  optionally (``measure_ics``) the internal covariate shift of every layer on the step's batch
  (``analysis.internal_covariate_shift``), and (``measure_jacobian``) the Jacobian spectrum of every
  block and of the whole network on ``jacobian_examples`` probe images (``analysis.jacobian_spectrum``);
* at the end: test accuracy (10,000 images) and training accuracy (``eval_train`` images of the
  run's training set), both in inference mode.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.cifar import input_pipeline
from examples.claims.models import Net, param_kernels
from normzoo import analysis

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

DEFAULTS = {"norm": "batch", "activation": "relu", "affine": True, "placement": "before", "dropout": 0.0,
            "init_scale": 1.0, "learning_rate": 0.05, "weight_decay": 0.0, "train_subset": 0, "steps": None,
            "measure_ics": False, "measure_jacobian": False}


def build(config, run: dict) -> Net:
    return Net(stages=tuple(tuple(s) for s in config.stages), norm=run["norm"], activation=run["activation"],
               affine=run["affine"], placement=run["placement"], dropout=run["dropout"],
               init_scale=run["init_scale"])


def _pre_stats(pre: list[jax.Array]) -> dict[str, jax.Array]:
    out: dict[str, list] = {"saturated": [], "linear": [], "dead": [], "channel_mean": [], "channel_std": []}
    for z in pre:
        z = jnp.reshape(z, (-1, z.shape[-1]))
        out["saturated"].append(jnp.mean(jnp.abs(z) > 2.0))
        out["linear"].append(jnp.mean(jnp.abs(z) < 1.0))
        out["dead"].append(jnp.mean(jnp.max(z, axis=0) <= 0.0))
        out["channel_mean"].append(jnp.mean(jnp.mean(z, 0)))
        out["channel_std"].append(jnp.mean(jnp.std(z, 0)))
    return {k: jnp.stack(v) for k, v in out.items()}


def make_functions(model: Net, config, run: dict):
    tx = optax.chain(
        optax.add_decayed_weights(run["weight_decay"], mask=lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", p)),
        optax.sgd(run["learning_rate"], momentum=config.momentum or None),
    )

    def forward(params, batch):
        x, y, batch_stats, key = batch
        logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, upd.get("batch_stats", {}))

    def loss_fn(params, batch):
        return forward(params, batch)[0]

    @jax.jit
    def train_step(params, opt_state, batch):
        (loss, (logits, stats)), grads = jax.value_and_grad(forward, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        gnorms = jnp.stack([jnp.linalg.norm(k) for _, k in param_kernels(grads)])
        return params, opt_state, stats, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch[1]),
                                          "grad_norm": gnorms}

    @jax.jit
    def probe(params, batch_stats, x):
        _, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats", "intermediates"], rngs={"dropout": jax.random.key(0)})
        pre = [state["intermediates"][f"blocks_{i}"]["pre"][0] for i in range(sum(len(s) for s in model.stages))]
        return _pre_stats(pre), state["intermediates"]["inputs"]

    @jax.jit
    def ics(params, batch):
        return analysis.internal_covariate_shift(loss_fn, params, batch, learning_rate=run["learning_rate"])

    @jax.jit
    def evaluate(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    return tx, train_step, probe, ics, evaluate


def spectra(model: Net, params, batch_stats, inputs, x, iterations: int) -> dict[str, list[float]]:
    """Per block and end to end: largest, median (spectral-density weighted) and smallest nonzero
    singular value of the Jacobian on these examples (batch statistics of these examples)."""
    variables = {"params": params, "batch_stats": batch_stats}
    out: dict[str, list[float]] = {"largest": [], "median": [], "smallest": []}

    def summary(spec):
        cum = np.cumsum(spec.weights[::-1])[::-1]
        out["largest"].append(spec.largest)
        out["median"].append(float(spec.singular_values[np.argmax(cum <= 0.5)] if np.any(cum <= 0.5)
                                   else spec.singular_values[-1]))
        out["smallest"].append(spec.smallest_nonzero(1e-3))

    for i, h in enumerate(inputs):
        def block(h, i=i):
            return model.apply(variables, h, i, True, method=Net.block, mutable=["batch_stats", "intermediates"])[0]
        summary(analysis.jacobian_spectrum(block, h, method="lanczos", iterations=iterations))

    def whole(x):
        return model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                           rngs={"dropout": jax.random.key(0)})[0]
    summary(analysis.jacobian_spectrum(whole, x, method="lanczos", iterations=iterations))
    return out


def accuracy(evaluate, params, batch_stats, images, labels, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        x = input_pipeline.standardize(jnp.asarray(images[i:i + batch]))
        correct += int(evaluate(params, batch_stats, x, jnp.asarray(labels[i:i + batch])))
    return correct / len(images)


def run(config, run: dict, data, progress: bool = True, label: str = "") -> dict[str, Any]:
    """Trains and measures one run (see the module docstring); returns its record."""
    run = {**DEFAULTS, **run}
    steps = run["steps"] or config.steps
    model = build(config, run)
    images, labels = data.train_images, data.train_labels
    if run["train_subset"]:
        images, labels = images[: run["train_subset"]], labels[: run["train_subset"]]
    n, bs = len(images), config.batch_size
    if n < bs:
        raise ValueError(f"config.batch_size={bs} exceeds the run's {n} training images.")
    key = jax.random.key(config.seed)
    variables = jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros((bs, 32, 32, 3)))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx, train_step, probe, ics, evaluate = make_functions(model, config, run)
    opt_state = tx.init(params)
    probe_x = input_pipeline.standardize(jnp.asarray(data.train_images[-config.probe_examples:]))
    images_j, labels_j = jnp.asarray(images), jnp.asarray(labels)
    perm_key, drop_key = jax.random.split(jax.random.key(config.seed + 1))
    rec: dict[str, Any] = {"run": {k: v for k, v in run.items()}, "steps": [], "train_loss": [], "train_accuracy": [],
                           "grad_norm": [], "measure_steps": [], "pre": [], "ics_l2": [], "ics_cosine": [],
                           "jacobian": [], "diverged_at": None}
    bar = tqdm(total=steps, desc=label, unit="step", dynamic_ncols=True, leave=False) \
        if progress and tqdm is not None else None
    window, perm, t0 = [], None, time.perf_counter()
    for step in range(steps + 1):
        measure_now = step % config.measure_every == 0 or step == steps
        if measure_now:
            stats, inputs = jax.device_get(probe(params, batch_stats, probe_x))
            rec["measure_steps"].append(step)
            rec["pre"].append({k: np.asarray(v).tolist() for k, v in stats.items()})
            if run["measure_jacobian"]:
                k = config.jacobian_examples
                rec["jacobian"].append(spectra(model, params, batch_stats, [h[:k] for h in inputs], probe_x[:k],
                                               config.jacobian_iterations))
        if step == steps:
            break
        epoch, i = divmod(step, n // bs)
        if i == 0:
            perm = jax.random.permutation(jax.random.fold_in(perm_key, epoch), n)
        idx = perm[i * bs:(i + 1) * bs]
        batch = (input_pipeline.standardize(images_j[idx]), labels_j[idx], batch_stats,
                 jax.random.fold_in(drop_key, step))
        if measure_now and run["measure_ics"]:
            m = jax.device_get(ics(params, batch))
            rec["ics_l2"].append(m.l2.tolist())
            rec["ics_cosine"].append(m.cosine.tolist())
        params, opt_state, batch_stats, metrics = train_step(params, opt_state, batch)
        window.append(metrics)
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            w = jax.device_get(window)
            window = []
            loss = float(np.mean([m["loss"] for m in w]))
            rec["steps"].append(step + 1)
            rec["train_loss"].append(loss)
            rec["train_accuracy"].append(float(np.mean([m["accuracy"] for m in w])))
            rec["grad_norm"].append(np.mean([m["grad_norm"] for m in w], 0).tolist())
            if not math.isfinite(loss) and rec["diverged_at"] is None:
                rec["diverged_at"] = step + 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{rec['train_accuracy'][-1]:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rec["test_accuracy"] = accuracy(evaluate, params, batch_stats, data.test_images, data.test_labels)
    k = min(len(images), config.eval_train)
    rec["train_eval_accuracy"] = accuracy(evaluate, params, batch_stats, images[:k], labels[:k])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def steps_to(rec: dict, target: float, window: int = 3) -> int | None:
    """The first step at which the training accuracy, averaged over ``window`` logs, reaches ``target``."""
    acc = np.asarray(rec["train_accuracy"], np.float64)
    if acc.size < window:
        return None
    avg = np.convolve(acc, np.ones(window) / window, mode="valid")
    hit = np.flatnonzero(avg >= target)
    return int(rec["steps"][hit[0] + window - 1]) if hit.size else None
