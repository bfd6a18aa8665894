"""SpectralNorm and WeightNorm (linen and nnx) side by side with flax's own wrappers, against
NumPy, and the behaviours flax's tests check (tests/linen/linen_test.py, tests/nnx/nn/
normalization_test.py), restated. Where normzoo differs (the stored parameters are never
overwritten: flax#5576; nnx scales are parameters: flax#5577) the test asserts the improvement."""

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
from normzoo import functional as F
from normzoo import nnx as nznnx
from tests.conftest import some_slow

RNG = np.random.default_rng(0)


def _fields(cls):
    def default(f):
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
    return [(f.name, default(f)) for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def _close(a, b, tol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                                         rtol=tol, atol=tol), a, b)


# ----------------------------------------------------------------------------- numpy references


def _l2n(a, eps=1e-12):
    return a / np.sqrt((a * a).sum() + eps)


def spectral_reference(kernel, u, n_steps, eps=1e-12):
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    u = np.asarray(u, np.float64)
    for _ in range(n_steps):
        v = _l2n(u @ w.T, eps)
        u = _l2n(v @ w, eps)
    sigma = (v @ w @ u.T)[0, 0]
    return (w / sigma).reshape(kernel.shape), u, sigma


def test_spectral_norm_function_is_the_power_iteration():
    kernel, u = RNG.normal(size=(3, 3, 4, 6)).astype(np.float32), RNG.normal(size=(1, 6)).astype(np.float32)
    for n in (1, 5):
        out = F.spectral_norm(jnp.asarray(kernel), jnp.asarray(u), n_steps=n)
        want = spectral_reference(kernel, u, n)
        np.testing.assert_allclose(out.kernel, want[0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(out.u, want[1], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(out.sigma, want[2], rtol=2e-5)
    exact = F.spectral_norm(jnp.asarray(kernel), jnp.asarray(u), exact=True)
    np.testing.assert_allclose(exact.sigma, np.linalg.norm(kernel.reshape(-1, 6).astype(np.float64), 2), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(exact.kernel).reshape(-1, 6), 2), 1.0, rtol=1e-5)
    # no gradient through u and v: d sigma / d W = v u^T, the first singular pair's outer product
    g = jax.grad(lambda w: F.spectral_norm(w, jnp.asarray(u), n_steps=50).sigma)(jnp.asarray(kernel))
    w64 = kernel.reshape(-1, 6).astype(np.float64)
    left, _, right = np.linalg.svd(w64)
    outer = np.outer(left[:, 0], right[0])
    np.testing.assert_allclose(np.abs(np.asarray(g).reshape(-1, 6)), np.abs(outer), atol=1e-4)


def test_spectral_norm_function_errors():
    with pytest.raises(ValueError, match=r"spectral_norm: u has shape \(1, 4\); for a kernel with 6 outputs \(its last "
                                         r"axis\) it must be \(1, 6\)"):
        F.spectral_norm(jnp.ones((3, 6)), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"spectral_norm: n_steps=0 must be an int >= 1"):
        F.spectral_norm(jnp.ones((3, 6)), jnp.ones((1, 6)), n_steps=0)
    with pytest.raises(ValueError, match=r"Input is 3D but error_on_non_matrix is True"):
        F.spectral_norm(jnp.ones((2, 3, 6)), jnp.ones((1, 6)), error_on_non_matrix=True)
    with pytest.raises(ValueError, match=r"weight_norm: `g` has shape \(3,\), but `v` of shape \(2, 3\) has \(2,\) "
                                         r"along feature_axes=0; give g the shape \(2,\)"):
        F.weight_norm(jnp.ones((2, 3)), jnp.ones(3), feature_axes=0)


# ----------------------------------------------------------------------------- linen: fields and variables


@pytest.mark.parametrize("ours,theirs", [(normzoo.SpectralNorm, nn.SpectralNorm), (normzoo.WeightNorm, nn.WeightNorm)])
def test_fields_are_flax_fields_in_flax_order(ours, theirs):
    mine, flax_fields = _fields(ours), _fields(theirs)
    assert mine[: len(flax_fields)] == flax_fields
    extra = [f for f in dataclasses.fields(ours) if f.init and f.name not in dict(flax_fields) | {"parent": 0, "name": 0}]
    assert all(f.kw_only for f in extra)
    describe = lambda ps: [(p.name, p.kind, p.default) for p in ps]  # noqa: E731
    assert describe(inspect.signature(ours.__call__).parameters.values()) == \
        describe(inspect.signature(theirs.__call__).parameters.values())


class _Attention(nn.Module):
    """Spectral or weight norm around attention: 2-D and 3-D kernels, 1-D and 2-D biases."""

    wrap: type
    kw: dict = dataclasses.field(default_factory=dict)

    @nn.compact
    def __call__(self, a, b, train):
        layer = nn.MultiHeadDotProductAttention(4)
        extra = {"update_stats": train} if "Spectral" in self.wrap.__name__ else {}
        return self.wrap(layer, **self.kw)(nn.Dense(4)(a), nn.Dense(4)(b), **extra)


def _models(wrap, **kw):
    spectral = "Spectral" in wrap.__name__

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(8)(x)
            x = wrap(nn.Dense(6), **kw)(x, **({"update_stats": train} if spectral else {}))
            return nn.Dense(4)(x)

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = jnp.reshape(nn.Dense(9)(x), (x.shape[0], 3, 3, 1))
            x = wrap(nn.Conv(2, (2, 2)), **kw)(x, **({"update_stats": train} if spectral else {}))
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    return {"dense": Dense(), "conv": Conv()}


def _run(model, variables, x, train):
    if isinstance(model, _Attention):
        return model.apply(variables, x, x[:, ::-1], train=train, mutable=["batch_stats"])
    return model.apply(variables, x, train=train, mutable=["batch_stats"])


def _init(model, x):
    if isinstance(model, _Attention):
        return model.init(jax.random.key(1), x, x[:, ::-1], train=False)
    return model.init(jax.random.key(1), x, train=False)


CASES = [("dense", 1), ("conv", 3), ("attention", 1)]


def _pair(name, wrap_ours, wrap_theirs, **kw):
    if name == "attention":
        return _Attention(wrap_ours, kw), _Attention(wrap_theirs, kw)
    return _models(wrap_ours, **kw)[name], _models(wrap_theirs, **kw)[name]


# The dense case with stats updated by default (attention and convolutions, and inference, in -m slow).
@pytest.mark.parametrize("name,n_steps,train", some_slow([(n, s, t) for n, s in CASES for t in (True, False)],
                                                         fast={("dense", 1, True)}))
def test_spectral_norm_side_by_side_with_flax(name, n_steps, train):
    """Same variable names (u and sigma per weight of two or more axes), and on flax's variables
    the same outputs, updated u and sigma, and gradients."""
    ours, theirs = _pair(name, normzoo.SpectralNorm, nn.SpectralNorm, n_steps=n_steps)
    x = jnp.asarray(RNG.normal(size=(3, 5, 4) if name == "attention" else (3, 4)), jnp.float32)
    v_theirs = _init(theirs, x)
    v_ours = _init(ours, x)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_theirs)
    if name == "attention":
        keys = sorted(v_theirs["batch_stats"]["SpectralNorm_0"])
        assert len(keys) == 14 and not any(k.startswith("MultiHeadDotProductAttention_0/out/bias") for k in keys)
    y_ours, s_ours = _run(ours, v_theirs, x, train)
    y_theirs, s_theirs = _run(theirs, v_theirs, x, train)
    _close(y_ours, y_theirs, 1e-5)
    _close(s_ours, s_theirs, 1e-5)
    loss = lambda m: lambda p: jnp.sum(_run(m, {**v_theirs, "params": p}, x, train)[0] ** 2)  # noqa: E731
    _close(jax.grad(loss(ours))(v_theirs["params"]), jax.grad(loss(theirs))(v_theirs["params"]), 1e-4)


@pytest.mark.parametrize("n_steps,update_stats,want", some_slow([(1, True, 4.0), (3, True, 4.0), (10, True, 4.0),
                                                                   (1, False, 1.0)], fast={(3, True, 4.0), (1, False, 1.0)}))
def test_spectral_norm_sigma_of_four_times_identity(n_steps, update_stats, want):
    layer = normzoo.SpectralNorm(nn.Dense(8, use_bias=False), n_steps=n_steps)
    x = jnp.ones((1, 8))
    v = layer.init(jax.random.key(0), x, update_stats=False)
    v = {**v, "params": jax.tree.map(lambda p: 4 * jnp.eye(8), v["params"])}
    _, updated = layer.apply(v, x, update_stats=update_stats, mutable=True)
    np.testing.assert_allclose(updated["batch_stats"]["layer_instance/kernel/sigma"], want, atol=1e-3)


@pytest.mark.parametrize("error", [True, False])
def test_spectral_norm_three_axis_kernels(error):
    layer = normzoo.SpectralNorm(nn.DenseGeneral((3, 4), use_bias=False), error_on_non_matrix=error)
    if error:
        with pytest.raises(ValueError, match=r"SpectralNorm: Input is 3D but error_on_non_matrix is True \(the "
                                             r"parameter layer_instance/kernel of shape \(2, 3, 4\)\)"):
            layer.init(jax.random.key(0), jnp.ones((1, 2)), update_stats=True)
    else:
        v = layer.init(jax.random.key(0), jnp.ones((1, 2)), update_stats=True)
        assert v["batch_stats"]["layer_instance/kernel/u"].shape == (1, 4)


def test_spectral_norm_stores_w_not_w_over_sigma_and_never_overwrites_it():
    """flax stores W / sigma at init and writes it back on apply(mutable=True) (flax#5576);
    normzoo keeps W: the same draw, sigma(W) times flax's stored kernel."""
    x = jnp.ones((2, 4))
    ours, theirs = normzoo.SpectralNorm(nn.Dense(3), n_steps=20), nn.SpectralNorm(nn.Dense(3), n_steps=20)
    v_ours = ours.init(jax.random.key(0), x, update_stats=True)
    v_theirs = theirs.init(jax.random.key(0), x, update_stats=True)
    w_ours, w_theirs = v_ours["params"]["layer_instance"]["kernel"], v_theirs["params"]["layer_instance"]["kernel"]
    sigma = np.linalg.norm(np.asarray(w_ours, np.float64), 2)
    assert sigma > 1.05
    np.testing.assert_allclose(w_ours / sigma, w_theirs, rtol=1e-4, atol=1e-6)
    _, after = ours.apply(v_ours, x, update_stats=True, mutable=True)
    np.testing.assert_array_equal(after["params"]["layer_instance"]["kernel"], w_ours)
    _, after_theirs = theirs.apply({**v_theirs, "params": v_ours["params"]}, x, update_stats=True, mutable=True)
    assert not np.allclose(after_theirs["params"]["layer_instance"]["kernel"], w_ours)


def test_spectral_norm_trains():
    optax = pytest.importorskip("optax")
    model = _models(normzoo.SpectralNorm)["conv"]
    x = jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32)
    target = jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32)
    v = model.init(jax.random.key(0), x, train=False)
    tx = optax.adam(1e-2)
    state = tx.init(v["params"])

    @jax.jit
    def step(v, state):
        def loss(p):
            y, updates = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((y - target) ** 2), updates
        (value, updates), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, state = tx.update(g, state)
        return {**v, **updates, "params": optax.apply_updates(v["params"], u)}, state, value

    losses = []
    for _ in range(10):
        v, state, value = step(v, state)
        losses.append(float(value))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ----------------------------------------------------------------------------- linen WeightNorm


