"""WeightNorm and CosineNorm Dense/Conv against NumPy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests import reference as ref


def numeric_grad(f, x, h=1e-6):
    """Central finite differences of a float64 NumPy function (the independent reference)."""
    x = ref.f64(x)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = h
        g[i] = (f(x + d) - f(x - d)) / (2 * h)
    return g


@pytest.fixture
def x_dense():
    return np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32) * 2 + 1


@pytest.fixture
def x_conv():
    return np.random.default_rng(1).normal(size=(2, 5, 5, 3)).astype(np.float32)


def test_weight_norm_dense_matches_reference(x_dense):
    layer = normzoo.WeightNormDense(4)
    v = layer.init(jax.random.key(0), x_dense)
    p = jax.tree.map(lambda a: a + jnp.linspace(0.1, 0.9, a.size).reshape(a.shape), v["params"])
    y = layer.apply({"params": p}, x_dense)
    np.testing.assert_allclose(y, ref.weight_norm_dense(x_dense, p["v"], p["g"], p["bias"]), atol=1e-5)


def test_weight_norm_conv_matches_reference(x_conv):
    layer = normzoo.WeightNormConv(4, (3, 3), use_bias=False)
    p = layer.init(jax.random.key(0), x_conv)["params"]
    p = {"v": p["v"], "g": jnp.array([0.5, 1.0, 2.0, 3.0])}
    y = layer.apply({"params": p}, x_conv)
    v = ref.f64(p["v"])
    kernel = ref.f64(p["g"]) * v / np.sqrt((v**2).sum((0, 1, 2)))
    np.testing.assert_allclose(y, ref.conv_same(x_conv, kernel), atol=1e-5)


def test_weight_norm_gradients_match_paper_formula(x_dense):
    """Salimans & Kingma eq. (3): grad_g = grad_w . v/|v|, grad_v = g/|v| (I - w w^T/|w|^2) grad_w."""
    layer = normzoo.WeightNormDense(3, use_bias=False)
    p = layer.init(jax.random.key(1), x_dense)["params"]
    p = {"v": p["v"], "g": jnp.array([0.5, 2.0, -1.0])}
    w_out = np.random.default_rng(2).normal(size=(6, 3))
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x_dense) * w_out))(p)
    v, g = ref.f64(p["v"]), ref.f64(p["g"])
    norm = np.linalg.norm(v, axis=0)
    grad_w = ref.f64(x_dense).T @ w_out
    grad_g = (grad_w * v / norm).sum(0)
    grad_v = g / norm * (grad_w - v / norm * grad_g)
    np.testing.assert_allclose(grads["g"], grad_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["v"], grad_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,shape,kw", [
    (normzoo.WeightNormDense, (512, 7), {}),
    (normzoo.WeightNormConv, (16, 6, 6, 3), {"kernel_size": (3, 3)}),
])
def test_data_dependent_init_gives_unit_preactivations(cls, shape, kw):
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32) * 3 + 2
    y, v = cls(5, data_init=True, init_scale=1.0, **kw).init_with_output(jax.random.key(0), x)
    axes = tuple(range(y.ndim - 1))
    np.testing.assert_allclose(np.asarray(y).mean(axes), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y).std(axes), 1.0, atol=1e-4)
    # Without data_init, g starts at one and the bias at zero.
    v0 = cls(5, **kw).init(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(v0["g"], np.ones(5))
    assert not np.allclose(v["params"]["g"], 1.0)


def test_data_dependent_init_through_a_model():
    """Flax's init runs layer by layer, so the second layer sees the first's outputs."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(normzoo.WeightNormDense(16, data_init=True)(x))
            return normzoo.WeightNormDense(4, data_init=True)(h)

    x = np.random.default_rng(4).normal(size=(256, 6)).astype(np.float32) * 5
    y, _ = Model().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(np.asarray(y).std(0), 1.0, atol=1e-4)


def test_cosine_dense_matches_reference_and_gradient(x_dense):
    layer = normzoo.CosineDense(3)
    p = layer.init(jax.random.key(0), x_dense)["params"]
    assert set(p) == {"kernel"}
    y = layer.apply({"params": p}, x_dense)
    np.testing.assert_allclose(y, ref.cosine_dense(x_dense, p["kernel"]), atol=1e-6)
    w = np.random.default_rng(5).normal(size=y.shape)
    gx = jax.grad(lambda x: jnp.sum(layer.apply({"params": p}, x) * w))(x_dense)
    want = numeric_grad(lambda x: (ref.cosine_dense(x, p["kernel"]) * w).sum(), x_dense)
    np.testing.assert_allclose(gx, want, atol=1e-4)
    gk = jax.grad(lambda k: jnp.sum(layer.apply({"params": {"kernel": k}}, x_dense) * w))(p["kernel"])
    want_k = numeric_grad(lambda k: (ref.cosine_dense(x_dense, k) * w).sum(), p["kernel"])
    np.testing.assert_allclose(gk, want_k, atol=1e-4)


