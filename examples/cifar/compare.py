"""Compare normalizers on CIFAR-10 under the same seed, data order and budget.

    python -m examples.cifar.compare --config=examples/cifar/configs/default.py:smoke

Trains ``config.model`` once per name in ``config.norms`` (every name of the registry by
default; with ``config.api="linen,nnx"`` once per name and API, side by side), then the
small-batch experiment, and writes into ``config.workdir``:

* ``results.json`` and ``results.md``: normalizer, test accuracy, final train loss, images/s,
  wall time and parameter count, with the hardware, preset and versions;
* ``curves.png``: train loss and test accuracy against the step, one line per normalizer;
* ``small_batch.png``: test accuracy with batch statistics over 128 vs ``small_batch_size``
  examples.

The small-batch experiment keeps the batch of 128 (so the budget and data order are the same)
and computes the statistics of the batch layers over ghost batches of ``small_batch_size``
examples (``virtual_batch_size``). That is what 32 devices with a per-device batch of 4 and no
sync see, and the setting of the BatchRenorm paper (microbatches of 4). GroupNorm computes
per-example statistics, so it does not depend on the batch size at all: its entry is the same
run, reported in both columns.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections

import normzoo
from examples.cifar import input_pipeline, train

def _configure(base: ml_collections.ConfigDict, norm: str, steps: int, api: str | None = None) -> ml_collections.ConfigDict:
    c = copy.deepcopy(base)
    c.norm = norm
    c.api = api or base.get("api", "linen").split(",")[0]
    overrides = train.parse_overrides(c.norm_overrides)
    if norm == "batch_renorm" and "warmup_steps" not in overrides:
        # The paper relaxes r_max/d_max over a part of training; scale that part to the budget.
        overrides["warmup_steps"] = max(1, int(c.renorm_warmup_fraction * steps))
    c.norm_overrides = train.format_overrides(overrides)
    return c


def run_comparison(config: ml_collections.ConfigDict, data=None, progress: bool = True) -> dict:
    """Runs every normalizer (and the small-batch experiment); returns and writes the results."""
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:  # also checks the data before any worker starts
        data = input_pipeline.load(config.data_dir or None, expected_per_file=config.get("expected_per_file", 10000))
    n_train = config.train_subset or len(data.train_images)
    steps = int(config.num_epochs * (n_train // config.batch_size))
    norms = [n for n in config.norms.split(",") if n]
    # Runs are started in the order given (put the slowest first so parallel workers finish
    # together); the tables list them in the registry's order.
    order = {n: i for i, n in enumerate(normzoo.available())}
    table_order = sorted(norms, key=lambda n: order.get(n, len(order)))
    started = time.time()
    # config.api = "linen,nnx" trains every name with both APIs, the two runs of a name one after
    # the other (side by side with two workers): rows "batch (linen)", "batch (nnx)".
    apis = [a for a in config.get("api", "linen").split(",") if a]
    both = len(apis) > 1
    jobs = [(f"{norm} ({api})" if both else norm, _configure(config, norm, steps, api),
             workdir / (f"{norm}_{api}" if both else norm)) for norm in norms for api in apis]
    table_order = [f"{n} ({a})" if both else n for n in table_order for a in apis]
    # The small-batch experiment runs with the first API.
    small_names = [n for n in config.small_batch_norms.split(",") if n] if config.small_batch and not both else []
    for norm in small_names:
        if normzoo.make(norm).batch_statistics:
            c = _configure(config, norm, steps)
            c.norm_overrides = train.format_overrides(
                {**train.parse_overrides(c.norm_overrides), "virtual_batch_size": config.small_batch_size})
            jobs.append((f"{norm}@{config.small_batch_size}", c, workdir / f"{norm}_b{config.small_batch_size}"))
        elif norm not in norms:  # per-example statistics: one run serves both batch sizes
            jobs.append((norm, _configure(config, norm, steps), workdir / norm))
    done = _run_jobs(jobs, data, config.get("workers", 1), progress)
    runs = {n: done[n] for n in table_order}
    small = {n: done[f"{n}@{config.small_batch_size}"] if normzoo.make(n).batch_statistics else done[n]
             for n in small_names}
    results = {
        "meta": _meta(config, time.time() - started, data),
        "runs": {k: v["summary"] for k, v in runs.items()},
        "small_batch": {
            k: {"batch": config.small_batch_size, "test_accuracy": v["summary"]["test_accuracy"],
                "reference_test_accuracy": runs[k]["summary"]["test_accuracy"] if k in runs else None}
            for k, v in small.items()
        },
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    (workdir / "results.md").write_text(to_markdown(results))
    plot_curves({k: v["history"] for k, v in runs.items()}, workdir / "curves.png")
    if small:
        plot_small_batch(results["small_batch"], config.batch_size, workdir / "small_batch.png")
    return results


def _run_jobs(jobs, data, workers: int, progress: bool) -> dict:
    """Runs ``(label, config, workdir)`` jobs in this process, or in ``workers`` subprocesses."""
    if workers <= 1:
        out = {}
        for label, c, wd in jobs:
            out[label] = train.train_and_evaluate(c, wd, data=data, progress=progress)
            _print_row(label, out[label]["summary"])
        return out
    # The runs share one persistent compilation cache: every run initializes and compiles the
    # same convolutions, so after the first one most programs load instead of compiling
    # (measured on the tiny preset: 25.8 s for the first run, 6.3 s for a second normalizer).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(jobs[0][2].parent / ".jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env = {**cache, **os.environ,
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    pending, running, out, free = list(jobs), {}, {}, list(range(workers))
    while pending or running:
        while pending and free:
            label, c, wd = pending.pop(0)
            wd.mkdir(parents=True, exist_ok=True)
            (wd / "config.json").write_text(c.to_json())
            slot = free.pop(0)
            cmd = [sys.executable, "-m", "examples.cifar.worker", str(wd / "config.json"), str(wd),
                   "1" if progress else "0", str(slot)]
            running[subprocess.Popen(cmd, env=env)] = (label, wd, slot)
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            label, wd, slot = running.pop(proc)
            free.append(slot)
            if proc.returncode != 0:
                for p in running:
                    p.kill()
                raise RuntimeError(f"the run {label!r} failed (exit {proc.returncode}); see its output above.")
            out[label] = json.loads((wd / "history.json").read_text())
            _print_row(label, out[label]["summary"])
    return {label: out[label] for label, _, _ in jobs}


def _print_row(name, s):
    print(f"{name:>28}: test accuracy {s['test_accuracy']:.4f}  train loss {s['final_train_loss']:.3f}  "
          f"{s['images_per_s']:.0f} img/s  {s['train_time_s']:.0f} s", flush=True)


def _commit() -> str:
    """The repository's commit the results were measured at ("+" if the work tree had changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def _meta(config, wall, data) -> dict:
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": config.preset, "model": config.model, "width": config.width,
        "epochs": config.num_epochs, "batch_size": config.batch_size, "seed": config.seed,
        "train_images": int(config.train_subset or len(data.train_images)),
        "test_images": int(config.test_subset or len(data.test_images)),
        "device": f"{jax.local_device_count()} x {dev.device_kind} ({dev.platform})",
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {sys.version.split()[0]}",
        "workers": config.get("workers", 1),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "commit": _commit(),
        "wall_time_s": wall,
    }


