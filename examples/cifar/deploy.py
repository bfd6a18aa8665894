"""Deployment on real CIFAR-10: precise BN, AdaBN under corruptions, folding, for trained runs.

    python -m examples.cifar.compare --config=examples/cifar/configs/default.py:smoke \\
        --config.norms=batch,ibn --config.workdir=runs/deploy_smoke       # train (or reuse) the runs
    python -m examples.cifar.deploy --workdir=runs/deploy_smoke            # this script

For every run in ``--workdir`` (``<norm>/config.json`` and ``variables.msgpack``, as the CIFAR
runner writes them) with batch statistics:

* test accuracy with the running statistics training left (EMA) and with precise BN (the exact
  average of per-batch statistics over ``--precise-batches`` batches of un-augmented training
  images, ``normzoo.deploy.precise_batch_stats``);
* a shifted domain built from the test set, CIFAR-10-C style and deterministic (JAX): Gaussian
  noise, brightness, contrast and Gaussian blur at three severities each; accuracy before and
  after AdaBN (``normzoo.deploy.adabn``: statistics re-estimated on the corrupted test images,
  no labels), for every run (BatchNorm vs IBN vs each with AdaBN);
* the folded model (``normzoo.deploy.fold``): its test accuracy and how many predictions
  differ from the unfolded model's.

Writes ``deploy.json``, ``deploy.md`` and ``adabn.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from examples.cifar import input_pipeline, train
from normzoo import deploy

# severity 1..3 of each corruption, on images in [0, 1]
CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.08, 0.12),  # standard deviation
    "brightness": (0.1, 0.2, 0.3),  # added
    "contrast": (0.6, 0.4, 0.25),  # factor towards each image's mean
    "blur": (0.7, 1.0, 1.5),  # Gaussian sigma in pixels
}


def _blur(x: jax.Array, sigma: float) -> jax.Array:
    radius = int(np.ceil(2 * sigma))
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    pad = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[:, i:i + x.shape[1], :, :] for i in range(2 * radius + 1))
    return sum(k[i] * rows[:, :, i:i + x.shape[2], :] for i in range(2 * radius + 1))


def corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """uint8 NHWC -> the corrupted uint8 images (deterministic: the noise's key is the severity)."""
    if name not in CORRUPTIONS or severity not in (1, 2, 3):
        raise ValueError(f"unknown corruption {name!r} at severity {severity!r}; use one of "
                         f"{sorted(CORRUPTIONS)} at severity 1, 2 or 3.")
    level = CORRUPTIONS[name][severity - 1]
    x = jnp.asarray(images, jnp.float32) / 255.0
    if name == "gaussian_noise":
        x = x + level * jax.random.normal(jax.random.key(severity), x.shape)
    elif name == "brightness":
        x = x + level
    elif name == "contrast":
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * level + mean
    else:  # blur
        x = _blur(x, level)
    return np.asarray(jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0), np.uint8)


def _batches(images: np.ndarray, batch: int, limit: int | None = None):
    # Full batches only (a short last batch would weigh as much as a full one in the average);
    # fewer images than one batch: one batch of all of them.
    starts = range(0, max(len(images) - batch, 0) + 1, batch)
    for i, start in enumerate(starts):
        if limit is not None and i >= limit:
            return
        yield input_pipeline.standardize(jnp.asarray(images[start:start + batch]))


def predictions(predict, variables, images, batch=500) -> np.ndarray:
    """The predicted class of every image."""
    return np.concatenate([np.asarray(jnp.argmax(predict(variables, input_pipeline.standardize(
        jnp.asarray(images[start:start + batch]))), -1)) for start in range(0, len(images), batch)])


def accuracy(predict, variables, images, labels, batch=500) -> float:
    return float(np.mean(predictions(predict, variables, images, batch) == labels))


def evaluate_run(run_dir: Path, data, precise_batches: int, batch: int, progress: bool) -> dict:
    config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    model = train.build_model(config)
    variables = train.load_variables(run_dir / "variables.msgpack", config)
    predict = jax.jit(lambda v, x: model.apply(v, x, train=False))
    stats = jax.jit(lambda v, x: deploy.batch_statistics(model, v, x, train=True))
    test_x, test_y = data.test_images, data.test_labels
    unfolded = predictions(predict, variables, test_x)
    out = {"norm": config.norm, "model": config.model, "preset": config.get("preset", "?"),
           "ema": float(np.mean(unfolded == test_y))}
    # Precise BN on the training images (no augmentation), fixed order.
    precise = deploy.precise_batch_stats(model, variables, _batches(data.train_images, batch, precise_batches),
                                         statistics=stats)
    out["precise"] = accuracy(predict, precise, test_x, test_y)
    out["precise_batches"] = precise_batches
    # Folding: same predictions?
    folded = deploy.fold(model, variables, input_pipeline.standardize(jnp.asarray(test_x[:8])), train=False)
    fast = jax.jit(lambda v, x: folded.apply(v, x, train=False))
    folded_predictions = predictions(fast, folded.variables, test_x)
    out["folded"] = {"accuracy": float(np.mean(folded_predictions == test_y)),
                     "predictions_differ": int(np.sum(folded_predictions != unfolded)),
                     "layers_folded": len(folded.folded), "max_error": folded.max_error}
    # Corruptions: before and after AdaBN on the corrupted test set itself (unlabeled).
    out["corruptions"] = {}
    cases = [(c, s) for c in CORRUPTIONS for s in (1, 2, 3)]
    for name, severity in tqdm(cases, desc=f"{config.norm}: corruptions", disable=not progress):
        shifted = corrupt(test_x, name, severity)
        before = accuracy(predict, variables, shifted, test_y)
        adapted = deploy.adabn(model, variables, _batches(shifted, batch), statistics=stats)
        after = accuracy(predict, adapted, shifted, test_y)
        out["corruptions"][f"{name}/{severity}"] = {"before": before, "adabn": after}
    return out