def test_cosine_conv_matches_patch_reference_and_gradient(x_conv):
    layer = normzoo.CosineConv(4, (3, 3))
    p = layer.init(jax.random.key(0), x_conv)["params"]
    y = layer.apply({"params": p}, x_conv)
    np.testing.assert_allclose(y, ref.cosine_conv_same(x_conv, p["kernel"]), atol=1e-5)
    assert np.abs(np.asarray(y)).max() <= 1.0 + 1e-6
    w = np.random.default_rng(6).normal(size=y.shape)
    x_small = x_conv[:1, :4, :4]
    gx = jax.grad(lambda x: jnp.sum(layer.apply({"params": p}, x) * w[:1, :4, :4]))(x_small)
    want = numeric_grad(lambda x: (ref.cosine_conv_same(x, p["kernel"]) * w[:1, :4, :4]).sum(), x_small)
    np.testing.assert_allclose(gx, want, atol=2e-4)


def test_cosine_conv_strided_valid_padding(x_conv):
    layer = normzoo.CosineConv(2, (3, 3), strides=2, padding="VALID")
    p = layer.init(jax.random.key(0), x_conv)["params"]
    y = layer.apply({"params": p}, x_conv)
    # VALID 3x3 stride 2 on 5x5: patches centred at (1, 1), (1, 3), (3, 1), (3, 3) of the SAME grid.
    want = ref.cosine_conv_same(x_conv, p["kernel"])[:, 1::2, 1::2][:, :2, :2]
    np.testing.assert_allclose(y, want, atol=1e-5)


def test_cosine_scale_and_bias_options(x_dense):
    layer = normzoo.CosineDense(3, use_scale=True, use_bias=True)
    p = layer.init(jax.random.key(0), x_dense)["params"]
    assert p["scale"].shape == () and p["bias"].shape == (3,)
    p = {**p, "scale": jnp.array(10.0), "bias": jnp.array([1.0, 2.0, 3.0])}
    y = layer.apply({"params": p}, x_dense)
    np.testing.assert_allclose(y, 10 * ref.cosine_dense(x_dense, p["kernel"]) + [1, 2, 3], atol=1e-4)


def test_cosine_zero_input_is_finite():
    layer = normzoo.CosineConv(2, (3, 3))
    x = np.zeros((1, 4, 4, 2), np.float32)
    y, v = layer.init_with_output(jax.random.key(0), x)
    assert np.all(np.asarray(y) == 0.0)
    g = jax.grad(lambda x: jnp.sum(layer.apply(v, x)))(x)
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- flax's Dense/Conv fields