def to_markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"# CIFAR-10: {m['model']} (width {m['width']}), preset `{m['preset']}`",
        "",
        f"{m['date']}, commit {m.get('commit', 'unknown')}; {m['device']}; {m['host']}; jax {m['versions']['jax']}, "
        f"flax {m['versions']['flax']}.",
        f"{m['epochs']} epoch(s) at batch {m['batch_size']} on {m['train_images']} training images, seed {m['seed']}, "
        f"test accuracy on {m['test_images']} test images; total wall time {m['wall_time_s'] / 60:.1f} min "
        f"({m['workers']} run(s) at a time" + (", one thread each)." if m["workers"] > 1 else ")."),
        "",
        "| normalizer | test accuracy | final train loss | images/s | train time (s) | parameters |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in results["runs"].items():
        lines.append(f"| {name} | {s['test_accuracy']:.4f} | {s['final_train_loss']:.3f} | "
                     f"{s['images_per_s']:.0f} | {s['train_time_s']:.0f} | {s['params']:,} |")
    if results["small_batch"]:
        b = next(iter(results["small_batch"].values()))["batch"]
        lines += ["", f"Small-batch experiment: statistics over {b} examples vs over the whole batch "
                  f"({m['batch_size']}).", "",
                  f"| normalizer | batch {m['batch_size']} | batch {b} | change |", "| --- | ---: | ---: | ---: |"]
        for name, r in results["small_batch"].items():
            ref = r["reference_test_accuracy"]
            change = "" if ref is None else f"{r['test_accuracy'] - ref:+.4f}"
            ref_s = "" if ref is None else f"{ref:.4f}"
            lines.append(f"| {name} | {ref_s} | {r['test_accuracy']:.4f} | {change} |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: dict, path: Path) -> None:
    """Train loss against step; test accuracy against step (or, with one evaluation per run, a
    sorted bar chart of the final test accuracy)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {name: f"C{i}" for i, name in enumerate(histories)}
    for name, h in histories.items():
        ax1.plot(h["step"], h["train_loss"], label=name, color=colors[name])
    ax1.set(xlabel="step", ylabel="train loss", title="Train loss (mean over logging window)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8, ncol=2)
    if max(len(h["epoch"]) for h in histories.values()) > 1:
        for name, h in histories.items():
            ax2.plot([e["step"] for e in h["epoch"]], h["test_accuracy"], "-o", label=name, color=colors[name])
        ax2.set(xlabel="step", ylabel="test accuracy", title="Test accuracy (full test set, each epoch)")
        ax2.legend(fontsize=8, ncol=2, loc="lower right")
    else:
        final = sorted(((h["test_accuracy"][-1], n) for n, h in histories.items() if h["test_accuracy"]))
        ax2.barh([n for _, n in final], [a for a, _ in final], color=[colors[n] for _, n in final])
        for i, (a, _) in enumerate(final):
            ax2.text(a, i, f" {a:.3f}", va="center", fontsize=8)
        ax2.set(xlabel="test accuracy", title="Final test accuracy (full test set)")
        ax2.set_xlim(0, min(1.0, max(a for a, _ in final) * 1.15))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_small_batch(small: dict, full_batch: int, path: Path) -> None:
    plt = _plt()
    names = list(small)
    b = small[names[0]]["batch"]
    ref = [small[n]["reference_test_accuracy"] or 0.0 for n in names]
    got = [small[n]["test_accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], ref, 0.4, label=f"statistics over {full_batch}")
    ax.bar([x + 0.2 for x in xs], got, 0.4, label=f"statistics over {b}")
    for x, r, g in zip(xs, ref, got):
        ax.text(x - 0.2, r, f"{r:.3f}", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, g, f"{g:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="test accuracy", title="Small-batch statistics: who degrades?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    default = str(Path(__file__).parent / "configs" / "default.py")
    config_flags.DEFINE_config_file("config", default, "Config file (':preset' picks smoke, full or tiny).")

    def _run(_):
        results = run_comparison(flags.FLAGS.config)
        print(to_markdown(results))
        print(f"written to {Path(flags.FLAGS.config.workdir).resolve()}")

    app.run(_run, argv=argv)


if __name__ == "__main__":
    main()