def _weight_reference(params, feature_axes, filters, eps=0.0):
    out = {}
    for name, p in params["layer_instance"].items():
        path = f"layer_instance/{name}"
        if filters and not any(f in path for f in filters):
            out[name] = np.asarray(p, np.float64)
            continue
        p = np.asarray(p, np.float64)
        axes = () if feature_axes is None else tuple(a % p.ndim for a in np.atleast_1d(feature_axes))
        red = tuple(a for a in range(p.ndim) if a not in axes)
        scale = np.asarray(params[f"{path}/scale"], np.float64)
        view = [1] * p.ndim
        for a, n in zip(axes, scale.shape):
            view[a] = n
        out[name] = scale.reshape(view) * p / np.sqrt((p * p).sum(red, keepdims=True) + eps)
    return out


WEIGHT_NORM_CASES = [(-1, ("kernel",)), (0, ("kernel",)), ((0, 1), ("kernel",)), ((), ("kernel",)), (None, ("kernel",)),
                     (0, ("bias",)), ((), ("bias",))]


@pytest.mark.parametrize("feature_axes,filters", some_slow(WEIGHT_NORM_CASES, fast=[((0, 1), ("kernel",)),
                                                                                   ((), ("bias",))]))
def test_weight_norm_against_numpy(feature_axes, filters):
    layer = normzoo.WeightNorm(nn.Dense(2, bias_init=nn.initializers.normal()), feature_axes=feature_axes,
                               variable_filter=filters)
    x = jnp.asarray(RNG.normal(size=(1, 3)), jnp.float32)
    v = layer.init(jax.random.key(0), x)
    v = jax.tree.map(lambda p: p + 0.5, v)  # scales too
    w = _weight_reference(v["params"], feature_axes, filters)
    np.testing.assert_allclose(layer.apply(v, x), np.asarray(x, np.float64) @ w["kernel"] + w["bias"], rtol=1e-5,
                               atol=1e-6)
    flax_layer = nn.WeightNorm(nn.Dense(2, bias_init=nn.initializers.normal()), feature_axes=feature_axes,
                               variable_filter=filters)
    np.testing.assert_allclose(layer.apply(v, x), flax_layer.apply(v, x), rtol=1e-5, atol=1e-6)


