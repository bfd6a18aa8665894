"""Reproduce "How Does Batch Normalization Help Optimization?" (Santurkar et al. 2018) on CIFAR-10.

    python -m examples.santurkar.main --config=examples/santurkar/configs/default.py:smoke --config.data_dir=...

Trains every run of ``config.runs`` (``norm@learning_rate``) with measurements
(:mod:`examples.santurkar.experiment`), in ``config.workers`` single-threaded processes, then
writes into ``config.workdir``: ``results.json`` (every run's record and a summary),
``results.md`` (the summary table) and the figures of :mod:`examples.santurkar.plots`.
"""

from __future__ import annotations

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
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from examples.cifar import input_pipeline
from examples.santurkar import experiment, plots


def summarize(record: dict) -> dict:
    """The summary row of one run: accuracies, and each measure's median over training."""
    def median(values):
        a = np.asarray(values, np.float64)
        a = a[np.isfinite(a)]
        return float(np.median(a)) if a.size else float("nan")

    loss = np.asarray(record["landscape_loss"], np.float64)
    dist = np.asarray(record["landscape_grad_distance"], np.float64)
    return {
        "norm": record["norm"], "learning_rate": record["learning_rate"],
        "test_accuracy": record["test_accuracy"][-1],
        "final_train_loss": record["train_loss"][-1],
        "final_train_accuracy": record["train_accuracy"][-1],
        "diverged_at": record["diverged_at"],
        "ics_l2": median(np.mean(record["ics_l2"], axis=1)),
        "ics_cosine": median(np.mean(record["ics_cosine"], axis=1)),
        "loss_range": median(loss.max(1) - loss.min(1)) if loss.size else float("nan"),
        "grad_distance_max": median(dist.max(1)) if dist.size else float("nan"),
        "smoothness": median(record["smoothness"]),
        "shift_mean": median(np.mean(record["shift_mean"], axis=1)),
        "shift_std": median(np.mean(record["shift_std"], axis=1)),
        "wall_s": record["wall_s"], "measure_s": record["measure_s"],
    }


COLUMNS = [("test_accuracy", "test acc."), ("final_train_loss", "train loss (last 10 steps)"),
           ("ics_l2", "ICS ‖G−G′‖ (median)"), ("ics_cosine", "ICS cos(G, G′) (median)"),
           ("loss_range", "loss range along ∇ (median)"), ("grad_distance_max", "max ‖∇−∇′‖ along ∇ (median)"),
           ("smoothness", "effective β-smoothness (median)"), ("shift_mean", "mean abs. change of channel means per step"),
           ("wall_s", "wall s")]


def to_markdown(results: dict) -> str:
    meta = results["meta"]
    runs_s = sum(s["wall_s"] for s in results["summary"].values())
    lines = [f"Preset `{meta['preset']}`: VGG widths {meta['widths']}, batch {meta['batch_size']}, "
             f"{meta['steps']} steps of plain SGD, measured every {meta['measure_every']} steps; "
             f"{meta['hardware']}; the runs took {runs_s / 60:.1f} min in all (the column wall s, "
             f"side by side in {meta.get('workers', 1)} processes).", "",
             "| run | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "| --- |" + " ---: |" * len(COLUMNS)]
    for name, s in results["summary"].items():
        cells = []
        for key, _ in COLUMNS:
            v = s[key]
            cells.append(f"{v:.0f}" if key == "wall_s" else f"{v:.4f}" if key.endswith("accuracy") else f"{v:.3g}")
        if s["diverged_at"] is not None:
            cells[1] = f"diverged at step {s['diverged_at']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run_all(config, runs, data) -> dict:
    workdir = Path(config.workdir)
    out, pending = {}, []
    for r in runs:
        done = workdir / r / "record.json"
        if config.resume and done.exists():
            out[r] = json.loads(done.read_text())
        else:
            pending.append(r)
    if config.workers <= 1:
        for r in pending:
            out[r] = experiment.run(config, r, workdir / r, data=data)
        return out
    cfg = workdir / "config.json"
    cfg.write_text(config.to_json())
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(workdir / ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    running, free = {}, list(range(config.workers))
    while pending or running:
        while pending and free:
            r, slot = pending.pop(0), free.pop(0)
            cmd = [sys.executable, "-m", "examples.santurkar.experiment", str(cfg), r, str(workdir / r), str(slot)]
            running[subprocess.Popen(cmd, env=env)] = (r, slot)
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            r, slot = running.pop(proc)
            free.append(slot)
            if proc.returncode:
                raise RuntimeError(f"run {r} failed with exit code {proc.returncode}; see its output above.")
            out[r] = json.loads((workdir / r / "record.json").read_text())
    return out


def run_all(config: ml_collections.ConfigDict, data=None) -> dict:
    """Every run of ``config.runs``, the summary, the table and the figures."""
    runs = [r for r in config.runs.split(",") if r]
    for r in runs:
        experiment.parse_run(r)  # every run name checked before anything trains
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = input_pipeline.load(config.data_dir or None, expected_per_file=config.expected_per_file)
    started = time.time()
    records = _run_all(config, runs, data)
    records = {r: records[r] for r in runs}
    results = {
        "meta": {
            "preset": config.preset, "batch_size": config.batch_size, "steps": config.steps,
            "measure_every": config.measure_every, "step_multipliers": list(config.step_multipliers),
            "workers": config.workers,
            "widths": [[max(1, w // config.width_divisor) for w in s] for s in config.stages],
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"{jax.devices()[0].platform}",
            "jax": jax.__version__, "wall_s": time.time() - started,
            "date": datetime.date.today().isoformat(), "data": str(data.source),
        },
        "summary": {r: summarize(rec) for r, rec in records.items()},
        "runs": records,
    }
    (workdir / "results.json").write_text(json.dumps(results))
    (workdir / "results.md").write_text(to_markdown(results))
    plots.plot_all(results, workdir)
    return results


def main(argv) -> None:
    del argv
    results = run_all(flags.FLAGS.config)
    print(to_markdown(results))


if __name__ == "__main__":
    # Defined here, not at import: the examples' tests import several mains in one process.
    config_flags.DEFINE_config_file("config", None, "Path to a config file (with :preset).")
    app.run(main)
