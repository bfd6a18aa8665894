"""The benchmark scripts run end to end on tiny shapes (no timing is asserted)."""

import json

import pytest

from benchmarks import layers, training


def test_layer_benchmark_on_tiny_shapes(tmp_path, monkeypatch):
    tiny = {"cifar_early": (4, 4, 4, 8), "cifar_late": (4, 2, 2, 8), "imagenet": (2, 4, 4, 8),
            "transformer": (2, 4, 16), "dense": (4, 8), "conv": (2, 4, 4, 3), "cifar_wide": (2, 2, 2, 32)}
    result = layers.run(rounds=1, min_time=0.0, shapes=tiny)
    rows = result["rows"]
    names = {r["layer"] for r in rows}
    assert {"BatchNorm (train)", "BatchNorm (eval)", "BatchRenorm (train)", "IBN (train)", "InstanceNorm",
            "GroupNorm (4 groups)", "GroupNorm (32 groups)", "LayerNorm", "RMSNorm", "WeightNormDense", "WeightNormConv",
            "CosineDense", "CosineConv"} <= names
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"} and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["normzoo_ms"] > 0 and r["baseline_ms"] > 0 and r["ratio"] > 0
        assert ("floor_fraction" in r) == (r["layer"] not in {"WeightNormDense", "WeightNormConv", "CosineDense", "CosineConv"})
    md = layers.to_markdown(result)
    assert md.count("\n| ") == len(rows) + 2 and "GB/s" in md  # header, separator, rows
    json.dumps(result)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--width=4", "--batch=8", "--rounds=1"]])
def test_training_benchmark_runs(tmp_path, argv):
    training.main(argv + [f"--out={tmp_path}"])
    result = json.loads((tmp_path / "training.json").read_text())
    assert [r["norm"] for r in result["per_normalizer"]] == __import__("normzoo").available()
    assert result["synced"]["devices"] == 8 and result["synced"]["synced_step_ms"] > 0
    assert result["input_pipeline"]["data_images_per_s"] > 0
    assert "Synced BatchNorm on 8 simulated CPU devices" in (tmp_path / "training.md").read_text()