def test_weight_norm_variable_filter_selects_as_flax():
    class Baz(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    class Bar(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(Baz()(nn.Dense(3)(Baz()(x))))

    x = jnp.ones((1, 4))
    # A filter matches substrings of '{layer name}/{path}': the wrapped layer's own name included.
    for filters in ({}, None, {"kernel", "bias"}, {"layer_instance"}, {"kernel"}, {"Baz", "kernel"}):
        ours = normzoo.WeightNorm(Bar(), variable_filter=filters).init(jax.random.key(0), x)
        theirs = nn.WeightNorm(Bar(), variable_filter=filters).init(jax.random.key(0), x)
        scales = sorted(k for k in ours["params"] if k.endswith("/scale"))
        assert scales == sorted(k for k in theirs["params"] if k.endswith("/scale")), filters
        assert len(scales) == (8 if filters in ({}, None, {"kernel", "bias"}, {"layer_instance"}) else
                               4 if filters == {"kernel"} else 6)


@pytest.mark.parametrize("name", some_slow(["dense", "conv", "attention"], fast={"conv"}))
def test_weight_norm_side_by_side_with_flax(name):
    ours, theirs = _pair(name, normzoo.WeightNorm, nn.WeightNorm)
    x = jnp.asarray(RNG.normal(size=(3, 5, 4) if name == "attention" else (3, 4)), jnp.float32)
    v = _init(theirs, x)
    assert jax.tree.map(jnp.shape, _init(ours, x)) == jax.tree.map(jnp.shape, v)
    v = jax.tree.map(lambda p: p * 1.7 + 0.1, v)  # a kernel that is not of unit norm
    _close(_run(ours, v, x, False)[0], _run(theirs, v, x, False)[0], 1e-5)
    loss = lambda m: lambda p: jnp.sum(_run(m, {**v, "params": p}, x, False)[0] ** 2)  # noqa: E731
    _close(jax.grad(loss(ours))(v["params"]), jax.grad(loss(theirs))(v["params"]), 1e-4)


def test_weight_norm_keeps_v_and_partitioned_kernels_name_as_flax():
    x = jnp.ones((2, 4))
    v = normzoo.WeightNorm(nn.Dense(3)).init(jax.random.key(0), x)
    raw = nn.Dense(3).init(jax.random.key(0), x)  # the wrapped layer draws the same kernel
    theirs = nn.WeightNorm(nn.Dense(3)).init(jax.random.key(0), x)
    k = v["params"]["layer_instance"]["kernel"]
    assert not np.allclose(np.linalg.norm(k, axis=0), 1.0)  # v itself, not v / ||v||
    np.testing.assert_allclose(theirs["params"]["layer_instance"]["kernel"], k / np.linalg.norm(k, axis=0), rtol=1e-5)
    del raw
    part = nn.Dense(3, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "x")))
    ours = jax.jit(lambda: normzoo.WeightNorm(part).init(jax.random.key(0), x))()
    flax_part = jax.jit(lambda: nn.WeightNorm(part).init(jax.random.key(0), x))()
    assert sorted(ours["params"]) == sorted(flax_part["params"]) == ["layer_instance", "layer_instance/kernel/value/scale"]


