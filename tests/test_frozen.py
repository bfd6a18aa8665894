"""FrozenBatchNorm (linen, nnx, functional): fixed statistics and affine, against NumPy, flax's
BatchNorm at inference, and torchvision's FrozenBatchNorm2d side by side (the torch extra)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
from normzoo import deploy
from normzoo import functional as F
from normzoo import nnx as nznnx
from tests import reference as ref

RNG = np.random.default_rng(0)
C = 5


def _variables(seed=1):
    r = np.random.default_rng(seed)
    return {"params": {"scale": jnp.asarray(r.uniform(0.5, 2.0, C), jnp.float32),
                       "bias": jnp.asarray(r.normal(size=C), jnp.float32)},
            "batch_stats": {"mean": jnp.asarray(r.normal(3.0, 1.0, C), jnp.float32),
                            "var": jnp.asarray(r.uniform(0.5, 4.0, C), jnp.float32)}}


def _numpy(x, v, eps=1e-5):
    p, s = v["params"], v["batch_stats"]
    return (ref.f64(x) - ref.f64(s["mean"])) / np.sqrt(ref.f64(s["var"]) + eps) * ref.f64(p["scale"]) + ref.f64(p["bias"])


def test_linen_normalizes_by_the_stored_statistics_in_both_modes_and_updates_nothing():
    x = jnp.asarray(RNG.normal(3.0, 2.0, (6, 4, 4, C)), jnp.float32)
    v = _variables()
    for use_running_average in (False, True):
        y, after = normzoo.FrozenBatchNorm(use_running_average=use_running_average).apply(v, x, mutable=["batch_stats"])
        np.testing.assert_allclose(y, _numpy(x, v), rtol=1e-5, atol=1e-5)
        jax.tree.map(np.testing.assert_array_equal, after["batch_stats"], v["batch_stats"])
    # The call argument is accepted as BatchNorm's is, with or without the field.
    np.testing.assert_allclose(normzoo.FrozenBatchNorm().apply(v, x, use_running_average=False), _numpy(x, v),
                               rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_input_only():
    x = jnp.asarray(RNG.normal(3.0, 2.0, (6, C)), jnp.float32)
    v = _variables()
    layer = normzoo.FrozenBatchNorm()
    dv, dx = jax.grad(lambda v, x: jnp.sum(layer.apply(v, x) ** 2), argnums=(0, 1))(v, x)
    assert all(not np.any(g) for g in jax.tree.leaves(dv))
    mul = ref.f64(v["params"]["scale"]) / np.sqrt(ref.f64(v["batch_stats"]["var"]) + 1e-5)
    np.testing.assert_allclose(dx, 2 * _numpy(x, v) * mul, rtol=1e-5, atol=1e-5)


def test_a_flax_batch_norm_checkpoint_gives_flax_inference_outputs():
    """Drop-in for a trained flax.linen.BatchNorm: same variables, flax's inference outputs."""
    x = jnp.asarray(RNG.normal(-2.0, 3.0, (8, 3, C)), jnp.float32)
    trained = nn.BatchNorm(use_running_average=False, momentum=0.5)
    v = trained.init(jax.random.key(0), x)
    _, updates = trained.apply(v, x, mutable=["batch_stats"])
    v = {**v, **updates, "params": _variables()["params"]}
    want = nn.BatchNorm(use_running_average=True).apply(v, x)
    np.testing.assert_allclose(normzoo.FrozenBatchNorm(use_running_average=False).apply(v, x), want,
                               rtol=1e-5, atol=1e-5)
    assert jax.tree.map(jnp.shape, normzoo.FrozenBatchNorm().init(jax.random.key(0), x)) == \
        jax.tree.map(jnp.shape, nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x))


def test_nnx_twin_equals_linen_and_keeps_its_state():
    x = jnp.asarray(RNG.normal(3.0, 2.0, (6, 4, C)), jnp.float32)
    v = _variables()
    layer = nznnx.FrozenBatchNorm(C, rngs=nnx.Rngs(0))
    nznnx.from_linen(layer, v)
    layer.train()
    before = jax.tree.map(np.asarray, nnx.state(layer))
    np.testing.assert_allclose(layer(x), normzoo.FrozenBatchNorm().apply(v, x), rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(layer), before)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_functional_needs_the_statistics():
    with pytest.raises(ValueError, match=r"frozen_batch_norm: a frozen BatchNorm normalizes by fixed statistics: "
                                         r"pass `mean` and `var` \(got var=None\)"):
        F.frozen_batch_norm(jnp.ones((2, 3)), jnp.zeros(3), None)


def test_fold_folds_it_into_the_convolution():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return normzoo.FrozenBatchNorm()(nn.Conv(C, (3, 3))(x))

    x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)
    v = Net().init(jax.random.key(0), x)
    v = {"params": {**v["params"], "FrozenBatchNorm_0": _variables()["params"]},
         "batch_stats": {"FrozenBatchNorm_0": _variables()["batch_stats"]}}
    folded = deploy.fold(Net(), v, x)
    assert [r[2] for r in folded.report] == ["folded"] and "batch_stats" not in folded.variables
    np.testing.assert_allclose(folded(x), Net().apply(v, x), rtol=1e-5, atol=1e-5)


