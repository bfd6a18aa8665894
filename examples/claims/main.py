"""Every claim of the BatchNorm notes, measured on CIFAR-10.

    python -m examples.claims.main --config=examples/claims/configs/default.py:smoke [--config.experiments=a,b]

Runs each experiment of ``config.experiments`` (:mod:`examples.claims.experiments`), keeping each
one's record in ``config.workdir/<experiment>.json`` (a rerun skips those that exist unless
``--config.resume=False``), then writes ``results.json`` (every record, the configuration and the
machine), ``results.md`` (one table per experiment) and the figures of :mod:`examples.claims.plots`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from examples.cifar import input_pipeline
from examples.claims import experiments, plots, tables


def run_all(config: ml_collections.ConfigDict, data=None, progress: bool = True) -> dict:
    names = [e for e in config.experiments.split(",") if e]
    unknown = sorted(set(names) - set(experiments.EXPERIMENTS))
    if unknown:
        raise ValueError(f"config.experiments: unknown {unknown}; known: {', '.join(experiments.EXPERIMENTS)}.")
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = input_pipeline.load(config.data_dir or None, expected_per_file=config.expected_per_file)
    records = {}
    for name in names:
        path = workdir / f"{name}.json"
        if config.resume and path.exists():
            records[name] = json.loads(path.read_text())
            continue
        t0 = time.perf_counter()
        rec = experiments.EXPERIMENTS[name](config, data, progress=progress)
        rec["wall_s"] = time.perf_counter() - t0
        rec["date"] = datetime.date.today().isoformat()
        path.write_text(json.dumps(rec))
        records[name] = rec
        if progress:
            print(f"{name}: {rec['wall_s'] / 60:.1f} min", flush=True)
    results = {
        "meta": {"preset": config.preset, "config": json.loads(config.to_json()),
                 "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                             f"{jax.devices()[0].platform}",
                 "jax": jax.__version__, "data": str(data.source)},
        "experiments": records,
    }
    (workdir / "results.json").write_text(json.dumps(results))
    (workdir / "results.md").write_text(tables.to_markdown(results))
    plots.plot_all(results, workdir)
    return results


def main(argv) -> None:
    del argv
    results = run_all(flags.FLAGS.config)
    print(tables.to_markdown(results))


if __name__ == "__main__":
    # Defined here, not at import: the examples' tests import several mains in one process.
    config_flags.DEFINE_config_file("config", None, "Path to a config file (with :preset).")
    app.run(main)