# ----------------------------------------------------------------------------- nnx


@pytest.mark.parametrize("ours,theirs,extra", [(nznnx.SpectralNorm, nnx.SpectralNorm, ["exact"]),
                                               (nznnx.WeightNorm, nnx.WeightNorm, [])])
def test_nnx_constructor_is_flax_then_normzoo_keywords(ours, theirs, extra):
    mine = list(inspect.signature(ours.__init__).parameters.values())
    flax_params = list(inspect.signature(theirs.__init__).parameters.values())
    describe = lambda ps: [(p.name, p.kind, repr(p.default)) for p in ps]  # noqa: E731
    assert describe(mine[: len(flax_params)]) == describe(flax_params)
    assert [p.name for p in mine[len(flax_params):]] == extra


def _sequential(rngs, update_stats):
    return nnx.Sequential(nnx.Linear(5, 4, rngs=rngs), nnx.relu,
                          nnx.BatchNorm(4, use_running_average=not update_stats, rngs=rngs))


@pytest.mark.parametrize("update_stats", some_slow([True, False], fast={True}))
def test_nnx_spectral_norm_equals_flax_nnx_first_call_and_never_overwrites(update_stats):
    x = jnp.asarray(RNG.normal(size=(10, 5)), jnp.float32)
    ours = nznnx.SpectralNorm(_sequential(nnx.Rngs(0), update_stats), n_steps=3, update_stats=update_stats,
                              rngs=nnx.Rngs(1))
    theirs = nnx.SpectralNorm(_sequential(nnx.Rngs(0), update_stats), n_steps=3, update_stats=update_stats,
                              rngs=nnx.Rngs(1))
    assert jax.tree.map(np.shape, nnx.state(ours)) == jax.tree.map(np.shape, nnx.state(theirs))
    _close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))  # drawn alike
    kernel = ours.layer_instance.layers[0].kernel[...]
    _close(ours(x), theirs(x), 1e-5)
    _close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat), 1e-5)
    np.testing.assert_array_equal(ours.layer_instance.layers[0].kernel[...], kernel)
    assert not np.allclose(theirs.layer_instance.layers[0].kernel[...], kernel)  # flax#5576
    ours.eval()
    u = np.asarray(ours.batch_stats[("layers", 0, "kernel", "u")][...])
    ours(x)
    np.testing.assert_array_equal(ours.batch_stats[("layers", 0, "kernel", "u")][...], u)