def test_torchvision_frozen_batch_norm_side_by_side():
    torch = pytest.importorskip("torch", reason="optional: pip install 'normzoo[torch]' runs the side-by-side tests")
    from examples.porting.torch_models import torchvision_models

    try:
        torchvision_models()
    except ModuleNotFoundError:
        pytest.skip("optional: torchvision is not installed (pip install 'normzoo[torch]')")
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3, padding=1), FrozenBatchNorm2d(C))
    r = np.random.default_rng(5)
    for name in ("weight", "bias", "running_mean", "running_var"):
        buf = getattr(net[1], name)
        buf.copy_(torch.from_numpy(r.uniform(0.5, 2.0, C).astype(np.float32)))
    state = {k: v.numpy() for k, v in net.state_dict().items()}

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return normzoo.FrozenBatchNorm()(nn.Conv(C, (3, 3))(x))

    x = r.normal(size=(2, 3, 7, 7)).astype(np.float32)
    template = Net().init(jax.random.key(0), jnp.moveaxis(x, 1, -1))
    v = deploy.from_torch(state, template, {"0": "Conv_0", "1": "FrozenBatchNorm_0"})
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.moveaxis(Net().apply(v, jnp.moveaxis(x, 1, -1)), -1, 1), want, rtol=1e-5, atol=1e-5)


class _Mixed(nn.Module):
    """flax's BatchNorm, normzoo's BatchRenorm (offset scale) and IBN, each after a convolution."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(normzoo.BatchRenorm(use_running_average=not train, scale_plus_one=True)(nn.Conv(8, (3, 3))(x)))
        x = normzoo.IBN(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
        return nn.Dense(3)(x.mean((1, 2)))


def _trained(model, x):
    v = model.init(jax.random.key(0), x, train=False)
    for _ in range(2):  # running statistics away from their initial values
        _, updates = model.apply(v, x + 1.0, train=True, mutable=["batch_stats"])
        v = {**v, **updates}
    return v


def test_freeze_batch_norm_makes_training_calls_inference_calls_and_back():
    x = jnp.asarray(RNG.normal(size=(4, 6, 6, 3)), jnp.float32)
    model = _Mixed()
    v = _trained(model, x)
    want = model.apply(v, x, train=False)
    with normzoo.freeze_batch_norm():
        y, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        grads = jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, x, train=True,
                                                       mutable=["batch_stats"])[0] ** 2))(v["params"])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], v["batch_stats"])
    mask = normzoo.batch_norm_mask(v)
    frozen = [g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if m]
    trained = [g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if not m]
    assert len(frozen) == 6 and all(not np.any(g) for g in frozen)  # BatchNorm, BatchRenorm, IBN's BN: scale, bias
    assert all(np.any(g) for g in trained)  # convolutions, the Dense, and IBN's instance part
    assert jax.tree_util.keystr(next(k for k, m in jax.tree_util.tree_leaves_with_path(mask) if m)).startswith("['BatchNorm_0']")
    # Outside the context the same call trains again: batch statistics, updated.
    y_train, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(y_train, want, atol=1e-3)
    assert not np.allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], v["batch_stats"]["BatchNorm_0"]["mean"])


@pytest.mark.slow  # the mixed model again, through an optimizer
def test_batch_norm_mask_keeps_weight_decay_off_the_frozen_parameters():
    optax = pytest.importorskip("optax")
    x = jnp.asarray(RNG.normal(size=(4, 6, 6, 3)), jnp.float32)
    model = _Mixed()
    v = _trained(model, x)
    mask = normzoo.batch_norm_mask(v)
    tx = optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.adamw(1e-2, weight_decay=0.5)},
                               jax.tree.map(lambda m: "frozen" if m else "train", mask))
    with normzoo.freeze_batch_norm():
        grads = jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, x, train=True,
                                                       mutable=["batch_stats"])[0] ** 2))(v["params"])
    updates, _ = tx.update(grads, tx.init(v["params"]), v["params"])
    new = optax.apply_updates(v["params"], updates)
    for (path, old), n, m in zip(jax.tree_util.tree_leaves_with_path(v["params"]), jax.tree.leaves(new),
                                 jax.tree.leaves(mask)):
        assert np.array_equal(old, n) == m, jax.tree_util.keystr(path)


def test_batch_norm_mask_needs_params():
    with pytest.raises(ValueError, match=r"batch_norm_mask: variables has no 'params' \(got the collections \['batch_stats'\]\)"):
        normzoo.batch_norm_mask({"batch_stats": {}})


class _NnxMixed(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.layers = nnx.List([nnx.BatchNorm(8, rngs=rngs), nznnx.BatchRenorm(8, scale_plus_one=True, rngs=rngs)])
        self.ibn = nznnx.IBN(8, rngs=rngs)

    def __call__(self, x):
        x = self.conv(x)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.ibn(x)


def test_nnx_freeze_batch_norm_swaps_in_frozen_layers_sharing_the_variables_and_undoes():
    x = jnp.asarray(RNG.normal(size=(4, 6, 6, 3)), jnp.float32)
    model = _NnxMixed(nnx.Rngs(0))
    model.train()
    for _ in range(2):
        model(x + 1.0)
    model.eval()
    want = model(x)
    state = jax.tree.map(np.asarray, nnx.state(model))
    freeze = nznnx.freeze_batch_norm(model)
    assert freeze.paths == ["ibn/BN", "layers/0", "layers/1"]
    model.train()  # the frozen layers ignore the mode
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), state)  # the same variables, unchanged
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    for path in ("layers/0/scale", "layers/1/bias", "ibn/BN/scale"):
        assert not np.any(flat[path][...]), path
    assert np.any(flat["conv/kernel"][...]) and np.any(flat["ibn/IN/scale"][...])
    freeze.undo()
    assert type(model.layers[0]) is nnx.BatchNorm and type(model.ibn.BN) is nznnx.BatchNorm
    model.train()  # the originals come back in the mode they were frozen in (eval here)
    model(x)  # training again: the running statistics move
    assert not np.allclose(model.layers[0].mean[...], state["layers"][0]["mean"][...])
