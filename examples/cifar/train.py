"""Training and evaluation of one CIFAR-10 model: one jitted step, data parallel with synced BN.

Data parallelism is plain ``jax.jit`` over a 1-D mesh of all local devices: the batch is
sharded along ``data`` with ``NamedSharding``, parameters are replicated, and the compiler
reduces the batch statistics of every normzoo layer across devices (synced BN, no ``pmap``).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.cifar import input_pipeline, models

try:  # progress bars are an extra ('examples'); training works without them
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key data (typed keys do not serialize)


def parse_overrides(text: str) -> dict:
    """``"r_max=2.0,warmup_steps=100"`` -> ``{"r_max": 2.0, "warmup_steps": 100}`` (Python literals)."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config.norm_overrides: {item!r} is not key=value (e.g. 'r_max=2.0,d_max=3').")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word, e.g. a name
    return out


def format_overrides(overrides: dict) -> str:
    return ",".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))


def build_model(config: ml_collections.ConfigDict):
    dtype = jnp.bfloat16 if config.get("bfloat16", False) else jnp.float32
    overrides = tuple(sorted(parse_overrides(config.get("norm_overrides", "")).items()))
    kwargs = dict(norm=config.norm, num_classes=10, norm_overrides=overrides, dtype=dtype)
    if config.model == "resnet20":
        kwargs["width"] = config.width
        kwargs["blocks_per_stage"] = config.get("blocks_per_stage", 3)
    elif config.model == "vgg":
        scale = config.width / 64
        kwargs["stages"] = tuple(tuple(max(1, int(w * scale)) for w in s)
                                 for s in ((64,), (128,), (256, 256), (512, 512), (512, 512)))
    api = config.get("api", "linen")
    if api == "nnx":
        from examples.cifar import nnx_models  # noqa: PLC0415  (flax.nnx only when asked for)

        return nnx_models.Functional(config.model, **kwargs)
    if api != "linen":
        raise ValueError(f"config.api={api!r} is not 'linen' or 'nnx'.")
    return models.create(config.model, **kwargs)


def learning_rate_schedule(config, steps_per_epoch: int):
    total = max(1, int(config.num_epochs * steps_per_epoch))
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    peak = config.learning_rate * config.batch_size / 128
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), total, end_value=0.0)


def make_optimizer(config, steps_per_epoch: int):
    schedule = learning_rate_schedule(config, steps_per_epoch)
    # Weight decay on kernels only (not on norm scales/biases or WeightNorm's g).
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: getattr(path[-1], "key", "") in ("kernel", "v"), p)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=True),
    ), schedule


def check_batch_size(batch_size: int, n_devices: int) -> None:
    if batch_size % n_devices:
        raise ValueError(
            f"config.batch_size={batch_size} is not divisible by the {n_devices} local devices; "
            f"use a multiple of {n_devices} (e.g. {n_devices * max(1, round(batch_size / n_devices))}) "
            "so that every device gets the same share of each batch."
        )


def create_state(config, model, tx, sample, key) -> TrainState:
    k_init, k_data = jax.random.split(key)
    # One compiled initialiser: eagerly, every initialiser of every shape is compiled on its own.
    variables = jax.jit(functools.partial(model.init, train=True))(k_init, sample)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
        key=jax.random.key_data(k_data),
    )


def make_train_step(model, tx, num_train: int, batch_size: int, augment: str = "crop_flip",
                    batch_sharding=None):
    """One jitted step: draw the batch (the epoch's permutation), augment, forward, update.

    With ``batch_sharding`` the drawn batch is split across devices; the normzoo layers'
    statistics are then reduced across devices by the compiler (synced BN).
    """

    def step_fn(state: TrainState, images, labels, perm):
        i = state.step % (num_train // batch_size)
        idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
        x, y = images[idx], labels[idx]
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
            y = jax.lax.with_sharding_constraint(y, batch_sharding)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        x = input_pipeline.augment(key, x, augment)
        x = input_pipeline.standardize(x)

        def loss_fn(params):
            # rngs: the stream of noisy_batch's noise (unused by the other normalizers).
            logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                      train=True, mutable=["batch_stats"],
                                      rngs={"noise": jax.random.fold_in(key, 1)})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, upd.get("batch_stats", {}))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
        return new, {"loss": loss, "accuracy": acc}

    return step_fn


def make_eval_step(model):
    def eval_fn(params, batch_stats, images, labels, valid):
        x = input_pipeline.standardize(images)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels) & valid
        return jnp.sum(correct), jnp.sum(jnp.where(valid, loss, 0.0))

    return eval_fn


def evaluate(eval_fn, state, images, labels, batch_size, data_sharding) -> dict[str, float]:
    """Accuracy and loss on every image (the last batch is padded and masked)."""
    n = len(images)
    correct, loss = 0.0, 0.0
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size]
        y = labels[start:start + batch_size]
        valid = np.ones(len(x), bool)
        if len(x) < batch_size:
            pad = batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        c, s = eval_fn(state.params, state.batch_stats, jax.device_put(x, data_sharding),
                       jax.device_put(y, data_sharding), jax.device_put(valid, data_sharding))
        correct += float(c)
        loss += float(s)
    return {"accuracy": correct / n, "loss": loss / n}


