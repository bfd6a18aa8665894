"""The CIFAR example on a tiny dataset in the real file format (never the real data)."""

import io
import json
import re
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.cifar import compare, input_pipeline, train
from examples.cifar.configs.default import NORMS, get_config
from tests.conftest import some_slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return input_pipeline.write_fake(tmp_path_factory.mktemp("data") / input_pipeline.FOLDER, per_file=16)


@pytest.fixture(scope="module")
def data(fixture_dir):
    return input_pipeline.load(str(fixture_dir), allow_download=False, expected_per_file=16)


def tiny_config(tmp_path, **kw):
    c = get_config("tiny")
    c.workdir = str(tmp_path)
    for k, v in kw.items():
        c[k] = v
    return c


# ----------------------------------------------------------------------------- data


def test_loads_canonical_layout(data, fixture_dir):
    assert data.train_images.shape == (80, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (16, 32, 32, 3) and data.train_labels.dtype == np.int32
    assert data.label_names[0] == "class0" and data.source == fixture_dir
    with open(fixture_dir / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = np.asarray(raw[b"data"][0], np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(data.train_images[16], first)  # CHW rows -> HWC, files in order


def test_resolution_order(fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NORMZOO_DATA", str(fixture_dir.parent))  # the folder holding it works too
    assert input_pipeline.load(None, allow_download=False, expected_per_file=16).source == fixture_dir
    other = input_pipeline.write_fake(tmp_path / "other" / input_pipeline.FOLDER, per_file=16, seed=1)
    assert input_pipeline.load(str(other), allow_download=False, expected_per_file=16).source == other


def test_nothing_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NORMZOO_DATA", str(tmp_path / "env"))
    with pytest.raises(input_pipeline.DataError, match=(
        r"(?s)CIFAR-10 was not found\. Looked in:.*--config\.data_dir: .*nowhere.*\$NORMZOO_DATA: .*env.*"
        r"cache: .*cache.*Fix: pass --config\.data_dir")):
        input_pipeline.load(str(tmp_path / "nowhere"), allow_download=False)


def _copy(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_truncated_corrupt_and_partial_files(fixture_dir, tmp_path):
    d = _copy(fixture_dir, tmp_path / "missing")
    (d / "data_batch_3").unlink()
    with pytest.raises(input_pipeline.DataError, match=r"missing data_batch_3; a complete cifar-10-batches-py folder has"):
        input_pipeline.load(str(d), allow_download=False, expected_per_file=16)
    d = _copy(fixture_dir, tmp_path / "truncated")
    (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:500])
    with pytest.raises(input_pipeline.DataError, match=r"test_batch is not a readable CIFAR-10 batch .*truncated or corrupt"):
        input_pipeline.load(str(d), allow_download=False, expected_per_file=16)
    d = _copy(fixture_dir, tmp_path / "corrupt")
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 10), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(input_pipeline.DataError, match=r"data_batch_1 holds data of shape \(4, 10\) with 4 labels"):
        input_pipeline.load(str(d), allow_download=False, expected_per_file=16)
    with pytest.raises(input_pipeline.DataError, match=r"data_batch_1 holds 16 images, expected 10000: the data is partial"):
        input_pipeline.load(str(fixture_dir), allow_download=False)


def _tarball(fixture_dir, path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(fixture_dir, arcname=input_pipeline.FOLDER)
    path.write_bytes(buf.getvalue())
    return path


def test_download_verifies_md5_then_extracts(fixture_dir, tmp_path, monkeypatch):
    archive = _tarball(fixture_dir, tmp_path / "served.tar.gz")
    md5 = input_pipeline.md5sum(archive)
    cache = tmp_path / "cache"
    with pytest.raises(input_pipeline.DataError, match=rf"has md5 {md5}, expected 0+: the file is corrupt.*Nothing was extracted"):
        input_pipeline.download(cache, url=archive.as_uri(), md5="0" * 32)
    assert not (cache / input_pipeline.FOLDER).exists() and not list(cache.glob("*.part"))
    folder = input_pipeline.download(cache, url=archive.as_uri(), md5=md5)
    assert (folder / "data_batch_5").exists()
    # load() downloads into the cache when nothing else has the data.
    monkeypatch.setenv("NORMZOO_CACHE", str(tmp_path / "cache2"))
    monkeypatch.delenv("NORMZOO_DATA", raising=False)
    monkeypatch.setattr(input_pipeline, "URL", archive.as_uri())
    monkeypatch.setattr(input_pipeline, "MD5", md5)
    monkeypatch.setattr(input_pipeline.download, "__defaults__", (archive.as_uri(), md5))
    got = input_pipeline.load(None, expected_per_file=16)
    assert got.source == tmp_path / "cache2" / input_pipeline.FOLDER
    with pytest.raises(input_pipeline.DataError, match=r"could not download CIFAR-10 from .*Download cifar-10-python.tar.gz by hand"):
        input_pipeline.download(tmp_path / "c3", url=(tmp_path / "absent.tar.gz").as_uri())


def test_augmentation_is_reproducible_and_label_preserving_shapes():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3)), jnp.uint8)
    a1 = input_pipeline.augment(jax.random.key(1), x)
    a2 = input_pipeline.augment(jax.random.key(1), x)
    a3 = input_pipeline.augment(jax.random.key(2), x)
    flips = np.asarray(input_pipeline.augment(jax.random.key(1), x, "flip"))
    assert all(np.array_equal(f, o) or np.array_equal(f, o[:, ::-1]) for f, o in zip(flips, np.asarray(x)))
    np.testing.assert_array_equal(input_pipeline.augment(jax.random.key(1), x, "none"), x)
    with pytest.raises(ValueError, match=r"augment mode 'mirror' is not one of 'crop_flip', 'flip', 'none'"):
        input_pipeline.augment(jax.random.key(1), x, "mirror")
    np.testing.assert_array_equal(a1, a2)
    assert a1.shape == x.shape and a1.dtype == x.dtype and not np.array_equal(a1, a3)
    # Every output is a (possibly flipped) 32x32 window of the zero-padded image.
    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(6):
        out = np.asarray(a1[i])
        found = any(np.array_equal(out, w) or np.array_equal(out[:, ::-1], w)
                    for dy in range(9) for dx in range(9) for w in [padded[i, dy:dy + 32, dx:dx + 32]])
        assert found
    s = input_pipeline.standardize(jnp.full((1, 1, 1, 3), 255, jnp.uint8))
    np.testing.assert_allclose(s.ravel(), (1 - input_pipeline.MEAN) / input_pipeline.STD, rtol=1e-6)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("names", [
    # A name that changes the linear layers; the small-batch experiment's reused run (weight: no
    # batch statistics). The slow variant runs every registry name and a ghost-batch run
    # (batch_renorm, one per worker) too.
    "weight",
    pytest.param(None, marks=pytest.mark.slow),  # the preset's default: every registry name
])
def test_comparison_runner(names, data, fixture_dir, tmp_path):
    # The slow variant: two single-device worker processes, as the smoke preset runs; the default
    # one runs in this process (test_failed_worker_is_reported starts a worker by default).
    small = "batch_renorm,weight" if names is None else "weight"
    config = tiny_config(tmp_path, small_batch_norms=small, test_subset=8, workers=2 if names is None else 1,
                         data_dir=str(fixture_dir), expected_per_file=16)
    if names is not None:
        config.norms = names
    results = compare.run_comparison(config, data=data, progress=False)
    want = list(NORMS) if names is None else names.split(",")
    assert sorted(results["runs"]) == sorted(want)
    if names is None:
        assert list(results["runs"]) == list(NORMS)
    for name, s in results["runs"].items():
        assert 0.0 <= s["test_accuracy"] <= 1.0 and np.isfinite(s["final_train_loss"]), name
        assert s["images_per_s"] > 0 and s["params"] > 0 and s["steps"] == 10
    assert set(results["small_batch"]) == set(small.split(","))
    assert results["small_batch"]["weight"]["test_accuracy"] == results["runs"]["weight"]["test_accuracy"]
    for f in ("results.json", "results.md", "curves.png", "small_batch.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    md = (tmp_path / "results.md").read_text()
    assert "| weight |" in md and "Small-batch experiment" in md
    assert ("2 run(s) at a time, one thread each" if names is None else "1 run(s) at a time).") in md
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["preset"] == "tiny" and meta["workers"] == config.workers
    assert re.fullmatch(r"[0-9a-f]{7,40}\+?|unknown", meta["commit"]) and f"commit {meta['commit']};" in md
    if names is None:
        # The small-batch table compares with the full-batch run of the same name.
        assert results["small_batch"]["batch_renorm"]["reference_test_accuracy"] == results["runs"]["batch_renorm"]["test_accuracy"]
        assert "| batch_renorm |" in md
        # The ghost-batch run: BatchRenorm with statistics over 2 examples, bounds relaxed over a
        # fifth of the 10 steps.
        ghost = json.loads((tmp_path / "batch_renorm_b2" / "config.json").read_text())
        assert train.parse_overrides(ghost["norm_overrides"]) == {"virtual_batch_size": 2, "warmup_steps": 2}
        assert json.loads((tmp_path / "batch_renorm_b2" / "history.json").read_text())["summary"]["steps"] == 10
    # The metrics against an independent computation: the worker's saved variables, evaluated
    # here by a plain forward pass over the test images, and the parameter count of the model.
    c = compare._configure(config, "weight", 10)
    got = results["runs"]["weight"]
    variables = train.load_variables(tmp_path / "weight" / "variables.msgpack", c)
    images, labels = data.test_images[: config.test_subset], data.test_labels[: config.test_subset]
    logits = train.build_model(c).apply(variables, input_pipeline.standardize(jnp.asarray(images)), train=False)
    assert got["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)))
    assert got["params"] == sum(a.size for a in jax.tree.leaves(variables["params"]))


# A batch-statistics layer by default; the rest are slow (test_comparison_runner trains a
# weight-side name by default, and test_conformance.py checks gradients in a model).
@pytest.mark.parametrize("norm", some_slow(NORMS, fast={"batch"}))
def test_loss_decreases_on_a_repeatable_toy_batch(norm, data, tmp_path):
    # Width 16 learns the 8 images in 20 steps with room to spare (last/first loss, seeds 0-3 and
    # both random-bit generators: weight 0.42-0.63, batch 0.16-0.29); width 4 was a coin toss.
    config = tiny_config(tmp_path, norm=norm, width=16, augment="none", train_subset=8, test_subset=8,
                         num_epochs=20.0, warmup_epochs=1.0, learning_rate=0.1, weight_decay=0.0)
    h = train.train_and_evaluate(config, tmp_path / norm, data=data, progress=False)["history"]
    losses = h["train_loss"]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_checkpoint_resume_and_saved_variables(data, tmp_path, monkeypatch):
    config = tiny_config(tmp_path, norm="batch_renorm", num_epochs=2.0, test_subset=8)
    real_save = train.save_checkpoint

    def save_then_stop(path, state, meta):  # the run is killed right after its first checkpoint
        real_save(path, state, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, tmp_path / "run", data=data, progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    state_a, meta = train.restore_checkpoint(tmp_path / "run" / "checkpoint.msgpack", _template(config))
    assert int(state_a.step) == 10 and len(meta["history"]["test_accuracy"]) == 1
    # Restarting the same command resumes at step 10 and ends where an uninterrupted run ends.
    resumed = train.train_and_evaluate(config, tmp_path / "run", data=data, progress=False)
    straight = train.train_and_evaluate(config, tmp_path / "straight", data=data, progress=False)
    assert resumed["summary"]["steps"] == straight["summary"]["steps"] == 20
    assert resumed["history"]["train_loss"] == pytest.approx(straight["history"]["train_loss"], rel=1e-5)
    a = train.load_variables(tmp_path / "run" / "variables.msgpack", config)
    b = train.load_variables(tmp_path / "straight" / "variables.msgpack", config)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    state_b, _ = train.restore_checkpoint(tmp_path / "straight" / "checkpoint.msgpack", _template(config))
    jax.tree.map(np.testing.assert_array_equal, b["params"], state_b.params)
    jax.tree.map(np.testing.assert_array_equal, b["batch_stats"], state_b.batch_stats)


def _template(config):
    model = train.build_model(config)
    tx, _ = train.make_optimizer(config, 10)
    return jax.device_get(train.create_state(config, model, tx, jnp.zeros((1, 32, 32, 3)), jax.random.key(0)))


def test_batch_size_must_divide_devices():
    with pytest.raises(ValueError, match=r"config.batch_size=10 is not divisible by the 8 local devices; use a multiple of 8"):
        train.check_batch_size(10, 8)


def test_data_parallel_over_8_devices_equals_one_device(data, tmp_path):
    """jit + NamedSharding: synced statistics make 8 devices train like one."""
    config = tiny_config(tmp_path, norm="batch", num_epochs=1.0)
    out8 = train.train_and_evaluate(config, tmp_path / "eight", data=data, progress=False)
    assert out8["summary"]["devices"] == jax.local_device_count() == 8
    one = train.train_and_evaluate(tiny_config(tmp_path, norm="batch", num_epochs=1.0, devices=1),
                                   tmp_path / "one", data=data, progress=False)
    assert one["summary"]["devices"] == 1
    # Identical to float32 rounding for the first steps; later, training amplifies the different
    # reduction order of 8 shards (a few 1e-3 after 10 steps).
    np.testing.assert_allclose(out8["history"]["train_loss"][:5], one["history"]["train_loss"][:5], rtol=1e-5)
    np.testing.assert_allclose(out8["history"]["train_loss"], one["history"]["train_loss"], rtol=2e-2)


def test_command_line_overrides(fixture_dir, tmp_path):
    cmd = [sys.executable, "-m", "examples.cifar.main", "--config=examples/cifar/configs/default.py:tiny",
           "--config.norm=group", "--config.norm_overrides=num_groups=2", f"--config.data_dir={fixture_dir}",
           f"--config.workdir={tmp_path}", "--config.test_subset=8"]
    import os

    env = {**os.environ, "XLA_FLAGS": ""}
    # The fixture has 16 images per file, so the loader's partial-data check must be relaxed by the
    # config (checked in this process: the data is loaded before anything compiles).
    with pytest.raises(input_pipeline.DataError, match=r"holds 16 images, expected 10000"):
        train.train_and_evaluate(tiny_config(tmp_path, data_dir=str(fixture_dir)), tmp_path / "partial", progress=False)
    cmd.append("--config.expected_per_file=16")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resnet20/group: test accuracy" in out.stdout
    summary = json.loads((tmp_path / "group" / "history.json").read_text())["summary"]
    assert summary["norm"] == "group" and summary["steps"] == 10
    assert train.parse_overrides("r_max=2.0,warmup_steps=100,axis_name=batch") == {
        "r_max": 2.0, "warmup_steps": 100, "axis_name": "batch"}
    with pytest.raises(ValueError, match=r"config.norm_overrides: 'r_max' is not key=value"):
        train.parse_overrides("r_max")


def test_failed_worker_is_reported(data, tmp_path):
    config = tiny_config(tmp_path, norms="batch", small_batch=False, workers=2, data_dir=str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match=r"the run 'batch' failed \(exit 1\)"):
        compare.run_comparison(config, data=data, progress=False)