def test_nnx_spectral_norm_equals_linen():
    x = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
    layer = nznnx.SpectralNorm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), n_steps=2, rngs=nnx.Rngs(1))
    linen = normzoo.SpectralNorm(nn.Dense(3), n_steps=2)
    v = linen.init(jax.random.key(0), x, update_stats=False)
    layer.layer_instance.kernel[...] = v["params"]["layer_instance"]["kernel"]
    layer.layer_instance.bias[...] = v["params"]["layer_instance"]["bias"]
    layer.batch_stats[("kernel", "u")][...] = v["batch_stats"]["layer_instance/kernel/u"]
    want, updated = linen.apply(v, x, update_stats=True, mutable=["batch_stats"])
    _close(layer(x), want, 1e-6)
    _close(layer.batch_stats[("kernel", "sigma")][...], updated["batch_stats"]["layer_instance/kernel/sigma"], 1e-6)


def test_nnx_spectral_norm_errors():
    with pytest.raises(ValueError, match=r"SpectralNorm: Layer instance parameter is 4D but error_on_non_matrix is True "
                                         r"\(kernel, shape \(3, 3, 2, 4\)\)"):
        nznnx.SpectralNorm(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)), error_on_non_matrix=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scale_init", [nnx.initializers.ones, nnx.initializers.constant(0.5)])
