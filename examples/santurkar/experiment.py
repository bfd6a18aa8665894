"""One training run of the reproduction, measured with ``normzoo.analysis`` every few steps.

    python -m examples.santurkar.experiment CONFIG_JSON RUN WORKDIR [POSITION]

VGG on CIFAR-10 as in Santurkar et al. 2018: plain SGD, constant learning rate, batch 128, no
augmentation. Every ``measure_every`` steps, on that step's batch and before the step is taken
(the measurement callback of the loop, :func:`measure`):

* internal covariate shift per layer (Definition 2.1; ``normzoo.analysis.internal_covariate_shift``
  with the SGD step the loop then takes);
* the loss and gradient along the gradient for ``eta = lr * step_multipliers``
  (``normzoo.analysis.loss_landscape``): loss range, gradient predictiveness, effective smoothness;
* each normalizer's output (the input of the ReLU): percentiles, share below zero, and its
  change of per-channel mean and standard deviation over the step, noisy BatchNorm's noise
  drawn anew as the next step draws it (``capture`` / ``activation_stats`` / ``distribution_shift``).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import normzoo
from examples.cifar import input_pipeline
from examples.cifar.models import VGG
from normzoo import analysis

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

_LINEAR = (nn.Dense, nn.Conv, normzoo.WeightNormDense, normzoo.WeightNormConv, normzoo.CosineDense,
           normzoo.CosineConv)


def parse_run(run: str) -> tuple[str, float]:
    """``"batch@0.1"`` -> ``("batch", 0.1)``."""
    norm, sep, lr = run.partition("@")
    try:
        value = float(lr)
    except ValueError:
        value = math.nan
    if not sep or norm not in normzoo.available() or not value > 0:
        raise ValueError(
            f"run {run!r} must be NORM@LEARNING_RATE with NORM one of {normzoo.available()} and a "
            "positive learning rate, e.g. 'batch@0.1'."
        )
    return norm, value


def build_model(config, norm: str) -> VGG:
    stages = tuple(tuple(max(1, w // config.width_divisor) for w in stage) for stage in config.stages)
    return VGG(norm=norm, stages=stages)


def _is_norm(module, method) -> bool:
    # The normalizers' outputs: the pre-activations that enter each ReLU.
    return method == "__call__" and not isinstance(module, _LINEAR) and module.parent is not None \
        and not isinstance(module, VGG)


def make_functions(model, lr: float, multipliers, probe_examples: int):
    """The jitted train step and measurement of one run."""

    def forward(params, batch):
        x, y, batch_stats, key = batch
        (logits, upd) = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"], rngs={"noise": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, upd.get("batch_stats", {}))

    def loss_fn(params, batch):  # what normzoo.analysis measures: the training loss
        return forward(params, batch)[0]

    @jax.jit
    def train_step(params, batch):
        (loss, (logits, stats)), grads = jax.value_and_grad(forward, has_aux=True)(params, batch)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)  # plain SGD, as the paper
        return params, stats, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch[1])}

    def activations(params, batch):
        x, _, batch_stats, key = batch
        _, acts = analysis.capture(model, {"params": params, "batch_stats": batch_stats}, x, train=True,
                                   filter=_is_norm, mutable=["batch_stats"], rngs={"noise": key})
        # The whole batch goes through the model (batch statistics as in training); the
        # percentiles (a sort) are taken over the first probe_examples examples' activations.
        return analysis.activation_stats({k: a[:probe_examples] for k, a in acts.items()})

    @jax.jit
    def measure(params, batch, next_key):
        ics = analysis.internal_covariate_shift(loss_fn, params, batch, learning_rate=lr)
        land = analysis.loss_landscape(loss_fn, params, batch, lr * jnp.asarray(multipliers))
        stepped = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss_fn)(params, batch))
        # What each layer sees on these images now and after the step, when noisy_batch's noise
        # has been drawn anew (the other normalizers ignore the key).
        before, after = activations(params, batch), activations(stepped, batch[:3] + (next_key,))
        return ics, land, before, analysis.distribution_shift(before, after)

    @jax.jit
    def evaluate(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    return train_step, measure, evaluate


def _accuracy(evaluate, params, batch_stats, images, labels, batch=500) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        x = input_pipeline.standardize(jnp.asarray(images[i:i + batch]))
        correct += int(evaluate(params, batch_stats, x, jnp.asarray(labels[i:i + batch])))
    return correct / len(images)


def _ordered(names) -> list[str]:
    # Layer names in depth order: "BatchNorm_10" after "BatchNorm_9".
    def key(name):
        tail = name.rsplit("_", 1)[-1]
        return (name.rsplit("_", 1)[0], int(tail) if tail.isdigit() else -1)
    return sorted(names, key=key)


def run(config: ml_collections.ConfigDict, run_name: str, workdir: str | Path, data=None,
        progress: bool = True, position: int = 0) -> dict:
    """Trains one ``norm@lr`` run with measurements; writes and returns its record."""
    norm, lr = parse_run(run_name)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = input_pipeline.load(config.data_dir or None, expected_per_file=config.expected_per_file)
    train_images, train_labels = data.train_images, data.train_labels
    if config.train_subset:
        train_images, train_labels = train_images[: config.train_subset], train_labels[: config.train_subset]
    n, bs = len(train_images), config.batch_size
    if n < bs:
        raise ValueError(f"config.batch_size={bs} exceeds the {n} training images.")
    model = build_model(config, norm)
    key = jax.random.key(config.seed)
    sample = jnp.zeros((bs, 32, 32, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=True))(key, sample)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    train_step, measure, evaluate = make_functions(model, lr, tuple(config.step_multipliers), config.probe_examples)
    images = jnp.asarray(train_images)
    labels = jnp.asarray(train_labels)
    perm_key, noise_key = jax.random.split(jax.random.key(config.seed + 1))

    record = {"run": run_name, "norm": norm, "learning_rate": lr, "steps": [], "train_loss": [],
              "train_accuracy": [], "eval_steps": [], "test_accuracy": [], "measure_steps": [],
              "ics_l2": [], "ics_cosine": [], "grad_norm": [], "landscape_loss": [],
              "landscape_grad_distance": [], "loss": [], "smoothness": [], "activation_percentiles": [],
              "activation_negative": [], "shift_mean": [], "shift_std": [], "diverged_at": None}
    bar = tqdm(total=config.steps, desc=run_name, unit="step", dynamic_ncols=True, leave=False,
               position=position) if progress and tqdm is not None else None
    window, t0, measure_time = [], time.perf_counter(), 0.0
    perm = None
    for step in range(config.steps):
        epoch, i = divmod(step, n // bs)
        if i == 0:
            perm = jax.random.permutation(jax.random.fold_in(perm_key, epoch), n)
        idx = perm[i * bs:(i + 1) * bs]
        x = input_pipeline.standardize(images[idx])
        batch = (x, labels[idx], batch_stats, jax.random.fold_in(noise_key, step))
        if step % config.measure_every == 0:  # the measurement callback, before the step
            tm = time.perf_counter()
            ics, land, acts, shift = jax.device_get(measure(params, batch, jax.random.fold_in(noise_key, step + 1)))
            names = _ordered(acts)
            record["measure_steps"].append(step)
            record["layers"] = list(ics.layers)
            record["ics_l2"].append(ics.l2.tolist())
            record["ics_cosine"].append(ics.cosine.tolist())
            record["grad_norm"].append(ics.grad_norm.tolist())
            record["landscape_loss"].append(land.loss.tolist())
            record["landscape_grad_distance"].append(land.grad_distance.tolist())
            record["loss"].append(float(land.loss0))
            record["smoothness"].append(float(land.smoothness))
            record["norm_layers"] = names
            record["quantiles"] = list(acts[names[0]].quantiles)
            record["activation_percentiles"].append([acts[k].percentiles.tolist() for k in names])
            record["activation_negative"].append([float(acts[k].negative) for k in names])
            record["shift_mean"].append([float(shift[k]["mean"]) for k in names])
            record["shift_std"].append([float(shift[k]["std"]) for k in names])
            measure_time += time.perf_counter() - tm
        params, batch_stats, metrics = train_step(params, batch)
        window.append(metrics)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            m = jax.device_get(window)
            window = []
            loss = float(np.mean([w["loss"] for w in m]))
            record["steps"].append(step + 1)
            record["train_loss"].append(loss)
            record["train_accuracy"].append(float(np.mean([w["accuracy"] for w in m])))
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{record['train_accuracy'][-1]:.3f}")
            if not math.isfinite(loss) and record["diverged_at"] is None:
                record["diverged_at"] = step + 1
        if (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            sub = slice(0, config.eval_subset)
            record["eval_steps"].append(step + 1)
            record["test_accuracy"].append(
                _accuracy(evaluate, params, batch_stats, data.test_images[sub], data.test_labels[sub]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    record["eval_steps"].append(config.steps)
    record["test_accuracy"].append(_accuracy(evaluate, params, batch_stats, data.test_images, data.test_labels))
    record["wall_s"] = time.perf_counter() - t0
    record["measure_s"] = measure_time
    (workdir / "record.json").write_text(json.dumps(record))
    return record


def main(argv) -> None:
    config = ml_collections.ConfigDict(json.loads(Path(argv[1]).read_text()))
    run(config, argv[2], argv[3], position=int(argv[4]) if len(argv) > 4 else 0)


if __name__ == "__main__":
    main(sys.argv)
