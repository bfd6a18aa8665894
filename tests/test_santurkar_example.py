"""examples/santurkar: a few steps on a tiny fixture in CIFAR's file format (never the real data)."""

import json
import math

import numpy as np
import pytest

from examples.cifar import input_pipeline
from examples.santurkar import experiment, main, plots
from examples.santurkar.configs.default import get_config


def _record(run, steps=4, layers=3, norms=2, quantiles=(1.0, 50.0, 99.0), seed=0):
    """A record shaped like experiment.run's, with made-up numbers (for the table and the plots)."""
    r = np.random.default_rng(seed)
    m = [0, 2]
    norm, _, lr = run.partition("@")
    return {
        "run": run, "norm": norm, "learning_rate": float(lr), "steps": list(range(1, steps + 1)),
        "train_loss": list(r.random(steps) + 1), "train_accuracy": list(r.random(steps)),
        "eval_steps": [2, steps], "test_accuracy": [0.2, 0.3], "measure_steps": m,
        "layers": [f"Conv_{i}" for i in range(layers)], "norm_layers": [f"BatchNorm_{i}" for i in range(norms)],
        "quantiles": list(quantiles), "ics_l2": r.random((2, layers)).tolist(),
        "ics_cosine": r.random((2, layers)).tolist(), "grad_norm": r.random((2, layers)).tolist(),
        "landscape_loss": [[2.0, 3.0, 5.0], [1.0, 1.5, 4.0]], "landscape_grad_distance": r.random((2, 3)).tolist(),
        "loss": [2.0, 1.0], "smoothness": [3.0, 5.0],
        "activation_percentiles": np.sort(r.normal(size=(2, norms, len(quantiles))), -1).tolist(),
        "activation_negative": r.random((2, norms)).tolist(), "shift_mean": [[0.1, 0.3], [0.2, 0.4]],
        "shift_std": r.random((2, norms)).tolist(), "diverged_at": None, "wall_s": 10.0, "measure_s": 4.0,
    }


def test_summary_takes_medians_over_training_and_the_table_reads_it():
    rec = _record("batch@0.1")
    s = main.summarize(rec)
    assert s["loss_range"] == pytest.approx(np.median([3.0, 3.0]))  # max - min along the gradient, per point
    assert s["smoothness"] == pytest.approx(4.0)
    assert s["shift_mean"] == pytest.approx(np.median([0.2, 0.3]))
    assert s["test_accuracy"] == 0.3
    rec2 = {**_record("none@0.5"), "diverged_at": 3}
    results = {"meta": {"preset": "tiny", "widths": [[4]], "batch_size": 8, "steps": 4, "measure_every": 2,
                        "hardware": "cpu", "wall_s": 60.0},
               "summary": {"batch@0.1": s, "none@0.5": main.summarize(rec2)}}
    table = main.to_markdown(results)
    assert "| batch@0.1 | 0.3000 |" in table and "| none@0.5 | 0.3000 | diverged at step 3 |" in table


def test_every_figure_is_written(tmp_path):
    runs = {r: _record(r, seed=i) for i, r in enumerate(
        ["none@0.1", "batch@0.1", "none@0.5", "batch@0.5", "noisy_batch@0.1", "l1_batch@0.1", "linf_batch@0.1"])}
    results = {"runs": runs, "summary": {k: main.summarize(v) for k, v in runs.items()}}
    paths = plots.plot_all(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        ["accuracy.png", "noisy.png", "ics.png", "landscape.png", "lp.png", "lp_landscape.png", "zoo.png"])
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize("run", ["batch", "batch@", "batchnorm@0.1", "batch@-1", "batch@x"])
def test_run_names_are_checked(run):
    with pytest.raises(ValueError, match=rf"run '{run}' must be NORM@LEARNING_RATE with NORM one of .*'batch'"):
        experiment.parse_run(run)


@pytest.mark.slow
def test_a_few_steps_of_the_experiment_on_a_fixture(tmp_path):
    """Two runs of the tiny preset end to end: records, summary, table and figures; the measured
    values are consistent with their definitions (the first layer has no predecessor)."""
    folder = input_pipeline.write_fake(tmp_path / "data" / input_pipeline.FOLDER, per_file=16)
    data = input_pipeline.load(str(folder), allow_download=False, expected_per_file=16)
    c = get_config("tiny")
    c.workdir = str(tmp_path / "out")
    c.runs = "none@0.1,noisy_batch@0.1"
    results = main.run_all(c, data=data)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["summary"]) == ["none@0.1", "noisy_batch@0.1"]
    for name, rec in saved["runs"].items():
        assert rec["layers"] == ["Conv_0", "Conv_1", "Dense_0"]  # forward order
        assert rec["measure_steps"] == [0, 2] and rec["eval_steps"] == [2, 4]
        assert np.asarray(rec["ics_l2"]).shape == (2, 3) and np.max(np.asarray(rec["ics_l2"])[:, 0]) < 1e-5
        assert np.asarray(rec["landscape_loss"]).shape == (2, 2)
        assert all(0 <= a <= 1 for a in rec["test_accuracy"]) and math.isfinite(rec["train_loss"][-1])
        assert len(rec["norm_layers"]) == 2 and len(rec["activation_percentiles"][0][0]) == len(rec["quantiles"])
    assert saved["runs"]["noisy_batch@0.1"]["norm_layers"] == ["NoisyBatchNorm_0", "NoisyBatchNorm_1"]
    assert "| noisy_batch@0.1 |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "landscape.png").exists() and (tmp_path / "out" / "zoo.png").exists()
    assert results["summary"]["none@0.1"]["test_accuracy"] == saved["runs"]["none@0.1"]["test_accuracy"][-1]