def _init_fields(cls):
    import dataclasses

    return [f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


@pytest.mark.parametrize("ours,theirs", [
    (normzoo.WeightNormDense, nn.Dense), (normzoo.CosineDense, nn.Dense),
    (normzoo.WeightNormConv, nn.Conv), (normzoo.CosineConv, nn.Conv),
])
def test_every_flax_field_in_flax_order(ours, theirs):
    """Read from the installed flax: a field flax adds shows up here."""
    mine, flax_fields = _init_fields(ours), _init_fields(theirs)
    assert [f.name for f in mine[: len(flax_fields)]] == [f.name for f in flax_fields]
    differ = {f.name for f, g in zip(mine, flax_fields) if f.default is not g.default}
    assert differ == ({"use_bias"} if ours in (normzoo.CosineDense, normzoo.CosineConv) else set())
    assert all(f.kw_only for f in mine[len(flax_fields):])


def _as_flax_kernel(layer, x, seed=0):
    """WeightNorm variables whose kernel g * v / ||v|| is exactly v (g = ||v||), and the same
    kernel and bias as flax variables."""
    p = layer.init(jax.random.key(seed), x)["params"]
    v = np.asarray(p["v"], np.float64)
    if layer.mask is not None if hasattr(layer, "mask") else False:
        v = v * np.asarray(layer.mask)
    g = np.sqrt((v**2).sum(tuple(range(v.ndim - 1))))
    ours = {"v": p["v"], "g": jnp.asarray(g, jnp.float32)}
    theirs = {"kernel": p["v"]}
    if "bias" in p:
        b = jnp.linspace(-1.0, 1.0, p["bias"].size)
        ours["bias"], theirs["bias"] = b, b
    return {"params": ours}, {"params": theirs}


CONV_CASES = {  # everything spec.conv(...) accepts for the "batch" model must work for weight and cosine
    "same": dict(kernel_size=(3, 3)),
    "strided_valid": dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    "int_padding": dict(kernel_size=(3, 3), padding=1),
    "pairs": dict(kernel_size=(2, 3), padding=((0, 1), (2, 0))),
    "circular": dict(kernel_size=(3, 3), padding="CIRCULAR"),
    "reflect": dict(kernel_size=(3, 2), padding="REFLECT", kernel_dilation=2),
    "dilations": dict(kernel_size=(3, 3), padding=1, input_dilation=2, kernel_dilation=(1, 2)),  # lax: no SAME here
    "groups": dict(kernel_size=(3, 3), feature_group_count=2),
    "mask": dict(kernel_size=(3, 3), mask="lower"),
    "precision": dict(kernel_size=(3, 3), precision=jax.lax.Precision.HIGHEST),
    "injected": dict(kernel_size=(3, 3), conv_general_dilated=jax.lax.conv_general_dilated),
    "bfloat16": dict(kernel_size=(3, 3), dtype=jnp.bfloat16),
    "causal_1d": dict(kernel_size=(3,), padding="CAUSAL"),
    "batch_axes": dict(kernel_size=(3,)),
}


def _conv_case(name):
    kw = dict(CONV_CASES[name])
    shape = {"causal_1d": (2, 7, 4), "batch_axes": (2, 3, 7, 4)}.get(name, (2, 6, 7, 4))
    if kw.get("mask") == "lower":
        ks = kw["kernel_size"]
        m = np.tril(np.ones(ks))[..., None, None] * np.ones((1, 1, 4, 6))
        kw["mask"] = jnp.asarray(m, jnp.float32)
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    return kw, x


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_weight_norm_conv_is_flax_conv_with_the_normalized_kernel(case):
    kw, x = _conv_case(case)
    ours, theirs = normzoo.WeightNormConv(6, **kw), nn.Conv(6, **kw)
    v_ours, v_theirs = _as_flax_kernel(ours, x)
    y1, y2 = ours.apply(v_ours, x), theirs.apply(v_theirs, x)
    assert y1.shape == y2.shape and y1.dtype == y2.dtype
    tol = 5e-2 if kw.get("dtype") == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_cosine_conv_is_the_cosine_of_flax_convolutions(case):
    """Reference from flax's own convolution: conv(x, w) / ||w|| / sqrt(conv(x^2, support))."""
    kw, x = _conv_case(case)
    ours = normzoo.CosineConv(6, **kw)
    w = ours.init(jax.random.key(0), x)["params"]["kernel"]
    y = ours.apply({"params": {"kernel": w}}, x)
    f32 = {k: v for k, v in kw.items() if k != "dtype"}
    wm = w if kw.get("mask") is None else w * kw["mask"]
    dot = nn.Conv(6, use_bias=False, **f32).apply({"params": {"kernel": wm}}, x)
    support = jnp.ones_like(w) if kw.get("mask") is None else (kw["mask"] != 0).astype(jnp.float32)
    sq = nn.Conv(6, use_bias=False, **{**f32, "mask": None}).apply({"params": {"kernel": support}}, x * x)
    want = np.asarray(dot, np.float64) / np.sqrt(np.asarray(sq, np.float64) + 1e-12) / np.sqrt(
        (np.asarray(wm, np.float64) ** 2).sum(tuple(range(w.ndim - 1))))
    tol = 3e-2 if kw.get("dtype") == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=tol)


@pytest.mark.parametrize("cls", [normzoo.WeightNormDense, normzoo.CosineDense])
def test_dense_fields_reach_the_product(cls):
    """dot_general / dot_general_cls / precision / promote_dtype are used as flax.linen.Dense uses them."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 2, 5)), jnp.float32)
    calls = []

    def dot(*args, **kwargs):
        calls.append(kwargs.get("precision"))
        return jax.lax.dot_general(*args, **kwargs)

    layer = cls(4, dot_general=dot, precision=jax.lax.Precision.HIGHEST)
    v = layer.init(jax.random.key(0), x)
    plain = cls(4).apply(v, x)
    np.testing.assert_allclose(layer.apply(v, x), plain, rtol=1e-6, atol=1e-6)
    assert calls and all(c == jax.lax.Precision.HIGHEST for c in calls)
    wrapped = cls(4, dot_general_cls=lambda: dot)
    np.testing.assert_allclose(wrapped.apply(v, x), plain, rtol=1e-6, atol=1e-6)
    if cls is normzoo.WeightNormDense:
        ours, theirs = _as_flax_kernel(layer, x)
        np.testing.assert_allclose(layer.apply(ours, x), nn.Dense(4).apply(theirs, x), rtol=1e-5, atol=1e-5)


def test_registry_conv_with_every_argument_for_weight_and_cosine():
    """The issue's promise: spec.conv(...) with any argument that works for batch works for the others."""
    x = jnp.ones((2, 6, 6, 4))
    kw = dict(strides=2, padding="CIRCULAR", kernel_dilation=2, feature_group_count=2, precision="highest")
    shapes = {name: normzoo.make(name).conv(6, (3, 3), **kw).init_with_output(jax.random.key(0), x)[0].shape
              for name in ("batch", "weight", "cosine")}
    assert len(set(shapes.values())) == 1
