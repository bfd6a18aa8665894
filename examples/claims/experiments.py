"""The experiments, one function per claim or group of claims: each takes ``(config, data,
progress)`` and returns a JSON-able record (``runs`` and a ``summary``); :mod:`examples.claims.main`
runs them and :mod:`examples.claims.plots` draws them.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import normzoo
from examples.cifar import input_pipeline
from examples.claims import models, train
from normzoo import analysis

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


def _runs(config, data, specs: dict[str, dict], progress: bool) -> dict[str, dict]:
    out = {}
    names = list(specs)
    for i, name in enumerate(names):
        out[name] = train.run(config, specs[name], data, progress=progress, label=f"[{i + 1}/{len(names)}] {name}")
    return out


def _mean_over_layers(rec: dict, key: str, at: int) -> float:
    return float(np.mean(rec["pre"][at][key]))


def _median(values) -> float:
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


# ----------------------------------------------------------------------------- claims 1, 2, 3 (and 8)


VARIANTS = {"none": {"norm": "none"}, "batch": {"norm": "batch"},
            "batch_no_affine": {"norm": "batch", "affine": False},
            "batch_after": {"norm": "batch", "placement": "after"}}


def activations(config, data, progress=True) -> dict:
    """Sigmoid, tanh and ReLU VGGs with BatchNorm (before the activation), BatchNorm without
    gamma/beta, BatchNorm after the activation, and no normalizer; ICS measured on the ReLU
    networks with and without gamma/beta (claim 8)."""
    specs = {}
    for act in ("sigmoid", "tanh", "relu"):
        for variant, spec in VARIANTS.items():
            specs[f"{act}/{variant}"] = {**spec, "activation": act, "learning_rate": config.activation_lr,
                                         "measure_ics": act == "relu" and variant in ("batch", "batch_no_affine")}
    runs = _runs(config, data, specs, progress)
    summary = {}
    for name, rec in runs.items():
        g = np.asarray(rec["grad_norm"], np.float64)
        ratio = g[:, 0] / g[:, -1]
        summary[name] = {
            "test_accuracy": rec["test_accuracy"], "final_train_loss": rec["train_loss"][-1],
            "saturated_init": _mean_over_layers(rec, "saturated", 0), "saturated_end": _mean_over_layers(rec, "saturated", -1),
            "linear_init": _mean_over_layers(rec, "linear", 0), "linear_end": _mean_over_layers(rec, "linear", -1),
            "dead_init": _mean_over_layers(rec, "dead", 0), "dead_end": _mean_over_layers(rec, "dead", -1),
            "first_last_grad_ratio_init": float(ratio[0]), "first_last_grad_ratio": _median(ratio),
            "ics_cosine": _median(np.mean(rec["ics_cosine"], 1)) if rec["ics_cosine"] else None,
            "ics_l2": _median(np.mean(rec["ics_l2"], 1)) if rec["ics_l2"] else None,
            "wall_s": rec["wall_s"],
        }
    return {"runs": runs, "summary": summary}


# ----------------------------------------------------------------------------- claim 4


def learning_rates(config, data, progress=True) -> dict:
    """A learning-rate sweep with and without BatchNorm (steps to a target training accuracy),
    initial weights scaled by ``init_scales`` at the activations' learning rate, and BatchNorm
    without gamma/beta at the learning rates ``no_affine_lrs`` (where dead ReLUs appear: claim 1)."""
    specs = {}
    for norm in ("none", "batch"):
        for lr in config.sweep_lrs:
            specs[f"{norm}@{lr:g}"] = {"norm": norm, "learning_rate": lr}
        for s in config.init_scales:
            specs[f"{norm}@{config.activation_lr:g}/init x{s:g}"] = {"norm": norm, "learning_rate": config.activation_lr,
                                                                    "init_scale": s}
    for lr in config.no_affine_lrs:
        specs[f"batch_no_affine@{lr:g}"] = {"norm": "batch", "affine": False, "learning_rate": lr}
    runs = _runs(config, data, specs, progress)
    summary = {name: {"norm": rec["run"]["norm"], "affine": rec["run"]["affine"],
                      "learning_rate": rec["run"]["learning_rate"], "init_scale": rec["run"]["init_scale"],
                      "dead_end": float(np.max(rec["pre"][-1]["dead"])),
                      "steps_to_target": train.steps_to(rec, config.target_accuracy),
                      "test_accuracy": rec["test_accuracy"], "final_train_loss": rec["train_loss"][-1],
                      "diverged_at": rec["diverged_at"], "wall_s": rec["wall_s"]}
               for name, rec in runs.items()}
    return {"runs": runs, "summary": summary, "target_accuracy": config.target_accuracy}


# ----------------------------------------------------------------------------- claim 5


def regularization(config, data, progress=True) -> dict:
    """BatchNorm, dropout and weight decay, alone and combined, on ``reg_subset`` training
    images for ``reg_steps`` steps: the train-test gap."""
    extras = {"plain": {}, "dropout": {"dropout": config.reg_dropout},
              "weight_decay": {"weight_decay": config.reg_weight_decay},
              "dropout+weight_decay": {"dropout": config.reg_dropout, "weight_decay": config.reg_weight_decay}}
    specs = {f"{norm}/{e}": {"norm": norm, "train_subset": config.reg_subset, "steps": config.reg_steps,
                             "learning_rate": config.activation_lr, **extra}
             for norm in ("none", "batch") for e, extra in extras.items()}
    runs = _runs(config, data, specs, progress)
    summary = {name: {"train_accuracy": rec["train_eval_accuracy"], "test_accuracy": rec["test_accuracy"],
                      "gap": rec["train_eval_accuracy"] - rec["test_accuracy"],
                      "final_train_loss": rec["train_loss"][-1], "wall_s": rec["wall_s"]}
               for name, rec in runs.items()}
    return {"runs": runs, "summary": summary}


# ----------------------------------------------------------------------------- claims 7, 10


def normalizers(config, data, progress=True) -> dict:
    """ReLU VGGs with each of ``config.normalizers`` (IterNorm among them): accuracy, and the
    Jacobian spectra of every block and of the whole network through training."""
    specs = {norm: {"norm": norm, "learning_rate": config.normalizer_lr, "measure_jacobian": True}
             for norm in config.normalizers}
    runs = _runs(config, data, specs, progress)
    summary = {}
    for name, rec in runs.items():
        j0, j1 = rec["jacobian"][0], rec["jacobian"][-1]
        summary[name] = {
            "test_accuracy": rec["test_accuracy"], "final_train_loss": rec["train_loss"][-1],
            "steps_to_target": train.steps_to(rec, config.target_accuracy),
            "block_median_init": _median(j0["median"][:-1]), "block_median_end": _median(j1["median"][:-1]),
            "block_largest_init": float(np.max(j0["largest"][:-1])), "block_largest_end": float(np.max(j1["largest"][:-1])),
            "net_largest_init": j0["largest"][-1], "net_largest_end": j1["largest"][-1],
            "net_condition_init": j0["largest"][-1] / max(j0["smallest"][-1], 1e-30),
            "net_condition_end": j1["largest"][-1] / max(j1["smallest"][-1], 1e-30),
            "wall_s": rec["wall_s"],
        }
    return {"runs": runs, "summary": summary, "target_accuracy": config.target_accuracy}


# ----------------------------------------------------------------------------- claim 6


def _linear_data(config, data):
    n = config.linear_examples
    x = jnp.asarray(data.train_images[:n], jnp.float32) / 255.0
    x = x.reshape(n, 8, 4, 8, 4, 3).mean((2, 4)).reshape(n, -1)  # 8x8x3 averages: 192 features
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = jax.nn.one_hot(jnp.asarray(data.train_labels[:n]), 10)
    return x, y


def deep_linear(config, data, progress=True) -> dict:
    """Santurkar et al.'s deep linear network (``linear_depth`` bias-free dense layers, no
    activation), with and without BatchNorm after each layer, trained by full-batch gradient
    descent on the squared error to one-hot labels; ICS of every layer every
    ``linear_measure_every`` steps (``analysis.internal_covariate_shift`` with the step taken)."""
    x, y = _linear_data(config, data)
    lr = config.linear_lr
    runs = {}
    for norm in ("none", "batch"):
        model = models.DeepLinear(config.linear_depth, config.linear_width, norm)
        variables = model.init(jax.random.key(config.seed), x)
        params, stats = variables["params"], variables.get("batch_stats", {})

        def loss_fn(params, batch, model=model):
            x, y, stats = batch
            out, _ = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))

        step = jax.jit(lambda p, b, loss_fn=loss_fn: jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss_fn)(p, b)))
        ics = jax.jit(functools.partial(analysis.internal_covariate_shift, loss_fn, learning_rate=lr))
        loss = jax.jit(loss_fn)
        rec: dict[str, Any] = {"norm": norm, "steps": [], "loss": [], "ics_l2": [], "ics_cosine": [], "grad_norm": []}
        t0 = time.perf_counter()
        bar = tqdm(range(config.linear_steps), desc=f"deep linear, {norm}", leave=False) \
            if progress and tqdm is not None else range(config.linear_steps)
        for t in bar:
            batch = (x, y, stats)
            if t % config.linear_measure_every == 0:
                m = jax.device_get(ics(params, batch))
                rec["steps"].append(t)
                rec["loss"].append(float(loss(params, batch)))
                rec["ics_l2"].append(m.l2.tolist())
                rec["ics_cosine"].append(m.cosine.tolist())
                rec["grad_norm"].append(m.grad_norm.tolist())
                rec["layers"] = list(m.layers)
            params = step(params, batch)
        rec["final_loss"] = float(loss(params, (x, y, stats)))
        rec["wall_s"] = time.perf_counter() - t0
        runs[norm] = rec
    summary = {}
    for norm, rec in runs.items():
        l2, cos, g = (np.asarray(rec[k], np.float64) for k in ("ics_l2", "ics_cosine", "grad_norm"))
        rel = l2 / np.maximum(g, 1e-30)
        summary[norm] = {"ics_l2": _median(l2[1:].mean(1)), "ics_relative": _median(rel[1:, 1:].mean(1)),
                         "ics_cosine": _median(cos[1:, 1:].mean(1)), "initial_loss": rec["loss"][0],
                         "final_loss": rec["final_loss"], "wall_s": rec["wall_s"]}
    return {"runs": runs, "summary": summary}


# ----------------------------------------------------------------------------- claim 9


def _psnr(a, b) -> jax.Array:
    mse = jnp.mean((jnp.clip(a, 0.0, 1.0) - b) ** 2, axis=(1, 2, 3))
    return -10.0 * jnp.log10(mse)


def super_resolution(config, data, progress=True) -> dict:
    """x2 super-resolution of CIFAR-10 images (16x16 -> 32x32, 2x2 averages as inputs) by an
    EDSR-style network with and without BatchNorm in its residual blocks (L1 loss, Adam): PSNR
    on ``sr_test`` test images against the bicubic upsampling's."""
    train_images = jnp.asarray(data.train_images)  # uint8; each batch converted in the step
    hr_test = jnp.asarray(data.test_images[: config.sr_test], jnp.float32) / 255.0
    lr_test = models.downsample(hr_test)
    bicubic = float(jnp.mean(_psnr(models.upsample_bicubic(lr_test), hr_test)))
    runs = {}
    for norm in ("none", "batch"):
        model = models.EDSR(config.sr_features, config.sr_blocks, norm)
        variables = model.init(jax.random.key(config.seed), lr_test[:2], train=False)
        params, stats = variables["params"], variables.get("batch_stats", {})
        tx = optax.adam(config.sr_lr)
        opt = tx.init(params)

        def loss_fn(params, stats, hr, model=model):
            out, upd = model.apply({"params": params, "batch_stats": stats}, models.downsample(hr), train=True,
                                   mutable=["batch_stats"])
            return jnp.mean(jnp.abs(out - hr)), upd.get("batch_stats", {})

        @jax.jit
        def step(params, opt, stats, images, key, loss_fn=loss_fn, tx=tx):
            pick, flip = jax.random.split(key)
            hr = images[jax.random.randint(pick, (config.sr_batch,), 0, images.shape[0])].astype(jnp.float32) / 255.0
            hr = jnp.where(jax.random.bernoulli(flip, 0.5), hr[:, :, ::-1], hr)  # random horizontal flips
            (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, hr)
            updates, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, updates), opt, stats, loss

        @jax.jit
        def psnr(params, stats, lo, hi, model=model):
            return _psnr(model.apply({"params": params, "batch_stats": stats}, lo, train=False), hi)

        rec: dict[str, Any] = {"norm": norm, "steps": [], "loss": [], "eval_steps": [], "psnr": []}
        key, t0, window = jax.random.key(config.seed + 1), time.perf_counter(), []
        bar = tqdm(range(config.sr_steps), desc=f"super-resolution, {norm}", leave=False) \
            if progress and tqdm is not None else range(config.sr_steps)
        for t in bar:
            params, opt, stats, loss = step(params, opt, stats, train_images, jax.random.fold_in(key, t))
            window.append(loss)
            if (t + 1) % config.log_every == 0:
                rec["steps"].append(t + 1)
                rec["loss"].append(float(np.mean(jax.device_get(window))))
                window = []
            if (t + 1) % max(1, config.sr_steps // 6) == 0 or t + 1 == config.sr_steps:
                rec["eval_steps"].append(t + 1)
                rec["psnr"].append(float(jnp.mean(psnr(params, stats, lr_test, hr_test))))
        train_mode = model.apply({"params": params, "batch_stats": stats}, lr_test, train=True,
                                 mutable=["batch_stats"])[0]
        rec["psnr_batch_statistics"] = float(jnp.mean(_psnr(train_mode, hr_test)))
        rec["wall_s"] = time.perf_counter() - t0
        runs[norm] = rec
    summary = {norm: {"psnr": rec["psnr"][-1], "psnr_gain_over_bicubic": rec["psnr"][-1] - bicubic,
                      "psnr_batch_statistics": rec["psnr_batch_statistics"], "final_l1": rec["loss"][-1] if rec["loss"] else None,
                      "wall_s": rec["wall_s"]} for norm, rec in runs.items()}
    return {"runs": runs, "summary": summary, "bicubic_psnr": bicubic}


# ----------------------------------------------------------------------------- claim 11


class _Probe(nn.Module):
    """One layer as the registry builds it: a 3x3 convolution followed by the normalizer."""

    norm: str

    @nn.compact
    def __call__(self, x):
        spec = normzoo.make(self.norm)
        return spec.norm(train=True)(spec.conv(16, (3, 3), use_bias=spec.is_identity)(x))


def invariance(config, data, progress=True) -> dict:
    """For every registry name: the relative output change of conv + normalizer (batch statistics)
    when the convolution's kernel, the whole input or each example is re-scaled, on real
    standardized CIFAR-10 images, and the kernel's gradient-norm ratio."""
    x = input_pipeline.standardize(jnp.asarray(data.test_images[: config.invariance_examples]))
    summary = {}
    names = normzoo.available()
    for name in (tqdm(names, desc="invariance", leave=False) if progress and tqdm is not None else names):
        model = _Probe(name)
        rngs = {"params": jax.random.key(0), "noise": jax.random.key(1)}
        variables = model.init(rngs, x)

        def fn(p, x, model=model, variables=variables):
            return model.apply({**variables, "params": p}, x, mutable=["batch_stats"], rngs={"noise": jax.random.key(2)})[0]

        # The convolution's weights: its kernel (WeightNorm's direction v).
        p = analysis.invariance_probe(fn, variables["params"], x, weights=lambda path, _: path.endswith(("kernel", "/v")),
                                      factors=tuple(config.invariance_factors))
        summary[name] = {"factors": list(p.factors), "weights": p.weights_output.tolist(),
                         "grad_ratio": p.weights_grad_ratio.tolist(), "input": p.input_output.tolist(),
                         "example": p.example_output.tolist()}
    return {"summary": summary}


EXPERIMENTS = {"activations": activations, "learning_rates": learning_rates, "regularization": regularization,
               "deep_linear": deep_linear, "normalizers": normalizers, "super_resolution": super_resolution,
               "invariance": invariance}
