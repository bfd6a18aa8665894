"""normzoo.nnx against flax.nnx (side by side, driven by the installed flax), against the linen
layers on the same variables (the same code must give the same numbers), and NumPy."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import normzoo
from normzoo import nnx as nznnx
from tests import reference as ref
from tests.conftest import PATHS, forced_path, some_slow
from tests.test_santurkar_layers import lp_reference

# (name, constructor keywords shared by both, input shape); flax.nnx has each of these layers.
PAIRS = {
    "BatchNorm": ({}, (16, 5)),
    "LayerNorm": ({}, (4, 7, 5)),
    "GroupNorm": ({"num_groups": 5}, (3, 4, 4, 5)),
    "RMSNorm": ({}, (4, 7, 5)),
    "InstanceNorm": ({}, (3, 4, 4, 5)),
}
NORMZOO_ONLY_ARGUMENTS = {
    "BatchNorm": ["virtual_batch_size", "scale_plus_one"],
    "LayerNorm": ["scale_plus_one"],
    "GroupNorm": ["scale_plus_one"],
    "RMSNorm": ["use_bias", "bias_init", "bias_metadata", "scale_plus_one"],
    "InstanceNorm": ["track_running_stats", "use_running_average", "momentum", "scale_plus_one"],
}


def _data(shape, seed=0, loc=0.5, scale=2.0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.normal(loc, scale, shape), jnp.float32)


def _same_init(a, b):
    if a is b:
        return True
    key = jax.random.key(3)
    return np.array_equal(a(key, (4,), jnp.float32), b(key, (4,), jnp.float32))


@pytest.mark.parametrize("name", PAIRS)
def test_constructor_is_flax_nnx_constructor_then_normzoo_keywords(name):
    theirs = list(inspect.signature(getattr(nnx, name).__init__).parameters.values())
    ours = list(inspect.signature(getattr(nznnx, name).__init__).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        assert a.kind == b.kind, a.name
        if callable(b.default) and b.default is not inspect.Parameter.empty and a.name.endswith("init"):
            assert _same_init(a.default, b.default), a.name
        else:
            assert a.default == b.default or a.default is b.default, (a.name, a.default, b.default)
    extra = ours[len(theirs):]
    assert [p.name for p in extra] == NORMZOO_ONLY_ARGUMENTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def _state_layout(module):
    return jax.tree.map(lambda v: (type(v).__name__, v.shape, v.dtype), nnx.state(module),
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("options", [{}, {"use_bias": False, "param_dtype": jnp.bfloat16},
                                     {"use_scale": False, "scale_init": nn.initializers.normal(1.0),
                                      "bias_init": nn.initializers.normal(1.0)}],
                         ids=["default", "no_bias_bf16", "no_scale_random_init"])
def test_variables_are_flax_nnx_variables_and_load_both_ways(name, options):
    kw, shape = PAIRS[name]
    if name == "RMSNorm":
        options = {k: v for k, v in options.items() if k not in ("use_bias", "bias_init")}
    theirs = getattr(nnx, name)(shape[-1], **kw, **options, rngs=nnx.Rngs(7))
    ours = getattr(nznnx, name)(shape[-1], **kw, **options, rngs=nnx.Rngs(7))
    assert _state_layout(ours) == _state_layout(theirs)
    # The same keys in the same order: even random initializers give flax.nnx's values.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(theirs))
    for attr in ("scale", "bias"):
        assert (getattr(ours, attr, None) is None) == (getattr(theirs, attr, None) is None)
    moved = jax.tree.map(lambda a: a + 1, nnx.state(theirs))
    nnx.update(ours, moved)
    nnx.update(theirs, nnx.state(ours))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(theirs), moved)


def _loss_and_grads(module, x, w, **call):
    def loss(m):
        y = m(x, **call)
        return jnp.sum(jnp.tanh(y) * w), y
    (value, y), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return y, grads


# Every layer on the CPU's checked path; the shifted path (other platforms) in -m slow (the linen
# tests run every layer on both paths by default).
@pytest.mark.parametrize("name,masked,path", some_slow(
    [(n, m, p) for p in PATHS for n in PAIRS for m in (False, True)],
    # Unmasked outputs are also checked by test_flax_nnx_behaviours' grid; gradients here.
    fast={(n, True, "checked") for n in PAIRS} | {("BatchNorm", False, "checked")},
    ids=lambda v: f"{v[0]}-{'masked' if v[1] else 'plain'}-{v[2]}"))
def test_outputs_statistics_and_gradients_equal_flax_nnx(name, masked, path):
    with forced_path(path):
        _equal_flax_nnx(name, masked)


def _equal_flax_nnx(name, masked):
    kw, shape = PAIRS[name]
    x, w = _data(shape), _data(shape, seed=1)
    call = {"mask": jnp.asarray(np.random.default_rng(2).random(shape) < 0.7)} if masked else {}
    inits = {"scale_init": nn.initializers.normal(1.0)}
    if name != "RMSNorm":
        inits["bias_init"] = nn.initializers.normal(1.0)
    # Masked rows keep few elements, where flax's default E[x^2] - E[x]^2 loses digits: its stable mode.
    theirs = getattr(nnx, name)(shape[-1], **kw, **inits, use_fast_variance=not masked, rngs=nnx.Rngs(0))
    ours = getattr(nznnx, name)(shape[-1], **kw, **inits, rngs=nnx.Rngs(0))
    for step in range(2):  # the second step starts from the updated statistics
        y0, g0 = _loss_and_grads(theirs, x + step, w, **call)
        y1, g1 = _loss_and_grads(ours, x + step, w, **call)
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     nnx.state(ours), nnx.state(theirs))
    if name == "BatchNorm":
        theirs.eval()
        ours.eval()
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# The layers flax.nnx lacks, against NumPy references over several training steps (the running
# statistics after each, BatchRenorm across its warm-up), independently of the linen layers.
def _renorm_ref(x, st, layer):
    t = min(int(st["steps"]) / layer.warmup_steps, 1.0)
    y = ref.batch_renorm(x, (0,), layer.epsilon, st["mean"], st["var"], 1 + (layer.r_max - 1) * t, layer.d_max * t)
    return y, {"mean": x.mean(0), "var": x.var(0)}


def _ghost_ref(x, st, layer):
    chunks = x.reshape(4, 4, -1)
    y = np.concatenate([ref.batch_norm(c, (0,), layer.epsilon) for c in chunks])
    return y, {"mean": chunks.mean(1).mean(0), "var": chunks.var(1).mean(0)}


def _ibn_ref(x, st, layer):
    from tests.test_functional import ibn_reference
    return (ibn_reference(x, 2, layer.BN.epsilon, np.ones(2), np.zeros(2), np.ones(6), np.zeros(6)),
            {"BN": {"mean": x[..., 2:].mean((0, 1, 2)), "var": x[..., 2:].var((0, 1, 2))}})


ONLY_NORMZOO = {
    "BatchRenorm": (lambda: nznnx.BatchRenorm(5, momentum=0.6, warmup_steps=2, r_max=1.5, d_max=0.5, rngs=nnx.Rngs(0)),
                    (16, 5), _renorm_ref),
    "MeanOnlyBatchNorm": (lambda: nznnx.MeanOnlyBatchNorm(5, momentum=0.6, rngs=nnx.Rngs(0)), (16, 5),
                          lambda x, st, layer: (x - x.mean(0), {"mean": x.mean(0)})),
    "ghost BatchNorm": (lambda: nznnx.BatchNorm(5, momentum=0.6, virtual_batch_size=4, rngs=nnx.Rngs(0)), (16, 5),
                        _ghost_ref),
    "tracked InstanceNorm": (lambda: nznnx.InstanceNorm(5, track_running_stats=True, momentum=0.6, rngs=nnx.Rngs(0)),
                             (3, 4, 4, 5), lambda x, st, layer: (ref.instance_norm(x, layer.epsilon),
                                                                 {"mean": x.mean((1, 2)).mean(0), "var": x.var((1, 2)).mean(0)})),
    "LpBatchNorm p=1": (lambda: nznnx.LpBatchNorm(5, p=1, momentum=0.6, rngs=nnx.Rngs(0)), (64, 5),
                        lambda x, st, layer: (lp_reference(x, 1)[0], dict(zip(("mean", "var"), lp_reference(x, 1)[1:])))),
    "IBN": (lambda: nznnx.IBN(8, ratio=0.25, momentum=0.6, rngs=nnx.Rngs(0)), (4, 3, 3, 8), _ibn_ref),
}


@pytest.mark.parametrize("name", some_slow(list(ONLY_NORMZOO), fast={"BatchRenorm", "IBN", "tracked InstanceNorm"}))
def test_layers_flax_nnx_lacks_match_numpy_over_training_steps(name):
    build, shape, reference = ONLY_NORMZOO[name]
    layer = build()
    for step in range(3):  # BatchRenorm: plain BatchNorm, half way, then its full bounds
        x = np.asarray(_data(shape, seed=10 + step, loc=2.0 * step))
        before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat)))
        y = layer(jnp.asarray(x))
        want, batch = reference(ref.f64(x), before, layer)
        np.testing.assert_allclose(y, want, atol=3e-5)
        momentum = 0.6
        expected = jax.tree.map(lambda old, new: momentum * old + (1 - momentum) * new,
                                {k: v for k, v in before.items() if k != "steps"}, batch)
        got = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     {k: v for k, v in got.items() if k != "steps"}, expected)
        if "steps" in got:
            assert int(got["steps"]) == step + 1
    layer.eval()  # inference: the running statistics
    x = _data(shape, seed=99)
    if name == "tracked InstanceNorm":
        np.testing.assert_allclose(layer(x), (x - layer.mean[...]) / np.sqrt(layer.var[...] + layer.epsilon), atol=1e-5)


def test_large_means_stay_accurate_against_float64():
    x = _data((64, 6), loc=1e4, scale=1.0)
    ours = nznnx.BatchNorm(6, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x), ref.batch_norm(np.asarray(x, np.float64), (0,), 1e-5), atol=2e-3)
    ln = nznnx.LayerNorm(6, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ln(x), ref.layer_norm(np.asarray(x, np.float64), (1,), 1e-6), atol=2e-3)
    # flax.nnx's default (fast) variance loses these statistics entirely.
    assert np.abs(np.asarray(nnx.BatchNorm(6, rngs=nnx.Rngs(0))(x)) - ref.batch_norm(np.asarray(x, np.float64), (0,), 1e-5)).max() > 0.1


def test_train_eval_view_and_call_argument_choose_statistics_as_flax_nnx():
    x = _data((16, 5))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(5, 5, rngs=rngs)
            self.bn = nznnx.BatchNorm(5, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

    net = Net(nnx.Rngs(0))
    train_y = net.bn(x)
    running = (x - net.bn.mean[...]) / jnp.sqrt(net.bn.var[...] + 1e-5)
    net.eval()
    assert net.bn.use_running_average is True and net.drop.deterministic is True
    np.testing.assert_allclose(net.bn(x), running, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.bn(x, use_running_average=False), train_y, rtol=1e-5, atol=1e-5)
    net.train()
    assert net.bn.use_running_average is False
    running = (x - net.bn.mean[...]) / jnp.sqrt(net.bn.var[...] + 1e-5)  # moved by the training call
    view = nnx.view(net, use_running_average=True)
    np.testing.assert_allclose(view.bn(x), running, rtol=1e-5, atol=1e-5)
    assert net.bn.use_running_average is False
    with pytest.raises(ValueError, match="no use_running_average given; pass it to the constructor"):
        nznnx.BatchNorm(5, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_errors_name_the_argument_and_the_fix():
    bn = nznnx.BatchNorm(5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm: `mean` has shape \(5,\), but the input of shape \(8, 4\) has "
                                         r"\(4,\) features along `axis`=\(1,\); give it shape \(4,\) \(in a Flax model: "
                                         r"build the layer, or re-run `init`, for this input's features\)"):
        bn(jnp.ones((8, 4)))
    with pytest.raises(ValueError, match="r_max=0.5 must be >= 1"):
        nznnx.BatchRenorm(5, r_max=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups=3 must be positive and divide the 5 channels"):
        nznnx.GroupNorm(5, num_groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="virtual_batch_size=3 must divide the batch dimension"):
        nznnx.BatchNorm(5, virtual_batch_size=3, rngs=nnx.Rngs(0))(jnp.ones((8, 5)))
    with pytest.raises(ValueError, match=r"num_features=\(2, 3\) must give one size per feature axis"):
        nznnx.LayerNorm((2, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"IBN: ratio=1.5 must lie in \[0, 1\]"):
        nznnx.IBN(8, ratio=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        nznnx.Identity(4, epsilon=1e-3)


def test_jit_grad_and_an_optimizer_step_update_params_and_statistics():
    optax = pytest.importorskip("optax")
    model = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nznnx.BatchRenorm(8, warmup_steps=0, rngs=nnx.Rngs(1)))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x, t = _data((16, 5)), _data((16, 8), seed=3)

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - t) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, x)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert int(model.layers[1].steps[...]) == 5
    assert not np.allclose(model.layers[1].mean[...], 0)


D = 8


@pytest.mark.skipif(jax.device_count() < D, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("mapper,path", some_slow([(m, p) for p in PATHS for m in ("shard_map", "pmap", "jit_sharding")],
                                                  fast={("shard_map", "checked")},
                                                  ids=lambda v: "-".join(v)))
def test_synced_statistics_equal_the_global_batch(mapper, path):
    with forced_path(path):
        _synced_equals_global(mapper)


def _synced_equals_global(mapper):
    x, w = _data((32, 4, 6), loc=1.0), _data((32, 4, 6), seed=1)
    single = nznnx.BatchNorm(6, momentum=0.7, rngs=nnx.Rngs(0))
    y_ref, g_ref = _loss_and_grads(single, x, w)
    mesh = jax.make_mesh((D,), ("batch",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))  # noqa: E731
    if mapper == "shard_map":
        synced = nznnx.BatchNorm(6, momentum=0.7, axis_name="batch", rngs=nnx.Rngs(0))

        # Replicated params: shard_map's transpose sums their gradients across devices.
        run = nnx.jit(nnx.shard_map(_loss_and_grads, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                                    out_specs=(P("batch"), P())))
        y, g = run(synced, put(x), put(w))
    elif mapper == "pmap":
        synced = nznnx.BatchNorm(6, momentum=0.7, axis_name="batch", rngs=nnx.Rngs(0))
        run = nnx.pmap(_loss_and_grads, in_axes=(nnx.StateAxes({...: None}), 0, 0), out_axes=0, axis_name="batch")
        y, g = run(synced, x.reshape(D, -1, 4, 6), w.reshape(D, -1, 4, 6))
        y = y.reshape(x.shape)
        g = jax.tree.map(lambda a: a.sum(0), g)  # each device's share of the gradient of the summed loss
    else:  # no axis_name: the compiler reduces across the sharded batch
        synced = nznnx.BatchNorm(6, momentum=0.7, rngs=nnx.Rngs(0))
        y, g = nnx.jit(_loss_and_grads)(synced, put(x), put(w))
        assert len(y.sharding.device_set) == D
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g, g_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nnx.state(synced, nnx.BatchStat), nnx.state(single, nnx.BatchStat))


# ----------------------------------------------------------------------------- weight family, IBN


def _weight_loss(y):
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("name", some_slow(["WeightNormLinear", "CosineLinear", "WeightNormConv", "CosineConv"],
                                           fast={"WeightNormConv", "CosineLinear"}))
def test_weight_layers_equal_flax_layers_with_the_normalized_kernel(name):
    """Outputs and gradients against flax.nnx.Linear / Conv computing the formula on their own."""
    conv = "Conv" in name
    kw = dict(strides=2, padding="CIRCULAR", feature_group_count=2, kernel_dilation=2) if conv else {}
    shape = (2, 9, 9, 4) if conv else (3, 4)
    extra = {} if "WeightNorm" in name else {"use_bias": True, "use_scale": True}
    ours = getattr(nznnx, name)(4, 6, *([(3, 3)] if conv else []), **kw, **extra, rngs=nnx.Rngs(0))
    plain = (nnx.Conv(4, 6, (3, 3), **kw, rngs=nnx.Rngs(1)) if conv else nnx.Linear(4, 6, rngs=nnx.Rngs(1)))
    x = _data(shape, loc=1.0)
    params = nnx.state(ours, nnx.Param)

    def flax_layer(layer, **values):  # flax's own layer with these parameter values (traceable)
        graphdef, state = nnx.split(layer)
        pure = {**nnx.to_pure_dict(state), **values}
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state)

    def theirs(params, x):  # the paper's formula, on flax's own layer
        p = nnx.to_pure_dict(params)
        if "v" in p:
            v = p["v"]
            kernel = p["g"] * v / jnp.sqrt(jnp.sum(v**2, tuple(range(v.ndim - 1)), keepdims=True) + 1e-12)
            return flax_layer(plain, kernel=kernel, bias=p["bias"])(x)
        k = p["kernel"]
        dot = flax_layer(plain, kernel=k, bias=jnp.zeros(6))(x)
        if conv:  # ||x_p||^2 of each unit's patch: x^2 through the same convolution with ones
            patch = flax_layer(plain, kernel=jnp.ones_like(k), bias=jnp.zeros(6))(x**2)
        else:
            patch = jnp.sum(x**2, -1, keepdims=True)
        norm_w = jnp.sqrt(jnp.sum(k**2, tuple(range(k.ndim - 1))))
        return p["scale"] * dot / (norm_w * jnp.sqrt(patch)) + p["bias"]

    y1, (g1, gx1) = nnx.value_and_grad(lambda m, x: _weight_loss(m(x)), argnums=(0, 1))(ours, x)
    y0, (g0, gx0) = jax.value_and_grad(lambda p, x: _weight_loss(theirs(p, x)), (0, 1))(params, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 nnx.to_pure_dict(nnx.state(g1, nnx.Param)), nnx.to_pure_dict(g0))


def test_weight_norm_linear_equals_flax_nnx_weight_norm_of_a_linear():
    """flax.nnx.WeightNorm(nnx.Linear) with its kernel set to our v and its scale to our g."""
    ours = nznnx.WeightNormLinear(5, 4, rngs=nnx.Rngs(0))
    ours.g[...] = jnp.arange(1.0, 5.0)
    theirs = nnx.WeightNorm(nnx.Linear(5, 4, rngs=nnx.Rngs(1)), feature_axes=-1, rngs=nnx.Rngs(2))
    theirs.layer_instance.kernel[...] = ours.v[...]
    theirs.layer_instance.bias[...] = ours.bias[...] + 0.5
    ours.bias[...] = ours.bias[...] + 0.5
    assert theirs.scales[("kernel",)].shape == ours.g[...].shape  # flax.nnx keeps g per wrapped path
    theirs.scales[("kernel",)] = ours.g[...]
    x = _data((3, 5))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_linear_constructors_are_flax_nnx_constructors_then_normzoo_keywords():
    for ours, theirs, extra in [(nznnx.WeightNormLinear, nnx.Linear, ["scale_init", "epsilon"]),
                                (nznnx.CosineLinear, nnx.Linear, ["use_scale", "scale_init", "epsilon"]),
                                (nznnx.WeightNormConv, nnx.Conv, ["scale_init", "epsilon"]),
                                (nznnx.CosineConv, nnx.Conv, ["use_scale", "scale_init", "epsilon"])]:
        a = list(inspect.signature(ours.__init__).parameters.values())
        b = list(inspect.signature(theirs.__init__).parameters.values())
        assert [p.name for p in a] == [p.name for p in b] + extra, ours
        for p, q in zip(a, b):
            assert p.kind == q.kind, (ours, p.name)
            if p.name not in ("use_bias", "kernel_init") or ours in (nznnx.WeightNormLinear, nznnx.WeightNormConv):
                assert p.default == q.default or p.default is q.default or _same_init(p.default, q.default), (ours, p.name)
    with pytest.raises(ValueError, match="preferred_element_type is not supported"):
        nznnx.CosineLinear(3, 2, preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- registry, checkpoints


@pytest.mark.parametrize("name", some_slow(normzoo.available(), fast={"batch", "ibn", "weight", "cosine", "none"}))
def test_registry_builds_the_nnx_twin_of_every_linen_layer(name):
    linen, ours = normzoo.make(name), nznnx.make(name)
    assert (ours.is_identity, ours.batch_statistics) == (linen.is_identity, linen.batch_statistics)
    norm = ours.norm(8, train=True, rngs=nnx.Rngs(0))
    assert type(norm).__name__ == type(linen.norm(train=True)).__name__
    assert getattr(norm, "use_running_average", False) is False or name == "none"
    if hasattr(norm, "use_running_average"):
        assert ours.norm(8, train=False, rngs=nnx.Rngs(0)).use_running_average is True
    dense = ours.dense(6, 8, rngs=nnx.Rngs(0))
    assert type(dense).__name__ == type(linen.dense(8)).__name__.replace("Dense", "Linear")
    assert type(ours.conv(6, 8, (3, 3), rngs=nnx.Rngs(0))).__name__ == type(linen.conv(8, (3, 3))).__name__.replace("Dense", "Linear")
    y = norm(dense(_data((4, 6))))
    assert y.shape == (4, 8)


def test_registry_overrides_and_errors():
    spec = nznnx.make("group", num_groups=2)
    assert spec.norm(8, train=True, rngs=nnx.Rngs(0)).num_groups == 2
    assert nznnx.make("weight", mean_only_bn=True).norm(4, train=True, rngs=nnx.Rngs(0)).__class__ is nznnx.MeanOnlyBatchNorm
    assert nznnx.make("cosine", use_scale=True).dense(3, 2, rngs=nnx.Rngs(0)).use_scale is True
    with pytest.raises(ValueError, match="unknown normalizer 'bach'; known names: batch"):
        nznnx.make("bach")
    with pytest.raises(TypeError, match=r"make\('batch'\): \['r_max'\] are not fields of BatchNorm"):
        nznnx.make("batch", r_max=2.0)


def test_linen_checkpoints_load_into_nnx_models_and_back():
    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(8, name="fc")(x)
            x = normzoo.BatchRenorm(use_running_average=not train, warmup_steps=0, name="norm")(x)
            return normzoo.LayerNorm(name="out")(x)

    class NnxNet(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(5, 8, rngs=rngs)
            self.norm = nznnx.BatchRenorm(8, warmup_steps=0, rngs=rngs)
            self.out = nznnx.LayerNorm(8, rngs=rngs)

        def __call__(self, x):
            return self.out(self.norm(self.fc(x)))

    x = _data((16, 5))
    linen = LinenNet()
    variables = linen.init(jax.random.key(0), x, train=True)
    y0, upd = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    model = NnxNet(nnx.Rngs(1))
    nznnx.from_linen(model, variables)
    np.testing.assert_allclose(model(x), y0, rtol=1e-6, atol=1e-6)
    back = nznnx.to_linen(model)
    jax.tree.map(np.testing.assert_array_equal, back, {**variables, **upd})
    with pytest.raises(ValueError, match=r"missing \['batch_stats/norm/steps'\], unexpected \[\]"):
        nznnx.from_linen(model, {**variables, "batch_stats": {"norm": {k: v for k, v in variables["batch_stats"]["norm"].items() if k != "steps"}}})
    with pytest.raises(ValueError, match=r"params/out/scale has shape \(3,\) but the module's has \(8,\)"):
        bad = jax.tree.map(lambda a: a, variables)
        bad["params"]["out"]["scale"] = jnp.ones(3)
        nznnx.from_linen(model, bad)
    with pytest.raises(ValueError, match=r"collections \['cache'\] have no nnx counterpart"):
        nznnx.from_linen(model, {**variables, "cache": {}})


# ----------------------------------------------------------------------------- transforms


def test_scan_over_stacked_blocks_equals_the_unrolled_blocks():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 6, rngs=rngs)
            self.bn = nznnx.BatchNorm(6, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
        return Block(rngs)

    blocks = stack(nnx.Rngs(0))
    x = _data((8, 6))
    graphdef, state = nnx.split(blocks)
    unrolled = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(3)]

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def through(block, x):
        return block(x)

    y = through(blocks, x)
    y_ref = x
    for b in unrolled:
        y_ref = b(y_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks.bn.mean[...], jnp.stack([b.bn.mean[...] for b in unrolled]), rtol=1e-6)


@pytest.mark.slow  # they only wrap the computation (as on the linen side, where jit and remat are slow too)
def test_remat_and_jit_give_the_plain_gradients():
    model = nznnx.GroupNorm(6, num_groups=3, scale_init=nn.initializers.normal(1.0), rngs=nnx.Rngs(0))
    x, w = _data((2, 3, 3, 6)), _data((2, 3, 3, 6), seed=1)
    y0, g0 = _loss_and_grads(model, x, w)
    y1, g1 = nnx.jit(nnx.remat(_loss_and_grads))(model, x, w)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)


def test_per_example_vmap_with_axis_name_equals_the_batched_layer():
    x = _data((16, 5), loc=3.0)
    batched = nznnx.BatchNorm(5, momentum=0.5, rngs=nnx.Rngs(0))
    per_example = nznnx.BatchNorm(5, momentum=0.5, axis_name="batch", rngs=nnx.Rngs(0))
    y_ref = batched(x)
    y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(per_example, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 nnx.state(per_example, nnx.BatchStat), nnx.state(batched, nnx.BatchStat))


def test_bridge_wraps_normzoo_layers_both_ways():
    from flax.nnx import bridge

    x = _data((8, 5), loc=2.0)
    # linen -> nnx
    wrapped = bridge.ToNNX(normzoo.BatchNorm(use_running_average=False), rngs=nnx.Rngs(0))
    bridge.lazy_init(wrapped, x)
    reference = nznnx.BatchNorm(5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(wrapped(x, mutable=["batch_stats"]), reference(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(wrapped.mean[...], reference.mean[...], rtol=1e-6)  # same names as ours
    # nnx -> linen
    as_linen = bridge.ToLinen(nznnx.LayerNorm, args=(5,))
    variables = as_linen.init(jax.random.key(0), x)
    np.testing.assert_allclose(as_linen.apply(variables, x), normzoo.LayerNorm().apply(
        {"params": {"scale": jnp.ones(5), "bias": jnp.zeros(5)}}, x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < D, reason="needs 8 (simulated) devices")
def test_one_collective_per_synced_layer_in_the_forward_pass(stats_path):
    from tests.test_multidevice import COLLECTIVE, count_collectives

    mesh = jax.make_mesh((D,), ("batch",))
    x = jax.device_put(_data((32, 6)), NamedSharding(mesh, P("batch")))
    for n in (1, 2):
        model = nnx.Sequential(*[nznnx.BatchRenorm(6, warmup_steps=0, axis_name="batch", rngs=nnx.Rngs(i))
                                 for i in range(n)])
        fwd = nnx.jit(nnx.shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch")))
        hlo = fwd.lower(model, x).compile().as_text()
        assert count_collectives(hlo) == n, COLLECTIVE.findall(hlo)


def test_feature_axes_other_than_the_last():
    x = _data((4, 3, 5, 6))
    # Channels first, as flax.nnx.BatchNorm(axis=1).
    ours, theirs = nznnx.BatchNorm(3, axis=1, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, axis=1, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5)
    # Several feature axes: num_features gives one size per axis (flax.nnx takes an int only).
    ln = nznnx.LayerNorm((5, 6), reduction_axes=(2, 3), feature_axes=(2, 3), rngs=nnx.Rngs(0))
    assert ln.scale[...].shape == (5, 6)
    linen = normzoo.LayerNorm(reduction_axes=(2, 3), feature_axes=(2, 3))
    np.testing.assert_allclose(ln(x), linen.apply(nznnx.to_linen(ln), x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ln(x), ref.layer_norm(np.asarray(x, np.float64), (2, 3), 1e-6), atol=1e-5)


@pytest.mark.skipif(jax.device_count() < D, reason="needs 8 (simulated) devices")
def test_masked_sync_weights_devices_by_their_valid_counts_and_survives_large_means():
    x = _data((32, 6), loc=1e4, scale=1.0)
    # Device d keeps d + 1 of its 4 rows: uneven counts, which a mean of per-device means gets wrong.
    mask = jnp.asarray((np.arange(32) % 4)[:, None] <= (np.arange(32) // 4)[:, None] % 4)
    mask = jnp.broadcast_to(mask, x.shape)
    single = nznnx.BatchNorm(6, momentum=0.0, rngs=nnx.Rngs(0))
    y_ref = single(x, mask=mask)
    synced = nznnx.BatchNorm(6, momentum=0.0, axis_name="batch", rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((D,), ("batch",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))  # noqa: E731
    run = nnx.jit(nnx.shard_map(lambda m, x, k: m(x, mask=k), mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                                out_specs=P("batch")))
    y = run(synced, put(x), put(mask))
    kept = np.asarray(x, np.float64)[np.asarray(mask[:, 0])]
    exact = (np.asarray(x, np.float64) - kept.mean(0)) / np.sqrt(kept.var(0) + 1e-5)
    # float32 resolves 1e4 to ~1e-3, which bounds both; a mean of device means would be off by ~0.1.
    np.testing.assert_allclose(y, exact, atol=3e-3)
    np.testing.assert_allclose(y_ref, exact, atol=3e-3)
    np.testing.assert_allclose(synced.mean[...], kept.mean(0), rtol=1e-7)
    np.testing.assert_allclose(synced.var[...], kept.var(0), rtol=1e-3)


# ----------------------------------------------------------------------------- found in review


@pytest.mark.parametrize("name", PAIRS)
def test_call_signature_is_flax_nnx_call_signature(name):
    theirs = list(inspect.signature(getattr(nnx, name).__call__).parameters.values())
    ours = list(inspect.signature(getattr(nznnx, name).__call__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    assert [p.name for p in ours[len(theirs):]] == (["use_running_average"] if name == "InstanceNorm" else [])
    for ours_cls, theirs_cls in ((nznnx.WeightNormLinear, nnx.Linear), (nznnx.CosineConv, nnx.Conv)):
        assert list(inspect.signature(ours_cls.__call__).parameters) == list(inspect.signature(theirs_cls.__call__).parameters)
    with pytest.raises(ValueError, match="out_sharding=.* is not supported; leave it None"):
        nznnx.WeightNormLinear(3, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 3)), out_sharding=P())


@pytest.mark.parametrize("name", some_slow(list(PAIRS), fast={"LayerNorm"}))
def test_axis_name_layers_are_built_outside_a_mapped_context_as_in_flax_nnx(name):
    kw, shape = PAIRS[name]
    ours = getattr(nznnx, name)(shape[-1], **kw, axis_name="i", rngs=nnx.Rngs(0))
    assert _state_layout(ours) == _state_layout(getattr(nnx, name)(shape[-1], **kw, axis_name="i", rngs=nnx.Rngs(0)))
    y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="i")(ours, _data((2,) + shape))
    assert y.shape == (2,) + shape


@pytest.mark.slow  # the placeholder's rank rule; four layers built and compared
def test_axes_counted_from_the_end_are_not_taken_for_the_batch_axis():
    x = _data((8, 6, 3))
    np.testing.assert_allclose(nznnx.InstanceNorm(6, feature_axes=-2, rngs=nnx.Rngs(0))(x),
                               nnx.InstanceNorm(6, feature_axes=-2, use_fast_variance=False, rngs=nnx.Rngs(0))(x),
                               rtol=1e-5, atol=1e-5)
    ibn = nznnx.IBN(6, axis=-2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ibn(x), normzoo.IBN(axis=-2, use_running_average=False).apply(
        nznnx.to_linen(ibn), x, mutable=["batch_stats"])[0], rtol=1e-6, atol=1e-6)
    ghost = nznnx.BatchNorm(6, axis=-2, virtual_batch_size=4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ghost(x)[:4], nznnx.BatchNorm(6, axis=-2, rngs=nnx.Rngs(0))(x[:4]), rtol=1e-5, atol=1e-5)
    ln = nznnx.LayerNorm((6, 3), feature_axes=(1, -1), reduction_axes=(1, -1), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ln(x), ref.layer_norm(np.asarray(x, np.float64), (1, 2), 1e-6), atol=1e-5)


def test_output_dtype_promotes_as_flax_nnx():
    x = _data((8, 3)).astype(jnp.bfloat16)
    for name, kw in (("BatchNorm", {}), ("LayerNorm", {}), ("GroupNorm", {"num_groups": 3})):
        ours = getattr(nznnx, name)(3, param_dtype=jnp.bfloat16, **kw, rngs=nnx.Rngs(0))
        theirs = getattr(nnx, name)(3, param_dtype=jnp.bfloat16, **kw, rngs=nnx.Rngs(0))
        assert ours(x).dtype == theirs(x).dtype, name  # BatchNorm: float32, with its float32 statistics
    assert nznnx.BatchNorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16


def test_ibn_follows_its_batch_norm_part_under_views_and_set_attributes():
    class Net(nnx.Module):
        def __init__(self):
            self.ibn = nznnx.IBN(6, rngs=nnx.Rngs(0))

    net, x = Net(), _data((4, 3, 3, 6), loc=2.0)
    before = net.ibn.BN.mean[...]
    nnx.view(net, only=nznnx.BatchNorm, use_running_average=True).ibn(x)
    np.testing.assert_array_equal(net.ibn.BN.mean[...], before)
    net.eval()
    assert net.ibn.use_running_average is True and net.ibn.BN.use_running_average is True
    net.ibn(x)
    np.testing.assert_array_equal(net.ibn.BN.mean[...], before)
    net.train()
    net.ibn(x)
    assert not np.allclose(net.ibn.BN.mean[...], before)


def test_from_linen_checks_everything_before_writing_and_unboxes_partitioned_variables():
    model = nnx.Sequential(nznnx.BatchNorm(4, rngs=nnx.Rngs(0)), nznnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    good = jax.tree.map(lambda a: a + 5, nznnx.to_linen(model))
    bad = jax.tree.map(lambda a: a, good)
    bad["params"]["layers"]["1"]["scale"] = jnp.ones(3)
    with pytest.raises(ValueError, match="layers/1/scale has shape"):
        nznnx.from_linen(model, bad)
    np.testing.assert_array_equal(model.layers[0].mean[...], np.zeros(4))  # nothing was written
    boxed = jax.tree.map(lambda a: nn.Partitioned(a, names=(None,) * a.ndim), good)
    nznnx.from_linen(model, boxed)
    np.testing.assert_array_equal(model.layers[0].mean[...], np.full(4, 5.0))


# ----------------------------------------------------------------------------- every layer, as flax.nnx's are


EVERY = {
    "BatchNorm": (lambda **kw: nznnx.BatchNorm(4, **kw), (8, 4)),
    "BatchRenorm": (lambda **kw: nznnx.BatchRenorm(4, **kw), (8, 4)),
    "MeanOnlyBatchNorm": (lambda **kw: nznnx.MeanOnlyBatchNorm(4, use_scale=True, **kw), (8, 4)),
    "LpBatchNorm": (lambda **kw: nznnx.LpBatchNorm(4, p=1, **kw), (8, 4)),
    "NoisyBatchNorm": (lambda **kw: nznnx.NoisyBatchNorm(4, **kw), (8, 4)),
    "LayerNorm": (lambda **kw: nznnx.LayerNorm(4, **kw), (8, 4)),
    "RMSNorm": (lambda **kw: nznnx.RMSNorm(4, use_bias=True, **kw), (8, 4)),
    "GroupNorm": (lambda **kw: nznnx.GroupNorm(4, num_groups=2, **kw), (2, 3, 4)),
    "InstanceNorm": (lambda **kw: nznnx.InstanceNorm(4, track_running_stats=True, **kw), (2, 3, 4)),
    "IBN": (lambda **kw: nznnx.IBN(4, **kw), (2, 3, 4)),
}
WEIGHT = {
    "WeightNormLinear": (lambda **kw: nznnx.WeightNormLinear(4, 3, **kw), (8, 4)),
    "CosineLinear": (lambda **kw: nznnx.CosineLinear(4, 3, use_scale=True, use_bias=True, **kw), (8, 4)),
    "WeightNormConv": (lambda **kw: nznnx.WeightNormConv(4, 3, (3,), **kw), (2, 5, 4)),
    "CosineConv": (lambda **kw: nznnx.CosineConv(4, 3, (3,), **kw), (2, 5, 4)),
}


@pytest.mark.parametrize("name", list(EVERY) + list(WEIGHT))
def test_graph_depends_on_configuration_not_on_initial_values(name):
    """flax.nnx keeps no initializer as an attribute: two layers built with different initializers
    have equal graphdefs, so nnx.jit traces once for both."""
    build, shape = {**EVERY, **WEIGHT}[name]
    inits = ("kernel_init", "bias_init", "scale_init") if name in WEIGHT else ("bias_init", "scale_init")
    a = build(rngs=nnx.Rngs(0), **{k: nn.initializers.zeros for k in inits})
    b = build(rngs=nnx.Rngs(1), **{k: nn.initializers.normal(1.0) for k in inits})
    assert nnx.graphdef(a) == nnx.graphdef(b)
    traces = []

    @nnx.jit
    def call(m, x):
        traces.append(1)
        return m(x)

    x = _data(shape)
    call(a, x), call(b, x)
    assert len(traces) == 1
    # Abstract construction (flax#4734) gives the same structure without computing anything.
    abstract = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
    assert jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(abstract)) == jax.tree.map(
        lambda v: (v.shape, v.dtype), nnx.state(a))


@pytest.mark.parametrize("name", some_slow(list(EVERY) + list(WEIGHT), fast={"BatchRenorm", "IBN", "GroupNorm", "CosineConv"}))
def test_tabulate_shows_one_row_per_layer_with_every_option(name):
    build, shape = {**EVERY, **WEIGHT}[name]

    class Net(nnx.Module):
        def __init__(self):
            self.layer = build(rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.layer(x)

    table = nnx.tabulate(Net(), _data(shape), compute_flops=True, compute_vjp_flops=True,
                         console_kwargs={"force_terminal": False, "no_color": True, "width": 400})
    rows = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert "layer" in rows and not any(r.startswith("layer/") for r in rows), rows  # no inner method rows


def test_view_info_lists_every_view_argument_and_views_reach_every_layer():
    class Net(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([build(rngs=nnx.Rngs(0)) for build, _ in EVERY.values()])

    info = nnx.view_info(Net())
    for cls in ("BatchNorm", "BatchRenorm", "MeanOnlyBatchNorm", "LpBatchNorm", "NoisyBatchNorm", "InstanceNorm"):
        assert f"{cls}:\n  use_running_average: bool | None = None\n    if True, the stored running statistics" in info
    viewed = nnx.view(Net(), use_running_average=True)
    assert all(getattr(m, "use_running_average", True) is True for m in viewed.layers)


def test_a_custom_promote_dtype_decides_the_dtypes_and_statistics_stay_float32():
    """flax.nnx's meaning: promote_dtype((x, mean, var, scale, bias), dtype=...) -> the arrays the
    layer computes with; normzoo still reduces in float32 (flax.nnx too, for its statistics)."""
    seen = []

    def to_half(arrays, dtype=None):
        seen.append(len(arrays))
        return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in arrays)

    x = _data((4096, 3), loc=300.0, scale=1.0)  # a float16 sum of this overflows; its mean needs float32
    bn = nznnx.BatchNorm(3, momentum=0.0, promote_dtype=to_half, rngs=nnx.Rngs(0))
    y = bn(x)
    assert y.dtype == jnp.float16 and seen == [5]
    assert bn.mean[...].dtype == jnp.float32  # the variables keep their dtype
    x16 = np.asarray(np.asarray(x, np.float16), np.float64)
    np.testing.assert_allclose(bn.mean[...], x16.mean(0), rtol=1e-6)
    np.testing.assert_allclose(bn.var[...], x16.var(0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y, np.float64), (x16 - x16.mean(0)) / np.sqrt(x16.var(0) + 1e-5), atol=2e-2)
    ln = nznnx.LayerNorm(3, promote_dtype=to_half, rngs=nnx.Rngs(0))
    assert ln(x).dtype == jnp.float16 and seen[-1] == 3
    flax_ln = nnx.LayerNorm(3, promote_dtype=to_half, use_fast_variance=False, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(ln(x[:8] - 300), np.float32), np.asarray(flax_ln(x[:8] - 300), np.float32),
                               atol=2e-3)


LINEN_TWINS = {
    nznnx.BatchNorm: normzoo.BatchNorm, nznnx.BatchRenorm: normzoo.BatchRenorm,
    nznnx.MeanOnlyBatchNorm: normzoo.MeanOnlyBatchNorm, nznnx.LpBatchNorm: normzoo.LpBatchNorm,
    nznnx.NoisyBatchNorm: normzoo.NoisyBatchNorm, nznnx.LayerNorm: normzoo.LayerNorm, nznnx.RMSNorm: normzoo.RMSNorm,
    nznnx.GroupNorm: normzoo.GroupNorm, nznnx.InstanceNorm: normzoo.InstanceNorm, nznnx.IBN: normzoo.IBN,
    nznnx.WeightNormLinear: normzoo.WeightNormDense, nznnx.CosineLinear: normzoo.CosineDense,
    nznnx.WeightNormConv: normzoo.WeightNormConv, nznnx.CosineConv: normzoo.CosineConv,
    nznnx.IterNorm: normzoo.IterNorm,
}
FLAX_NNX = {nznnx.BatchNorm: nnx.BatchNorm, nznnx.LayerNorm: nnx.LayerNorm, nznnx.RMSNorm: nnx.RMSNorm,
            nznnx.GroupNorm: nnx.GroupNorm, nznnx.InstanceNorm: nnx.InstanceNorm, nznnx.WeightNormLinear: nnx.Linear,
            nznnx.CosineLinear: nnx.Linear, nznnx.WeightNormConv: nnx.Conv, nznnx.CosineConv: nnx.Conv}


@pytest.mark.parametrize("ours", list(LINEN_TWINS), ids=lambda c: c.__name__)
def test_every_normzoo_option_has_the_linen_default(ours):
    """Arguments flax.nnx's layer lacks (normzoo's options, and those of layers flax.nnx has no
    counterpart of) default to the linen layer's field defaults."""
    import dataclasses

    theirs = FLAX_NNX.get(ours, nnx.BatchNorm)  # layers flax lacks extend BatchNorm's constructor
    flax_args = set(inspect.signature(theirs.__init__).parameters)
    linen = {f.name: f.default for f in dataclasses.fields(LINEN_TWINS[ours]) if f.default is not dataclasses.MISSING}
    checked = 0
    for p in inspect.signature(ours.__init__).parameters.values():
        if p.name in flax_args or p.default is inspect.Parameter.empty or p.name.endswith("_metadata"):
            continue
        assert p.name in linen, (ours.__name__, p.name)
        if p.name == "use_running_average":  # flax's own convention: nnx.BatchNorm False, linen None
            assert (p.default, linen[p.name]) == (inspect.signature(nnx.BatchNorm.__init__).parameters[p.name].default,
                                                  [f.default for f in dataclasses.fields(nn.BatchNorm) if f.name == p.name][0])
        elif p.name.endswith("_init"):
            assert _same_init(p.default, linen[p.name]), (ours.__name__, p.name)
        else:
            assert p.default == linen[p.name], (ours.__name__, p.name, p.default, linen[p.name])
        checked += 1
    assert checked or ours in (nznnx.LayerNorm, nznnx.GroupNorm)