def test_nnx_weight_norm_equals_flax_nnx_and_learns_its_scales(scale_init):
    x = jnp.asarray(RNG.normal(size=(10, 8)), jnp.float32)
    ours = nznnx.WeightNorm(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), scale_init=scale_init, rngs=nnx.Rngs(1))
    theirs = nnx.WeightNorm(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), scale_init=scale_init, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(ours.scales[("kernel",)][...], theirs.scales[("kernel",)])
    kernel = ours.layer_instance.kernel[...]
    _close(ours(x), theirs(x), 1e-6)
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)  # flax.nnx overwrites it (flax#5576)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ours)
    g = np.asarray(grads.scales[("kernel",)][...])  # flax.nnx's raw-array scales get none (flax#5577)
    direction = np.asarray(kernel, np.float64) / np.linalg.norm(np.asarray(kernel, np.float64), axis=0)
    y = np.asarray(ours(x), np.float64)
    np.testing.assert_allclose(g, (2 * y * (np.asarray(x, np.float64) @ direction)).sum(0), rtol=1e-4)


@pytest.mark.filterwarnings("ignore:shape requires ndarray or scalar arguments:DeprecationWarning")  # flax's summary
def test_tabulate_shows_what_flax_shows():
    def model(weight_norm, spectral_norm):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = weight_norm(nn.Dense(3))(x)
                return spectral_norm(nn.Dense(4))(x, update_stats=False)
        return Model()

    table = lambda m: nn.tabulate(m, jax.random.key(0), console_kwargs={"width": 200})(jnp.ones((2, 5)))  # noqa: E731
    ours = table(model(normzoo.WeightNorm, normzoo.SpectralNorm))
    assert ours == table(model(nn.WeightNorm, nn.SpectralNorm))
    assert "Dense_0/kernel/scale" in ours and "Dense_1/kernel/sigma" in ours and "_run" not in ours


@pytest.mark.slow  # dtypes follow flax's promotion (a compile per dtype pair)
@pytest.mark.parametrize("dtype,param_dtype", [(jnp.float16, jnp.float16), (jnp.float32, jnp.bfloat16)])
def test_half_precision_dtypes_as_flax(dtype, param_dtype):
    x = jnp.asarray(RNG.normal(size=(4, 5)), dtype)
    for ours, theirs, kw in [(normzoo.SpectralNorm, nn.SpectralNorm, {"update_stats": True}),
                             (normzoo.WeightNorm, nn.WeightNorm, {})]:
        make = lambda cls: cls(nn.Dense(3, dtype=dtype, param_dtype=param_dtype), param_dtype=param_dtype)  # noqa: E731
        v = make(theirs).init(jax.random.key(0), x, **kw)
        y_ours = make(ours).apply(v, x, mutable=["batch_stats"], **kw)[0]
        y_theirs = make(theirs).apply(v, x, mutable=["batch_stats"], **kw)[0]
        assert y_ours.dtype == y_theirs.dtype, ours.__name__
        np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- convolution-aware


def _circular_conv_norm(kernel, size):
    """The exact operator norm of a stride-1 circular convolution on ``size`` inputs (Sedghi et
    al. 2019): the largest singular value over the frequencies of the kernel's 2-D DFT."""
    kh, kw, cin, cout = kernel.shape
    padded = np.zeros(size + (cin, cout))
    padded[:kh, :kw] = np.asarray(kernel, np.float64)
    spectrum = np.fft.fft2(padded, axes=(0, 1))
    return max(np.linalg.svd(spectrum[i, j], compute_uv=False)[0] for i in range(size[0]) for j in range(size[1]))


