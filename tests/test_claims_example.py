"""examples/claims: its measurements against NumPy, and the tiny preset on a fixture in CIFAR's
file format (never the real data)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.cifar import input_pipeline
from examples.claims import experiments, main, models, tables, train
from examples.claims.configs.default import EXPERIMENTS, get_config


@pytest.fixture
def data(tmp_path):
    folder = input_pipeline.write_fake(tmp_path / "data" / input_pipeline.FOLDER, per_file=16)
    return input_pipeline.load(str(folder), allow_download=False, expected_per_file=16)


def test_pre_activation_shares_equal_numpy(rng):
    z = rng.normal(size=(4, 3, 3, 5)) * 2.0
    z[..., 2] = -np.abs(z[..., 2])  # a dead channel
    s = jax.device_get(train._pre_stats([jnp.asarray(z, jnp.float32)]))
    flat = z.reshape(-1, 5)
    np.testing.assert_allclose(s["saturated"], [np.mean(np.abs(flat) > 2)], rtol=1e-6)
    np.testing.assert_allclose(s["linear"], [np.mean(np.abs(flat) < 1)], rtol=1e-6)
    np.testing.assert_allclose(s["dead"], [1 / 5])
    np.testing.assert_allclose(s["channel_std"], [np.mean(flat.std(0))], rtol=1e-5)


def test_steps_to_target_uses_a_running_mean_of_the_logged_accuracy():
    rec = {"steps": [10, 20, 30, 40, 50], "train_accuracy": [0.1, 0.5, 0.2, 0.45, 0.6]}
    assert train.steps_to(rec, 0.4, window=3) == 50  # (0.2 + 0.45 + 0.6) / 3 >= 0.4; 0.5 alone is not enough
    assert train.steps_to(rec, 0.4, window=1) == 20
    assert train.steps_to(rec, 0.9, window=1) is None


def test_block_applies_one_layer_of_the_network_alone(rng):
    """Net.block(i) chained over every i is the network's feature extractor (the Jacobians use it)."""
    model = models.Net(stages=((4,), (6, 6)), norm="batch")
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=True)
    out, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
    inputs = state["intermediates"]["inputs"]
    h = x
    for i in range(3):
        np.testing.assert_allclose(h, inputs[i], rtol=1e-6, atol=1e-6)
        h = model.apply(variables, h, i, True, method=models.Net.block, mutable=["batch_stats"])[0]
    logits = variables["params"]["head"]["kernel"].T @ jnp.mean(h, (1, 2)).T
    np.testing.assert_allclose(out, logits.T + variables["params"]["head"]["bias"], rtol=1e-5, atol=1e-5)


def test_edsr_upsamples_by_two_and_the_bicubic_skip_is_exact_for_a_zero_residual():
    model = models.EDSR(features=4, blocks=1, norm="batch")
    lo = jnp.full((2, 4, 4, 3), 0.25)
    variables = model.init(jax.random.key(0), lo, train=False)
    zero = jax.tree.map(jnp.zeros_like, variables["params"])
    out = model.apply({**variables, "params": zero}, lo, train=False)
    assert out.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(out, models.upsample_bicubic(lo), atol=1e-6)
    np.testing.assert_allclose(models.downsample(out), lo, atol=1e-6)


@pytest.mark.slow
def test_one_measured_run_on_a_fixture(data):
    """ICS and the Jacobian spectra on the tiny net: shapes, and the first layer has no predecessor."""
    c = get_config("tiny")
    rec = train.run(c, {"norm": "batch", "measure_ics": True, "measure_jacobian": True}, data, progress=False)
    assert rec["measure_steps"] == [0, 2, 4] and rec["steps"] == [1, 2, 3, 4]
    assert np.asarray(rec["grad_norm"]).shape == (4, 2)
    assert np.asarray(rec["ics_l2"]).shape == (2, 3) and np.max(np.asarray(rec["ics_l2"])[:, 0]) < 1e-6
    assert [len(j["largest"]) for j in rec["jacobian"]] == [3, 3, 3]  # two blocks and the whole network
    assert all(0 < s <= big for j in rec["jacobian"] for s, big in zip(j["smallest"], j["largest"]))
    assert 0 <= rec["test_accuracy"] <= 1 and math.isfinite(rec["train_loss"][-1])


def test_unknown_experiment_is_refused(data, tmp_path):
    c = get_config("tiny")
    c.workdir, c.experiments = str(tmp_path), "activations,ics"
    with pytest.raises(ValueError, match=r"config.experiments: unknown \['ics'\]; known: activations, "):
        main.run_all(c, data=data, progress=False)


@pytest.mark.slow
def test_every_experiment_of_the_tiny_preset_end_to_end(data, tmp_path):
    c = get_config("tiny")
    c.workdir = str(tmp_path / "out")
    results = main.run_all(c, data=data, progress=False)
    assert list(results["experiments"]) == list(EXPERIMENTS)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    md = (tmp_path / "out" / "results.md").read_text()
    for name in EXPERIMENTS:
        assert f"### {name} (" in md
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000
    s = saved["experiments"]
    assert set(s["activations"]["summary"]) == {f"{a}/{v}" for a in ("sigmoid", "tanh", "relu")
                                                for v in experiments.VARIANTS}
    assert s["activations"]["summary"]["relu/batch"]["ics_cosine"] is not None
    assert s["activations"]["summary"]["sigmoid/batch"]["ics_cosine"] is None
    assert list(s["normalizers"]["summary"]) == ["none", "batch", "iter"]
    lr = s["learning_rates"]["summary"]
    assert lr["batch_no_affine@0.1"]["affine"] is False and lr["batch@0.1"]["affine"] is True
    assert all(0.0 <= v["dead_end"] <= 1.0 for v in lr.values())
    # The deep linear network's first layer has no predecessor; the invariance table covers the registry.
    assert all(abs(v[0]) < 1e-6 for v in s["deep_linear"]["runs"]["batch"]["ics_l2"])
    import normzoo
    assert list(s["invariance"]["summary"]) == normzoo.available()
    inv = s["invariance"]["summary"]
    assert max(inv["batch"]["weights"]) < 1e-3 and min(inv["none"]["weights"]) > 0.4
    assert "| bicubic |" in md and "| relu/batch_after |" in md
    # A rerun reads the records back instead of training.
    again = main.run_all(c, data=data, progress=False)
    assert again["experiments"]["learning_rates"]["summary"] == s["learning_rates"]["summary"]
    assert tables.to_markdown(again) == md