def save_checkpoint(path: Path, state: TrainState, meta: dict) -> None:
    """Atomically writes the full training state (resumable) next to its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(serialization.to_bytes(jax.device_get(state)))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def restore_checkpoint(path: Path, template: TrainState) -> tuple[TrainState, dict]:
    state = serialization.from_bytes(template, path.read_bytes())
    return state, json.loads(path.with_suffix(".json").read_text())


def save_variables(path: Path, state: TrainState) -> None:
    """Writes the final ``{'params', 'batch_stats'}`` (reload with :func:`load_variables`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    path.write_bytes(serialization.to_bytes(jax.device_get(variables)))


def load_variables(path: Path, config: ml_collections.ConfigDict) -> dict:
    """Loads saved variables for the model that ``config`` describes."""
    model = build_model(config)
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    return serialization.from_bytes(template, Path(path).read_bytes())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, data=None,
                       progress: bool = True, position: int = 0) -> dict:
    """Trains ``config.model`` with ``config.norm`` and returns the history and summary.

    Writes ``workdir/checkpoint.msgpack`` (resumable, every epoch), ``workdir/variables.msgpack``
    (final params and batch_stats) and ``workdir/history.json``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = input_pipeline.load(config.get("data_dir") or None,
                                   expected_per_file=config.get("expected_per_file", 10000))
    devices = jax.local_devices()[: config.get("devices", 0) or None]  # 0: every local device
    n_dev = len(devices)
    check_batch_size(config.batch_size, n_dev)
    mesh = jax.make_mesh((n_dev,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    train_images, train_labels = data.train_images, data.train_labels
    if config.get("train_subset"):
        train_images, train_labels = train_images[: config.train_subset], train_labels[: config.train_subset]
    test_images, test_labels = data.test_images, data.test_labels
    if config.get("test_subset"):
        test_images, test_labels = test_images[: config.test_subset], test_labels[: config.test_subset]
    num_train = len(train_images)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_train} training images.")
    total_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
    model = build_model(config)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    key = jax.random.key(config.seed)
    sample = jnp.zeros((config.batch_size, 32, 32, 3), jnp.float32)
    state = create_state(config, model, tx, sample, key)
    state = jax.device_put(state, replicated)

    ckpt = workdir / "checkpoint.msgpack"
    history: dict[str, list] = {"step": [], "train_loss": [], "train_accuracy": [], "test_accuracy": [],
                                "test_loss": [], "epoch": []}
    train_time = 0.0
    if config.get("resume", True) and ckpt.exists():
        state, meta = restore_checkpoint(ckpt, jax.device_get(state))
        state = jax.device_put(state, replicated)
        history, train_time = meta["history"], meta["train_time"]

    images_dev = jax.device_put(train_images, replicated)
    labels_dev = jax.device_put(train_labels, replicated)
    step_fn = jax.jit(
        make_train_step(model, tx, num_train, config.batch_size, config.get("augment", "crop_flip"), data_sharding),
        donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(model))
    data_key = jax.random.key(config.seed + 1)

    def permutation(epoch):
        # The same order for every normalizer: it depends on the seed and the epoch only.
        return jax.device_put(jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train), replicated)

    t = time.perf_counter()
    step_fn = step_fn.lower(state, images_dev, labels_dev, permutation(0)).compile()
    compile_time = time.perf_counter() - t

    start_step = step = int(state.step)
    bar = None
    if progress and tqdm is not None:
        bar = tqdm(total=total_steps, initial=start_step, desc=f"{config.model}/{config.norm}",
                   unit="step", dynamic_ncols=True, leave=False, position=position)
    log_every = max(1, config.get("log_every", 50))
    window = []
    while step < total_steps:
        epoch = step // steps_per_epoch
        perm = permutation(epoch)
        end = min(total_steps, (epoch + 1) * steps_per_epoch)
        t0 = time.perf_counter()
        while step < end:
            state, metrics = step_fn(state, images_dev, labels_dev, perm)
            step += 1
            window.append(metrics)
            if step % log_every == 0 or step == end:
                m = jax.device_get(window)
                window = []
                loss = float(np.mean([w["loss"] for w in m]))
                history["step"].append(step)
                history["train_loss"].append(loss)
                history["train_accuracy"].append(float(np.mean([w["accuracy"] for w in m])))
                if bar is not None:
                    ips = (step - start_step) * config.batch_size / max(train_time + time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{history['train_accuracy'][-1]:.3f}", img_s=f"{ips:.0f}")
            if bar is not None:
                bar.update(1)
        jax.block_until_ready(state)
        train_time += time.perf_counter() - t0
        ev = evaluate(eval_fn, state, test_images, test_labels, config.get("eval_batch_size", 500), data_sharding)
        history["epoch"].append({"epoch": epoch + 1, "step": step, **{f"test_{k}": v for k, v in ev.items()}})
        history["test_accuracy"].append(ev["accuracy"])
        history["test_loss"].append(ev["loss"])
        if bar is not None:
            bar.write(f"{config.model}/{config.norm}: epoch {epoch + 1} test accuracy {ev['accuracy']:.4f}")
        save_checkpoint(ckpt, state, {"history": history, "train_time": train_time})
    if bar is not None:
        bar.close()
    save_variables(workdir / "variables.msgpack", state)
    images_seen = (step - start_step) * config.batch_size
    summary = {
        "norm": config.norm,
        "model": config.model,
        "test_accuracy": history["test_accuracy"][-1] if history["test_accuracy"] else float("nan"),
        "final_train_loss": history["train_loss"][-1] if history["train_loss"] else float("nan"),
        "images_per_s": images_seen / train_time if train_time > 0 else float("nan"),
        "train_time_s": train_time,
        "compile_time_s": compile_time,
        "steps": step,
        "params": models.param_count(state.params),
        "devices": n_dev,
    }
    (workdir / "history.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    return {"summary": summary, "history": history}


__all__ = ["TrainState", "build_model", "parse_overrides", "format_overrides", "train_and_evaluate", "load_variables", "save_variables",
           "restore_checkpoint", "save_checkpoint", "evaluate", "make_train_step", "check_batch_size"]