@pytest.mark.slow  # 300 power iterations, eagerly (the layer test below checks sigma against the DFT too)
def test_conv_spectral_norm_is_the_convolutions_operator_norm():
    kernel = RNG.normal(size=(3, 3, 2, 4)).astype(np.float32)
    want = _circular_conv_norm(kernel, (6, 6))
    out = F.conv_spectral_norm(jnp.asarray(kernel), jnp.asarray(RNG.normal(size=(1, 6, 6, 2)), jnp.float32),
                               n_steps=300, padding="CIRCULAR")
    np.testing.assert_allclose(out.sigma, want, rtol=1e-3)
    np.testing.assert_allclose(_circular_conv_norm(np.asarray(out.kernel), (6, 6)), 1.0, rtol=1e-3)
    matrix = np.linalg.norm(kernel.reshape(-1, 4).astype(np.float64), 2)
    assert abs(want - matrix) > 0.05 * want  # the reshaped kernel's norm is another number
    with pytest.raises(ValueError, match=r"conv_spectral_norm: u has shape \(1, 6, 6, 3\); for a kernel of shape "
                                         r"\(3, 3, 2, 4\) it must be one input example, \(1, \*spatial, 2\)"):
        F.conv_spectral_norm(jnp.asarray(kernel), jnp.ones((1, 6, 6, 3)))


def test_spectral_norm_conv_aware_layer():
    layer = normzoo.SpectralNorm(nn.Conv(4, (3, 3), padding="CIRCULAR", use_bias=False), n_steps=5, conv_aware=True)
    x = jnp.asarray(RNG.normal(size=(2, 6, 6, 2)), jnp.float32)
    v = layer.init(jax.random.key(0), x, update_stats=True)
    assert v["batch_stats"]["layer_instance/kernel/u"].shape == (1, 6, 6, 2)
    for _ in range(40):
        y, updates = layer.apply(v, x, update_stats=True, mutable=["batch_stats"])
        v = {**v, **updates}
    kernel = np.asarray(v["params"]["layer_instance"]["kernel"])
    np.testing.assert_allclose(v["batch_stats"]["layer_instance/kernel/sigma"], _circular_conv_norm(kernel, (6, 6)),
                               rtol=1e-3)
    sigma = float(v["batch_stats"]["layer_instance/kernel/sigma"])
    np.testing.assert_allclose(y, nn.Conv(4, (3, 3), padding="CIRCULAR", use_bias=False).apply(
        {"params": {"kernel": kernel / sigma}}, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"SpectralNorm: conv_aware keeps u of the input's shape, \(1, 6, 6, 2\), but "
                                         r"this input gives \(1, 8, 8, 2\)"):
        layer.apply(v, jnp.ones((2, 8, 8, 2)), update_stats=False)
    with pytest.raises(ValueError, match=r"SpectralNorm: conv_aware=True normalizes a convolution by its operator "
                                         r"norm, but layer_instance is a Dense"):
        normzoo.SpectralNorm(nn.Dense(3), conv_aware=True).init(jax.random.key(0), jnp.ones((1, 2)), update_stats=True)


def test_weight_norm_data_dependent_init_linen_and_nnx():
    x = jnp.asarray(RNG.normal(size=(64, 5)) * 3 + 2, jnp.float32)
    layer = normzoo.WeightNorm(nn.Dense(4), data_init=True, init_scale=2.0)
    y, v = layer.init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 2.0, rtol=1e-4)
    np.testing.assert_allclose(layer.apply(v, x), y, rtol=1e-5, atol=1e-5)
    plain = normzoo.WeightNorm(nn.Dense(4)).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["params"]["layer_instance"]["kernel"], plain["params"]["layer_instance"]["kernel"])
    with pytest.raises(ValueError, match=r"WeightNorm: data_init needs one normalized weight whose scale has one entry "
                                         r"per output feature \(the last axis, 4\); got scales "):
        normzoo.WeightNorm(nn.Dense(4), data_init=True, variable_filter={"kernel", "bias"}).init(jax.random.key(0), x)
    module = nznnx.WeightNorm(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    y = module.data_init(x, init_scale=2.0)
    np.testing.assert_allclose(y.std(0), 2.0, rtol=1e-4)
    np.testing.assert_allclose(module(x), y, rtol=1e-5, atol=1e-5)