def to_markdown(r: dict) -> str:
    runs = r["runs"]
    models = sorted({f"{o['model']} ({o['preset']} preset)" for o in runs.values()})
    lines = [f"CIFAR-10 test set ({r['test_images']} images), runs from `{r['workdir']}` "
             f"({', '.join(models)}); precise BN over {r['precise_batches']} batches of {r['batch']} "
             "training images; AdaBN over the corrupted test images in batches of "
             f"{r['batch']} (no labels).", "",
             "| run | test acc. (EMA statistics) | test acc. (precise BN) | folded: test acc. | folded: predictions changed |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, o in runs.items():
        lines.append(f"| {name} | {o['ema']:.4f} | {o['precise']:.4f} | {o['folded']['accuracy']:.4f} | "
                     f"{o['folded']['predictions_differ']} of {r['test_images']} |")
    lines += ["", "Accuracy under corruption (severity 1/2/3), before and after AdaBN:", "",
              "| corruption | severity | " + " | ".join(f"{n} | {n} + AdaBN" for n in runs) + " |",
              "| --- | ---: |" + " ---: | ---: |" * len(runs)]
    for case in next(iter(runs.values()))["corruptions"]:
        name, severity = case.split("/")
        cells = " | ".join(f"{o['corruptions'][case]['before']:.4f} | {o['corruptions'][case]['adabn']:.4f}"
                           for o in runs.values())
        lines.append(f"| {name} | {severity} | {cells} |")
    means = " | ".join(f"{np.mean([c['before'] for c in o['corruptions'].values()]):.4f} | "
                       f"{np.mean([c['adabn'] for c in o['corruptions'].values()]):.4f}" for o in runs.values())
    lines.append(f"| mean | | {means} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(CORRUPTIONS)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True)
    for ax, corruption in zip(axes, names):
        for (run, o), color in zip(r["runs"].items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            sev = [0, 1, 2, 3]
            before = [o["ema"]] + [o["corruptions"][f"{corruption}/{s}"]["before"] for s in (1, 2, 3)]
            after = [o["ema"]] + [o["corruptions"][f"{corruption}/{s}"]["adabn"] for s in (1, 2, 3)]
            ax.plot(sev, before, "o--", color=color, label=f"{run}")
            ax.plot(sev, after, "s-", color=color, label=f"{run} + AdaBN")
        ax.set_title(corruption)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_xticks([0, 1, 2, 3])
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("CIFAR-10 under corruption: BatchNorm vs IBN, before and after AdaBN")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/deploy_smoke", help="folder of CIFAR runs (<norm>/variables.msgpack)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--expected_per_file", type=int, default=input_pipeline.IMAGES_PER_FILE)
    p.add_argument("--precise-batches", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--test-subset", type=int, default=0, help="0: all test images")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    data = input_pipeline.load(a.data_dir, expected_per_file=a.expected_per_file)
    if a.test_subset:
        data = dataclasses.replace(data, test_images=data.test_images[:a.test_subset],
                                   test_labels=data.test_labels[:a.test_subset])
    workdir = Path(a.workdir)
    runs = {}
    for run_dir in sorted(d for d in workdir.iterdir() if (d / "variables.msgpack").exists()):
        config = json.loads((run_dir / "config.json").read_text())
        if config["norm"] not in ("batch", "batch_renorm", "ibn"):
            continue  # no batch statistics to re-estimate
        runs[run_dir.name] = evaluate_run(run_dir, data, a.precise_batches, a.batch, not a.no_progress)
    if not runs:
        raise SystemExit(f"no run with batch statistics in {workdir} (expected <norm>/variables.msgpack).")
    result = {"workdir": str(workdir), "test_images": len(data.test_images), "precise_batches": a.precise_batches,
              "batch": a.batch, "corruptions": CORRUPTIONS, "runs": runs}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(result, indent=1))
    (out / "deploy.md").write_text(to_markdown(result))
    plot(result, out / "adabn.png")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
