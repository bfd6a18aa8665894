"""The CIFAR example's NNX models (examples/cifar/nnx_models.py) against its linen models, and
the shared training loop with ``config.api = "nnx"``."""

import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.cifar import input_pipeline, models, nnx_models, train
from examples.cifar.configs.default import NORMS, get_config
from tests.conftest import some_slow
from tests.test_cifar_example import data, fixture_dir  # noqa: F401  (the tiny CIFAR files, shared)


def _in_creation_order(tree):
    """Leaves of a linen variable dict in creation (insertion) order; jax.tree sorts keys."""
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _in_creation_order(value)
    else:
        yield tree


def _nnx_variables(node, kind):
    """An NNX model's Variables of ``kind`` in the order its constructor created them."""
    if isinstance(node, kind):
        yield node
    elif isinstance(node, (list, tuple, nnx.List)):
        for item in node:
            yield from _nnx_variables(item, kind)
    elif isinstance(node, nnx.Module):
        for value in vars(node).values():
            yield from _nnx_variables(value, kind)


CASES = {
    "resnet20": (dict(width=4, blocks_per_stage=1), (3, 32, 32, 3)),
    "vgg": (dict(stages=((4,), (8,), (8, 8))), (3, 16, 16, 3)),
}


# ResNet-20 with every name and VGG with a batch-statistics and a weight-side one; the default run
# keeps a batch-statistics name (ResNet-20) and a weight-side one (VGG).
@pytest.mark.parametrize("model,norm", some_slow(
    [("resnet20", n) for n in NORMS] + [("vgg", "batch"), ("vgg", "weight")],
    fast={("resnet20", "batch"), ("vgg", "weight")},
    ids=lambda v: "-".join(v)))
def test_nnx_model_equals_the_linen_model_on_the_same_variables(model, norm):
    kwargs, shape = CASES[model]
    linen = models.create(model, norm=norm, **kwargs)
    x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, shape), jnp.float32)
    variables = linen.init(jax.random.key(0), x, train=True)
    ours = nnx_models.MODELS[model](norm=norm, **kwargs, rngs=nnx.Rngs(1))
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        targets = list(_nnx_variables(ours, kind))
        leaves = list(_in_creation_order(variables.get(collection, {})))
        assert [v[...].shape for v in targets] == [a.shape for a in leaves], collection
        for v, a in zip(targets, leaves):
            v[...] = a
    y0, upd = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    ours.train()
    np.testing.assert_allclose(ours(x), y0, rtol=1e-5, atol=1e-5)
    for v, a in zip(_nnx_variables(ours, nnx.BatchStat), _in_creation_order(upd.get("batch_stats", {}))):
        np.testing.assert_allclose(v[...], a, rtol=1e-6, atol=1e-6)
    ours.eval()
    np.testing.assert_allclose(ours(x), linen.apply({**variables, **upd}, x, train=False), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the default run trains both APIs from the same variables (below)
def test_training_loop_trains_the_nnx_model_with_one_config_field(data, tmp_path):
    c = get_config("tiny")
    for k, v in dict(api="nnx", norm="batch", width=16, augment="none", train_subset=8, test_subset=8,
                     num_epochs=20.0, warmup_epochs=1.0, learning_rate=0.1, weight_decay=0.0).items():
        c[k] = v
    out = train.train_and_evaluate(c, tmp_path / "nnx", data=data, progress=False)
    losses = out["history"]["train_loss"]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # The saved variables reload into the NNX model and give the reported test accuracy.
    variables = train.load_variables(tmp_path / "nnx" / "variables.msgpack", c)
    logits = train.build_model(c).apply(variables, input_pipeline.standardize(jnp.asarray(data.test_images[:8])),
                                        train=False)
    assert out["summary"]["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == data.test_labels[:8])))
    assert out["summary"]["params"] == sum(a.size for a in jax.tree.leaves(variables["params"]))


def test_unknown_api_is_refused():
    c = get_config("tiny")
    c.api = "haiku"
    with pytest.raises(ValueError, match="config.api='haiku' is not 'linen' or 'nnx'"):
        train.build_model(c)


@pytest.mark.slow  # two worker processes, each compiling a model
def test_comparison_runner_trains_each_name_with_both_apis_side_by_side(data, fixture_dir, tmp_path):
    from examples.cifar import compare

    c = get_config("tiny")
    for k, v in dict(workdir=str(tmp_path), api="linen,nnx", norms="batch", test_subset=8, workers=2,
                     data_dir=str(fixture_dir), expected_per_file=16).items():
        c[k] = v
    results = compare.run_comparison(c, data=data, progress=False)
    assert list(results["runs"]) == ["batch (linen)", "batch (nnx)"] and not results["small_batch"]
    for api in ("linen", "nnx"):
        run = json.loads((tmp_path / f"batch_{api}" / "config.json").read_text())
        assert run["api"] == api and run["norm"] == "batch"
        s = results["runs"][f"batch ({api})"]
        assert s["steps"] == 10 and np.isfinite(s["final_train_loss"])
    # The same architecture: the same number of parameters.
    assert results["runs"]["batch (linen)"]["params"] == results["runs"]["batch (nnx)"]["params"]
    assert "| batch (nnx) |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # eager linen init (creation order); the forward equality above runs by default
@pytest.mark.parametrize("norm", ["batch", "weight"])
def test_from_the_same_variables_both_apis_train_identically(norm, data):
    """The training loop, optimizer and data are shared: only the initial draws differ between APIs."""
    c = get_config("tiny")
    c.norm = norm
    linen = train.build_model(c)
    c.api = "nnx"
    functional = train.build_model(c)
    tx, _ = train.make_optimizer(c, 10)
    sample = jnp.zeros((2, 32, 32, 3))
    variables = linen.init(jax.random.key(0), sample, train=True)  # eager: creation order kept
    model = nnx_models.MODELS["resnet20"](**functional.kwargs, rngs=nnx.Rngs(1))
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        for v, a in zip(_nnx_variables(model, kind), _in_creation_order(variables.get(collection, {}))):
            v[...] = a
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    images, labels = jnp.asarray(data.train_images[:32]), jnp.asarray(data.train_labels[:32])
    perm = jnp.arange(32)
    losses = {}
    for api, m, p, s in (("linen", linen, variables["params"], variables.get("batch_stats", {})),
                         ("nnx", functional, params, stats)):
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params=p, batch_stats=s, opt_state=tx.init(p),
                                 key=jax.random.key_data(jax.random.key(2)))
        step = jax.jit(train.make_train_step(m, tx, 32, 8, "flip"))
        losses[api] = []
        for _ in range(4):
            state, metrics = step(state, images, labels, perm)
            losses[api].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses["nnx"], losses["linen"], rtol=1e-6)
    assert losses["linen"][0] != losses["linen"][-1]
