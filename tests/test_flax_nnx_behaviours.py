"""Every behaviour flax's own tests check on its normalization layers, checked on normzoo's.

Each test re-states (in our own code, not flax's) one behaviour that a test in google/flax's
repository (``tests/`` at v0.12.8) checks on ``nnx.BatchNorm`` / ``LayerNorm`` / ``RMSNorm`` /
``GroupNorm`` / ``InstanceNorm`` or on their ``flax.linen`` counterparts: numerical equivalence
with flax.linen, graphdef / split / merge / clone / pickle, ``train``/``eval``/``view``/``view_info``,
``tabulate``, transforms (vmap, scan, remat, split_rngs, StateAxes), training loops and the
linen <-> nnx bridge. The IDs (A01, B03, ...) name the behaviours; the flax test each comes from is
in its docstring. The layers under test are the tables ``NNX`` and ``LINEN`` below (normzoo's); the
reference side of the equivalence tests, ``REF_LINEN``, is flax's own linen layers.

Where normzoo deliberately differs the test asserts the improvement instead (README, "Where we
differ from flax"): statistics with the stable variance agree with flax's to float rounding, not
bit for bit (``LINEN_MATCH_RTOL``); a feature that a mask empties is normalized by the neutral
statistics, finite, where flax's BatchNorm and InstanceNorm give NaN; large-mean inputs are
compared with float64, not with float32 arithmetic that loses the digits.
"""

import copy
import pickle
import sys

import itertools
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx
from flax.nnx import bridge

import normzoo
from normzoo import nnx as nznnx

NNX = {name: getattr(nznnx, name) for name in ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")}
LINEN = {name: getattr(normzoo, name) for name in NNX}
# Reference side of nnx-vs-linen equivalence (flax's own linen layers).
REF_LINEN = {
    "BatchNorm": linen.BatchNorm,
    "LayerNorm": linen.LayerNorm,
    "RMSNorm": linen.RMSNorm,
    "GroupNorm": linen.GroupNorm,
    "InstanceNorm": linen.InstanceNorm,
}
# flax's own tests assert bit-exact equality of its nnx and linen layers, which share one formula.
# normzoo's variance is the stable one, so its statistics agree with flax's to the float rounding of
# the output dtype: these tolerances (half precision: a few units in the last place).
LINEN_MATCH_RTOL = {np.dtype(np.float16): 4e-3, np.dtype(np.float32): 2e-5}

NAMES = list(NNX)


def names(*fast):
    """NAMES as parameters; those not in ``fast`` in the slow run (tests/test_nnx.py checks these
    behaviours on every normzoo layer by default)."""
    return [pytest.param(n, marks=() if n in fast else pytest.mark.slow) for n in NAMES]
# parameters each layer owns (BatchNorm additionally owns BatchStat mean/var)
PARAM_NAMES = {n: ("scale", "bias") for n in NAMES} | {"RMSNorm": ("scale",)}

BN = lambda: NNX["BatchNorm"]  # noqa: E731  (late lookup so the table can be patched)
LBN = lambda: LINEN["BatchNorm"]  # noqa: E731

IDENTITY_PROMOTE = lambda x, **kwargs: x  # noqa: E731  flax's "behave like linen" promote_dtype


def nnx_layer(name, n=6, **kw):
    """nnx layer with ``n`` features; GroupNorm gets a dividing num_groups."""
    if name == "GroupNorm":
        kw.setdefault("num_groups", 3 if n % 3 == 0 else 1)
    kw.setdefault("rngs", nnx.Rngs(0))
    return NNX[name](n, **kw)


def linen_layer(name, table=LINEN, **kw):
    if name == "GroupNorm":
        kw.setdefault("num_groups", 3)
    if name == "BatchNorm":
        kw.setdefault("use_running_average", False)
    return table[name](**kw)


def assert_match(theirs, ours):
    """Ours equals flax's to rounding; where flax's is NaN (a feature that a mask empties, which
    flax's BatchNorm and InstanceNorm divide by zero) ours is finite: the neutral statistics."""
    tol = LINEN_MATCH_RTOL.get(np.asarray(theirs).dtype, 2e-5)
    theirs, ours = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    nan = np.isnan(theirs)
    assert np.isfinite(ours[nan]).all(), "flax's NaN must be a finite value here"
    np.testing.assert_allclose(ours[~nan], theirs[~nan], rtol=tol, atol=tol)


def block_cls(norm_name="BatchNorm", with_dropout=True, dmid=3, bn_kwargs=None):
    """Linear -> norm -> Dropout block, the shape used throughout flax's transforms tests."""
    bn_kwargs = bn_kwargs or {}

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs, din=2, dout=dmid):
            self.linear = nnx.Linear(din, dout, rngs=rngs)
            self.bn = nnx_layer(norm_name, dout, rngs=rngs, **bn_kwargs)
            if with_dropout:
                self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

        def __call__(self, x):
            x = self.bn(self.linear(x))
            if with_dropout:
                x = self.dropout(x)
            return nnx.relu(x)

    return Block


# ============================================================================================
# A. nnx <-> linen numerical equivalence (tests/nnx/nn/normalization_test.py)
# ============================================================================================
MASK5 = np.array([True, False, True, False, True])
MASK6 = np.array([True, False, True, False, True, False])
# The default run keeps three corners of flax's 16-case grid per layer (float32 plain, float32
# masked, float16 with float32 parameters); the slow run all of it.
EQUIV_GRID = [
    pytest.param(*p, marks=() if p in {(jnp.float32, jnp.float32, True, False), (jnp.float32, jnp.float32, False, True),
                                       (jnp.float16, jnp.float32, True, True)} else pytest.mark.slow)
    for p in itertools.product([jnp.float32, jnp.float16], [jnp.float32, jnp.float16], [True, False], [False, True])
]


def _equiv_ids(p):
    return "{}-{}-fast{}-mask{}".format(jnp.dtype(p[0]).name, jnp.dtype(p[1]).name, p[2], p[3])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dtype,param_dtype,use_fast_variance,use_mask", EQUIV_GRID, ids=[_equiv_ids(p.values) for p in EQUIV_GRID]
)
def test_A01_A05_nnx_linen_equivalence(name, dtype, param_dtype, use_fast_variance, use_mask):
    """A01-A05: nnx layer (+Linear) == flax linen layer (+Dense) under the same variables."""
    # The (features,)-shaped mask removes whole feature columns; flax's BatchNorm/InstanceNorm give
    # NaN for those features (and NaN BatchNorm running statistics), normzoo the neutral statistics
    # (assert_match checks that ours is finite there). InstanceNorm on 2-D input reduces over no
    # axis: both outputs are exactly 0 before the bias.
    nf = 5 if name in ("BatchNorm", "LayerNorm", "RMSNorm") else 6
    mask = (MASK5 if nf == 5 else MASK6) if use_mask else None
    # flax passes an identity promote_dtype for all but InstanceNorm (default there).
    extra = {} if name == "InstanceNorm" else {"promote_dtype": IDENTITY_PROMOTE}
    if name == "BatchNorm":
        extra["use_running_average"] = False

    class NNXModel(nnx.Module):
        def __init__(self, rngs):
            self.norm_layer = nnx_layer(
                name, nf, dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance, rngs=rngs, **extra
            )
            self.linear = nnx.Linear(nf, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def __call__(self, x, *, mask=None):
            return self.linear(self.norm_layer(x, mask=mask))

    class LinenModel(linen.Module):
        def setup(self):
            # normzoo accepts use_fast_variance and always computes the stable variance: the like-
            # for-like reference is flax's stable mode.
            self.norm_layer = linen_layer(name, REF_LINEN, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False)
            self.linear = linen.Dense(4, dtype=dtype, param_dtype=param_dtype)

        def __call__(self, x, *, mask=None):
            return self.linear(self.norm_layer(x, mask=mask))

    x = jax.random.normal(jax.random.key(0), (10, nf))
    lm = LinenModel()
    variables = lm.init(jax.random.key(1), x)
    linen_out, updates = lm.apply(variables, x, mask=mask, mutable=["batch_stats"])
    variables = {**variables, **updates}

    m = NNXModel(nnx.Rngs(42))
    m.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    m.linear.bias[...] = variables["params"]["linear"]["bias"]
    nnx_out = m(x, mask=mask)
    assert isinstance(linen_out, jax.Array)
    assert_match(linen_out, nnx_out)
    # default scale/bias init match linen's (ones/zeros in param_dtype)
    for p in PARAM_NAMES[name]:
        assert_match(variables["params"]["norm_layer"][p], getattr(m.norm_layer, p)[...])
    if name == "BatchNorm":  # running statistics after one training step
        assert_match(variables["batch_stats"]["norm_layer"]["mean"], m.norm_layer.mean[...])
        assert_match(variables["batch_stats"]["norm_layer"]["var"], m.norm_layer.var[...])


# flax runs the full dtype x param_dtype product; the mixed pairs are dropped here for speed.
SPECTRAL_GRID = [pytest.param(d, d, n, u, marks=() if (d, n, u) == (jnp.float32, 10, True) else pytest.mark.slow)
                 for d in (jnp.float32, jnp.float16) for n in (1, 10) for u in (True, False)]


@pytest.mark.parametrize("dtype,param_dtype,n_steps,update_stats", SPECTRAL_GRID)
def test_A06_batchnorm_inside_spectralnorm(dtype, param_dtype, n_steps, update_stats):
    """A06: nnx BatchNorm inside nnx.SpectralNorm(Sequential(...)) matches linen's."""

    class NNXModel(nnx.Module):
        def __init__(self, rngs):
            self.seq = nnx.Sequential(
                nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                nnx.relu,
                BN()(4, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_running_average=not update_stats),
            )
            self.norm_layer = nnx.SpectralNorm(
                self.seq, n_steps=n_steps, dtype=dtype, param_dtype=param_dtype, update_stats=update_stats, rngs=rngs
            )

        def __call__(self, x):
            return self.norm_layer(x)

    class LinenModel(linen.Module):
        def setup(self):
            self.seq = linen.Sequential(
                [
                    linen.Dense(4, dtype=dtype, param_dtype=param_dtype),
                    linen.relu,
                    REF_LINEN["BatchNorm"](dtype=dtype, param_dtype=param_dtype, use_running_average=not update_stats),
                ]
            )
            self.norm_layer = linen.SpectralNorm(self.seq, n_steps=n_steps)

        def __call__(self, x):
            return self.norm_layer(x, update_stats=update_stats)

    x = jax.random.normal(jax.random.key(0), (10, 5))
    lm = LinenModel()
    variables = lm.init(jax.random.key(1), x)
    m = NNXModel(nnx.Rngs(42))
    p0 = variables["params"]["seq"]["layers_0"]
    p2 = variables["params"]["seq"]["layers_2"]
    m.seq.layers[0].kernel.set_value(p0["kernel"])
    m.seq.layers[0].bias.set_value(p0["bias"])
    m.seq.layers[2].scale.set_value(p2["scale"])
    m.seq.layers[2].bias.set_value(p2["bias"])
    bs = variables["batch_stats"]["norm_layer"]
    m.norm_layer.batch_stats[("layers", 0, "kernel", "u")].set_value(bs["seq/layers_0/kernel/u"])
    m.norm_layer.batch_stats[("layers", 0, "kernel", "sigma")].set_value(bs["seq/layers_0/kernel/sigma"])
    linen_out, upd = lm.apply(variables, x, mutable=["batch_stats"])
    nnx_out = m(x)
    assert_match(linen_out, nnx_out)
    for k in ("u", "sigma"):
        assert_match(
            m.norm_layer.batch_stats[("layers", 0, "kernel", k)],
            upd["batch_stats"]["norm_layer"][f"seq/layers_0/kernel/{k}"],
        )


# ============================================================================================
# B. linen layer numerics (tests/linen/linen_test.py::NormalizationTest, checkpoints_test.py)
# ============================================================================================
def _normal(shape, seed=0, dtype=np.float32):
    """Test data drawn with numpy (the references below are numpy too: no XLA compiles)."""
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        x = (x + 1j * r.standard_normal(shape)) / np.sqrt(2)
    return x.astype(dtype)


def _resolution(x, axes):
    """How exactly a float32 output can normalize ``x`` over ``axes``: its mean is only known to
    float32's spacing at ``max |x|``, relative to the smallest spread (at least 1e-5)."""
    std = np.asarray(x, np.float64).std(axes)
    spread = std[std > 0].min() if (std > 0).any() else 1.0
    return max(float(np.spacing(np.float32(np.abs(x).max()))) / spread, 1e-5)


def _nan_masked(shape, guarantee, seed=0):
    x = _normal(shape, seed)
    m = np.random.default_rng(seed + 1).integers(0, 2, shape).astype(bool)
    m[..., :guarantee] = True  # guarantee enough unmasked elements
    return np.where(m, x, np.nan).astype(np.float32), m


def test_B01_layer_norm_mask():
    x, m = _nan_masked((3, 4, 5), 2)
    y, _ = LINEN["LayerNorm"]().init_with_output(jax.random.key(0), x, mask=m)
    y = np.asarray(y)
    np.testing.assert_allclose(y.mean(-1, where=m), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(-1, where=m), 1, atol=1e-4)


def test_B02_rms_norm_mask():
    x, m = _nan_masked((3, 4, 5), 1)
    y, _ = LINEN["RMSNorm"]().init_with_output(jax.random.key(0), x, mask=m)
    np.testing.assert_allclose(np.square(np.asarray(y)).mean(-1, where=m), 1, atol=1e-4)


def test_B03_group_norm_mask():
    x, m = _nan_masked((13, 3, 5, 7 * 11), 2)
    y, _ = LINEN["GroupNorm"](7, use_bias=False, use_scale=False).init_with_output(
        jax.random.key(0), x, mask=m
    )  # positional: num_groups
    yr, mr = np.asarray(y).reshape((13, 3, 5, 7, 11)), m.reshape((13, 3, 5, 7, 11))
    axes = (1, 2, 4)
    np.testing.assert_allclose(yr.mean(axes, where=mr), 0, atol=1e-4)
    np.testing.assert_allclose(yr.var(axes, where=mr), 1, atol=1e-4)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("test_mask", [False, True])
def test_B04_B05_batch_norm_stats_and_ema(test_mask, complex_):
    dtype = np.complex64 if complex_ else np.float32
    x = _normal((4, 3, 2), dtype=dtype)
    m = None
    if test_mask:
        m = np.random.default_rng(1).integers(0, 2, (4, 3, 1)).astype(bool)
        m[0] = True
        x = np.where(m, x, np.nan).astype(dtype)
    kw = {"dtype": jnp.complex64} if complex_ else {}
    model = LINEN["BatchNorm"](momentum=0.9, use_running_average=False, **kw)
    y, v0 = model.init_with_output(jax.random.key(3), x, mask=m)
    if complex_:
        assert y.dtype == jnp.complex64
    y = np.asarray(y)
    mb = True if m is None else np.broadcast_to(m, x.shape)
    mean, var = y.mean((0, 1), where=mb), y.var((0, 1), where=mb)
    np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(var, [1.0, 1.0], rtol=1e-4)
    _, out = model.apply(v0, x, mutable=["batch_stats"], mask=m)
    ema = out["batch_stats"]  # init must not have touched the running stats
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=mb), atol=1e-4)
    # complex: var is real, E|x - mu|^2 (numpy's var of complex is exactly that)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=mb), rtol=1e-4)


@pytest.mark.parametrize("reduction_axes,fast", [(-1, True), (1, True), ((1, 2), True), ((0, 1, 2), True), (-1, False)])
def test_B06_layer_norm_formula(reduction_axes, fast):
    e = 1e-5
    x = _normal((2, 3, 4))
    if not fast:
        x += 1e6  # breaks E[x^2]-E[x]^2, must still work with use_fast_variance=False
    model = LINEN["LayerNorm"](
        use_bias=False, use_scale=False, epsilon=e, reduction_axes=reduction_axes, use_fast_variance=fast
    )
    y, _ = model.init_with_output(jax.random.key(1), x)
    assert x.dtype == y.dtype and x.shape == y.shape
    # flax compares with jnp float32 two-pass arithmetic (its own); normzoo with float64 on the same
    # float32 inputs, to the resolution float32 has at the input's magnitude.
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(reduction_axes, keepdims=True)) / np.sqrt(x64.var(reduction_axes, keepdims=True) + e)
    np.testing.assert_allclose(y, ref, atol=_resolution(x, reduction_axes))


@pytest.mark.parametrize("reduction_axes", [-1, 1, (1, 2)])
def test_B07_rms_norm_formula(reduction_axes):
    e = 1e-5
    x = _normal((2, 3, 4))
    y, _ = LINEN["RMSNorm"](use_scale=False, epsilon=e, reduction_axes=reduction_axes).init_with_output(
        jax.random.key(1), x
    )
    assert x.dtype == y.dtype and x.shape == y.shape
    ref = x / np.sqrt(np.mean(np.square(x), reduction_axes, keepdims=True) + e)
    np.testing.assert_allclose(ref, y, atol=1e-4)


@pytest.mark.parametrize("reduction_axes,axes", [(None, (1, 2, 3, 5)), ((0, 1, 3, 4), (0, 1, 3, 5))])
def test_B08_B09_group_norm_formula(reduction_axes, axes):
    e = 1e-5
    x = _normal((2, 5, 4, 4, 32))
    kw = {} if reduction_axes is None else {"reduction_axes": reduction_axes}
    y, _ = LINEN["GroupNorm"](num_groups=2, use_bias=False, use_scale=False, epsilon=e, **kw).init_with_output(
        jax.random.key(1), x
    )
    assert x.dtype == y.dtype and x.shape == y.shape
    xg = x.reshape(2, 5, 4, 4, 2, 16)
    ref = (xg - xg.mean(axes, keepdims=True)) / np.sqrt(xg.var(axes, keepdims=True) + e)
    np.testing.assert_allclose(ref.reshape(x.shape), y, atol=1e-4)


def test_B10_group_norm_extra_leading_batch_dims():
    e = 1e-5
    x = _normal((3, 4, 32))
    model = LINEN["GroupNorm"](num_groups=2, use_bias=False, use_scale=False, epsilon=e, reduction_axes=(-3, -2, -1))
    y, _ = model.init_with_output(jax.random.key(1), x)
    assert x.dtype == y.dtype and x.shape == y.shape
    xs = np.stack([x] * 5)
    ys = model.apply({}, xs)  # no variables at all when use_bias=use_scale=False
    np.testing.assert_allclose(y, ys[0], atol=1e-4)
    xg = xs.reshape(5, 3, 4, 2, 16)
    ref = (xg - xg.mean((1, 2, 4), keepdims=True)) / np.sqrt(xg.var((1, 2, 4), keepdims=True) + e)
    np.testing.assert_allclose(ref.reshape(ys.shape), ys, atol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"reduction_axes": (0, 1, 2, 3)}], ids=["groups", "axes"])
def test_B11_B12_group_norm_raises(kw):
    x = _normal((2, 5, 4, 4, 32))
    model = LINEN["GroupNorm"](num_groups=3, use_bias=False, use_scale=False, epsilon=1e-5, **kw)
    with pytest.raises(ValueError):
        model.init_with_output(jax.random.key(1), x)


def test_B12b_group_norm_raises_feature_axis_in_reduction_axes():
    """Stricter than flax's B12 (which also has 3∤32): reduction_axes missing the last axis."""
    x = _normal((2, 5, 4, 4, 32))
    model = LINEN["GroupNorm"](num_groups=2, reduction_axes=(0, 1, 2, 3))
    with pytest.raises(ValueError):
        model.init(jax.random.key(1), x)


def test_B13_batch_norm_axis_name_at_init_outside_any_mapped_axis():
    class Foo(linen.Module):
        @linen.compact
        def __call__(self, x):
            norm = LINEN["BatchNorm"](name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    x = _normal((2, 4))
    (y1, y2), _ = Foo().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


@pytest.mark.parametrize("feature_axes,fast", [(-1, True), ((1, 2), True), ((1, 2, 3), True), (-1, False)])
def test_B14_instance_norm_formula(feature_axes, fast):
    e = 1e-5
    x = _normal((2, 3, 4, 5))
    if not fast:
        x += 1e4
    y, _ = LINEN["InstanceNorm"](
        use_bias=False, use_scale=False, epsilon=e, feature_axes=feature_axes, use_fast_variance=fast
    ).init_with_output(jax.random.key(1), x)
    assert x.dtype == y.dtype and x.shape == y.shape
    fa = [i % x.ndim for i in (feature_axes if isinstance(feature_axes, tuple) else (feature_axes,))]
    red = tuple(i for i in range(1, x.ndim) if i not in fa)
    # flax compares with jnp float32 two-pass arithmetic; normzoo with float64 on the same inputs.
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(red, keepdims=True)) / np.sqrt(x64.var(red, keepdims=True) + e)
    np.testing.assert_allclose(y, ref, atol=_resolution(x, red))


@pytest.mark.parametrize("feature_axes", [0, -4, (0, 3), (2, -4)])
def test_B15_instance_norm_rejects_batch_axis(feature_axes):
    x = _normal((2, 3, 4, 5))
    with pytest.raises(
        ValueError,
        match="The channel axes cannot include the leading dimension as this is assumed to be the batch axis.",
    ):
        LINEN["InstanceNorm"](feature_axes=feature_axes).init(jax.random.key(1), x)


_U = dict(bias_init=linen.initializers.uniform(), scale_init=linen.initializers.uniform())
EQUIV_PAIRS = [
    (("LayerNorm", dict(feature_axes=(1, 2))), ("InstanceNorm", dict(feature_axes=(1, 2)))),
    (("LayerNorm", dict(reduction_axes=(1, 2), feature_axes=-1)), ("InstanceNorm", dict(feature_axes=-1))),
    (
        ("LayerNorm", dict(reduction_axes=-2, feature_axes=(1, 3), **_U)),
        ("InstanceNorm", dict(feature_axes=(1, -1), **_U)),
    ),
    (("LayerNorm", dict(reduction_axes=(1, 2, 3), **_U)), ("GroupNorm", dict(num_groups=1, **_U))),
    (("InstanceNorm", dict(**_U)), ("GroupNorm", dict(num_groups=None, group_size=1, **_U))),
]


@pytest.mark.parametrize("pair", EQUIV_PAIRS, ids=[f"{a[0]}-{b[0]}-{i}" for i, (a, b) in enumerate(EQUIV_PAIRS)])
def test_B16_normalization_cross_equivalence(pair):
    (n1, kw1), (n2, kw2) = pair
    l1, l2 = LINEN[n1](**kw1), LINEN[n2](**kw2)
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    v1, v2 = l1.init(jax.random.key(1), x), l2.init(jax.random.key(1), x)
    assert jax.tree.structure(v1) == jax.tree.structure(v2)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), v1, v2))
    np.testing.assert_allclose(l1.apply(v1, x), l2.apply(v2, x), atol=1e-7)


def test_B17_batch_norm_positional_use_running_average():
    """checkpoints_test.py builds ``nn.normalization.BatchNorm(True)``."""
    bn = LINEN["BatchNorm"](True)
    assert bn.use_running_average is True
    x = jnp.arange(12.0).reshape(4, 3)
    v = bn.init(jax.random.key(0), x)
    y = bn.apply(v, x)  # no mutable collection needed in inference mode
    np.testing.assert_allclose(y, x / np.sqrt(1 + bn.epsilon), rtol=1e-6)


# ============================================================================================
# C. linen integration (linen summary_test, linen_transforms_test, linen_module_test)
# ============================================================================================
CONSOLE = dict(force_terminal=False, no_color=True, width=10_000)


def _linen_cnn():
    class ConvBlock(linen.Module):
        features: int

        def setup(self):
            self.conv = linen.Conv(self.features, [3, 3])
            self.bn = LINEN["BatchNorm"]()
            self.dropout = linen.Dropout(0.5)

        def __call__(self, x, training: bool):
            x = self.conv(x)
            x = self.bn(x, use_running_average=not training)
            x = self.dropout(x, deterministic=not training)
            return linen.relu(x)

    class CNN(linen.Module):
        def setup(self):
            self.block1 = ConvBlock(2)
            self.block2 = ConvBlock(4)
            self.dense = linen.Dense(10)

        def __call__(self, x, training: bool):
            x = self.block2(self.block1(x, training=training), training=training)
            return self.dense(x.mean(axis=(1, 2)))

    return CNN


def test_C01_linen_module_summary_rows():
    from flax.linen import summary

    x = jnp.ones((2, 4, 4, 1))
    table = summary._get_module_table(
        _linen_cnn()(), depth=None, show_repeated=True, compute_flops=True, compute_vjp_flops=True
    )({"dropout": jax.random.key(0), "params": jax.random.key(1)}, x, training=True, mutable=True)
    assert len(table) == 10  # CNN + (block, conv, bn, dropout) x2 + dense: norm is ONE row
    assert table[3].path == ("block1", "bn")
    inputs = table[3].inputs
    assert inputs[0].shape == (2, 4, 4, 2)
    assert jax.tree.map(lambda o: getattr(o, "obj", o), inputs[1]) == {"use_running_average": False}
    assert table[3].outputs.shape == (2, 4, 4, 2)
    for r in table:  # each module's flops >= its children's
        kids = [s for s in table if len(s.path) == len(r.path) + 1 and s.path[: len(r.path)] == r.path]
        assert r.flops >= sum(s.flops for s in kids)
        assert r.vjp_flops >= sum(s.vjp_flops for s in kids)


def test_C02_linen_tabulate_module_reuse():
    class ConvBlock(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.Conv(4, [3, 3])(x)
            x = LINEN["BatchNorm"](use_running_average=True)(x)
            x = linen.Dropout(0.5, deterministic=True)(x)
            return linen.relu(x)

    class CNN(linen.Module):
        @linen.compact
        def __call__(self, x):
            block = ConvBlock()
            return block(block(block(x)))

    text = CNN().tabulate(
        jax.random.key(0),
        x=jnp.ones((2, 4, 4, 4)),
        show_repeated=True,
        console_kwargs=CONSOLE,
        compute_flops=True,
        compute_vjp_flops=True,
    )
    lines = text.splitlines()
    for col in (
        "path",
        "module",
        "inputs",
        "outputs",
        "params",
        "flops",
        "vjp_flops",
        "batch_stats",
    ):  # linen summary_test test_tabulate header (C01's model there)
        assert col in lines[3]
    bn_name = "ConvBlock_0/" + LINEN["BatchNorm"].__name__ + "_0"
    assert bn_name in lines[14] and "mean" in lines[14] and "bias" in lines[14]
    for i in (25, 33):  # repeated calls: no variables shown again
        assert bn_name in lines[i] and "mean" not in lines[i] and "bias" not in lines[i]


def test_C03_linen_vmap_batchnorm_axis_name():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.uniform(k1, (4, 4))
    x2 = jax.random.uniform(k2, (5, 4, 4))

    class MlpBn(linen.Module):
        axis_name: tp.Any = None

        @linen.compact
        def __call__(self, x):
            x = linen.Dense(3)(x)
            return LINEN["BatchNorm"](axis_name=self.axis_name, use_running_average=False)(x)

    vmapped = linen.vmap(
        MlpBn,
        in_axes=(0,),
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(axis_name="batch")
    v = MlpBn().init(k3, x)
    y1 = MlpBn().apply(v, x2.reshape((-1, 4)), mutable=["batch_stats"])[0].reshape((5, 4, 3))
    y2 = vmapped.apply(v, x2, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(y1, y2, atol=1e-5)


def test_C04_linen_bind_stateful():
    class Foo(linen.Module):
        def setup(self):
            self.a = linen.Dense(3)
            self.bn = LINEN["BatchNorm"]()
            self.b = linen.Dense(1)

    def f(foo, x):
        return foo.b(foo.bn(foo.a(x), use_running_average=False))

    foo, x = Foo(), jnp.ones((4,))
    y1, variables = linen.init_with_output(f, foo)(jax.random.key(0), x)
    foo_b = foo.bind(variables, mutable="batch_stats")
    y2 = f(foo_b, x)
    y3, new_state = linen.apply(f, foo, mutable="batch_stats")(variables, x)
    assert y1 == y2 and y2 == y3
    for a, b in zip(jax.tree.leaves(new_state["batch_stats"]), jax.tree.leaves(foo_b.variables["batch_stats"])):
        np.testing.assert_allclose(a, b)


# ============================================================================================
# D. nnx graph / state API (linear_test, graph_utils_test, helpers_test, state tests)
# ============================================================================================
SAME_GRAPH_ARGS = {"BatchNorm": (3,), "LayerNorm": (3,), "RMSNorm": (3,), "GroupNorm": (6, 3), "InstanceNorm": (6,)}


@pytest.mark.parametrize("name", names("BatchNorm"))
def test_D01_graphdef_independent_of_initializers(name):
    inits = {"scale_init"} | ({"bias_init"} if name != "RMSNorm" else set())
    m1 = NNX[name](*SAME_GRAPH_ARGS[name], **{k: nnx.initializers.zeros for k in inits}, rngs=nnx.Rngs(0))
    m2 = NNX[name](*SAME_GRAPH_ARGS[name], **{k: nnx.initializers.ones for k in inits}, rngs=nnx.Rngs(0))
    assert nnx.graphdef(m1) == nnx.graphdef(m2)
    hash(nnx.graphdef(m1))


@pytest.mark.parametrize("name", names("BatchNorm"))
def test_D02_jit_no_retrace_across_instances(name):
    """Consequence of D01 (cf. transforms_test test_tree_jit_no_retrace): same trace reused."""
    n = 0

    @nnx.jit
    def f(m, x):
        nonlocal n
        n += 1
        return m(x)

    x = jnp.ones((4, 6))
    kw = {"scale_init": nnx.initializers.ones}
    f(nnx_layer(name, 6, **kw), x)
    f(nnx_layer(name, 6, scale_init=nnx.initializers.constant(2.0), rngs=nnx.Rngs(1)), x)
    assert n == 1


@pytest.mark.parametrize("name", names("BatchNorm", "LayerNorm"))
def test_D03_scale_bias_metadata_sharding(name):
    names = ("din", "dout")
    kw = {f"{p}_metadata": {"out_sharding": names[:1]} for p in PARAM_NAMES[name]}
    mesh = jax.make_mesh((1, 1), names, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        m = NNX[name](*SAME_GRAPH_ARGS[name], **kw, rngs=nnx.Rngs(0))
    for p in PARAM_NAMES[name]:
        assert getattr(m, p).out_sharding == names[:1]


@pytest.mark.parametrize("graph", [True, False])
def test_D04_split_list_state_names_shapes(graph):
    rngs = nnx.Rngs(0)
    ls = [nnx.Linear(2, 2, rngs=rngs), BN()(2, rngs=rngs)]
    _, state = nnx.split(ls, graph=graph)
    for k in ("scale", "bias", "mean", "var"):
        assert state[1][k].shape == (2,)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("graph", [True, False])
def test_D05_split_merge_roundtrip(name, graph):
    m = nnx_layer(name, 6)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    gd, params, rest = nnx.split(m, nnx.Param, ..., graph=graph)
    assert set(params.keys()) == set(PARAM_NAMES[name])
    assert set(rest.keys()) == ({"mean", "var"} if name == "BatchNorm" else set())
    m2 = nnx.merge(gd, params, rest)
    assert type(m2) is type(m)
    np.testing.assert_array_equal(m2(x), nnx_layer(name, 6)(x))


def test_D06_state_filters_batchstat():
    m = BN()(4, rngs=nnx.Rngs(0))
    stats = nnx.state(m, nnx.BatchStat)
    params = nnx.state(m, nnx.Param)
    assert set(stats.keys()) == {"mean", "var"}
    assert set(params.keys()) == {"scale", "bias"}
    assert isinstance(m.mean, nnx.BatchStat) and isinstance(m.scale, nnx.Param)
    np.testing.assert_array_equal(m.mean[...], 0)
    np.testing.assert_array_equal(m.var[...], 1)


def test_D07_graph_updates_swap_submodules_under_jit():
    n = 0

    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(2, 2, rngs=rngs)
            self.b = BN()(2, rngs=rngs)

    @nnx.jit(graph=True, graph_updates=True)
    def f(m):
        nonlocal n
        n += 1
        m.a, m.b = m.b, m.a

    m = Foo(nnx.Rngs(0))
    a, b = m.a, m.b
    before = [b.scale[...], b.bias[...], b.mean[...], b.var[...]]
    f(m)
    assert n == 1 and m.a is b and m.b is a
    for v, k in zip(before, ("scale", "bias", "mean", "var")):
        np.testing.assert_allclose(v, getattr(b, k)[...])
    f(m)
    assert n == 2 and m.a is a and m.b is b
    f(m)
    f(m)
    assert n == 2 and m.a is a and m.b is b


def test_D08_cached_unflatten_swap():
    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(2, 2, rngs=rngs)
            self.b = BN()(2, rngs=rngs)

    m = Foo(nnx.Rngs(0))
    a, b = m.a, m.b
    ref_out_idx_out = nnx.graphlib.RefMap()
    gd, state = nnx.graphlib.flatten(m, ref_index=ref_out_idx_out, graph=True)
    state = state.to_nested_state()

    def f_pure(gd, state):
        idx = nnx.graphlib.IndexMap()
        mm = nnx.graphlib.unflatten(gd, state, index_ref=idx)
        ref_in_idx_out = nnx.graphlib.RefMap.from_indexmap(idx)
        mm.a, mm.b = mm.b, mm.a
        gd, state = nnx.graphlib.flatten(
            mm, ref_index=nnx.graphlib.RefMap(), ref_outer_index=ref_in_idx_out, graph=True
        )
        return state.to_nested_state(), gd

    state, gd_out = jax.jit(f_pure, static_argnums=(0,))(gd, state)
    m2 = nnx.graphlib.unflatten(gd_out, state, outer_index_outer_ref=nnx.graphlib.IndexMap.from_refmap(ref_out_idx_out))
    assert m2 is m and m2.a is b and m2.b is a


class _FooLinearBN(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = BN()(3, rngs=rngs)


def _foo_linear_bn(rngs):
    return _FooLinearBN(rngs)


def test_D09_prefix_filters():
    m = _foo_linear_bn(nnx.Rngs(0))
    fm = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}
    r = nnx.prefix(m, fm, graph=False)
    assert (r.linear.kernel, r.bn.mean, r.bn.var) == ("params", "batch_stats", "batch_stats")
    r = nnx.prefix(m, fm, graph=True)
    assert isinstance(r, nnx.extract.TreeState)
    assert r.state["bn"]["mean"] == "batch_stats" and r.state["bn"]["var"] == "batch_stats"
    assert r.state["linear"]["kernel"] == "params"
    r = nnx.prefix(m, lambda p, leaf: "batch_stats" if isinstance(leaf, nnx.BatchStat) else "params", graph=False)
    assert (r.linear.bias, r.bn.mean, r.bn.var) == ("params", "batch_stats", "batch_stats")


@pytest.mark.parametrize("graph", [True, False])
def test_D10_unpack_merge(graph):
    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.batch_norm = BN()(2, rngs=rngs)
            self.linear = nnx.Linear(2, 3, rngs=rngs)

    node = Foo(nnx.Rngs(0))
    k = node.linear.kernel[...]
    params, stats = nnx.unpack(node, nnx.Param, nnx.BatchStat, graph=graph)
    assert isinstance(params, nnx.GraphState) and isinstance(stats, nnx.GraphState)
    assert "linear" in params and "batch_norm" in params
    assert "mean" in stats["batch_norm"] and "var" in stats["batch_norm"]
    new = nnx.merge(params, stats)
    assert isinstance(new, Foo) and isinstance(new.batch_norm, BN())
    np.testing.assert_array_equal(new.linear.kernel[...], k)
    params, rest = nnx.unpack(node, nnx.Param, ..., graph=graph)
    assert isinstance(nnx.merge(params, rest).batch_norm, BN())
    if graph:
        p, s = nnx.unpack(node, nnx.Param, nnx.BatchStat)
        assert p._graphdef == s._graphdef


def test_D11_unpack_grad_optimizer():
    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.batch_norm = BN()(2, rngs=rngs)
            self.linear = nnx.Linear(2, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear(self.batch_norm(x))

    x, y = jnp.ones((5, 2)), jnp.ones((5, 3))
    model = Foo(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    params, rest = nnx.unpack(model, nnx.Param, ...)

    def loss_fn(params, rest):
        return jnp.mean((nnx.merge(params, rest)(x) - y) ** 2)

    grads = nnx.grad(loss_fn, graph=False)(params, rest)
    assert isinstance(grads, nnx.GraphState) and "kernel" in grads["linear"]
    nnx.jit(lambda model, opt, grads: opt.update(model, grads))(model, opt, grads)


def test_D12_merge_different_graphdefs_error():
    s1 = nnx.unpack(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    s2 = nnx.unpack(BN()(2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="GraphDef must be the same"):
        nnx.merge(s1, s2)


def test_D13_train_state_with_batch_stats():
    class TrainState(nnx.TrainState):
        batch_stats: nnx.State

    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 4, rngs=rngs)
            self.batch_norm = BN()(4, rngs=rngs)

        def __call__(self, x, train):
            return self.batch_norm(self.linear(x), use_running_average=not train)

    gd, params, stats = nnx.split(Foo(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    state = TrainState.create(gd, params=params, tx=optax.sgd(1.0), batch_stats=stats)
    y, _ = state.apply("params", "batch_stats")(jnp.ones((1, 2)), train=True)
    assert y.shape == (1, 4)
    state.apply_gradients(jax.tree.map(jnp.ones_like, state.params))


@pytest.mark.parametrize("name", names("BatchNorm"))
def test_D14_eval_shape_abstract(name):
    m = nnx.eval_shape(lambda: nnx_layer(name, 6))
    for p in PARAM_NAMES[name]:
        assert getattr(m, p).get_value() == jax.ShapeDtypeStruct((6,), jnp.float32)
    if name == "BatchNorm":
        assert m.mean.get_value() == jax.ShapeDtypeStruct((6,), jnp.float32)


@pytest.mark.parametrize("name", names("BatchNorm", "LayerNorm"))
def test_D15_clone_deepcopy_pickle(name):
    m = nnx_layer(name, 6)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    y = m(x)
    c = nnx.clone(m)
    assert c is not m and c.scale is not m.scale
    np.testing.assert_array_equal(c.scale[...], m.scale[...])
    distinct = nnx.clone(m, arrays=True)
    assert distinct.scale[...] is not m.scale[...]
    d = copy.deepcopy(m)
    assert vars(d)["scale"] is not vars(m)["scale"]
    p = pickle.loads(pickle.dumps(m))
    assert type(p) is type(m)
    for other in (c, distinct, d, p):
        np.testing.assert_allclose(other(x), y)


@pytest.mark.parametrize("name", names("BatchNorm", "LayerNorm"))
def test_D16_pure_dict_roundtrip(name):
    m = nnx_layer(name, 6)
    _, state = nnx.split(m)
    pure = nnx.to_pure_dict(state)
    assert set(pure) == set(PARAM_NAMES[name]) | ({"mean", "var"} if name == "BatchNorm" else set())
    pure = jax.tree.map(lambda a: a + 1, pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(m, state)
    np.testing.assert_array_equal(m.scale[...], 2.0)
    abstract = nnx.eval_shape(lambda: nnx_layer(name, 6))
    nnx.update(abstract, pure)  # restore into an abstract model (integration_test)
    np.testing.assert_array_equal(abstract.scale[...], 2.0)


def test_D17_state_axes_from_state_paths():
    m = _foo_linear_bn(nnx.Rngs(0))
    state = nnx.state(m)
    state["linear"]["kernel"] = 0
    state["linear"]["bias"] = 1
    state["bn"]["scale"] = 0
    state["bn"]["mean"] = 1
    state["bn"]["var"] = 0
    state["bn"]["bias"] = None
    sa = nnx.StateAxes(state)
    assert sa.map_prefix(("bn", "mean"), None) == 1 and sa.map_prefix(("bn", "bias"), None) is None

    @nnx.vmap(out_axes=sa, axis_size=5, graph=True, graph_updates=True)
    def create():
        return _foo_linear_bn(nnx.Rngs(0))

    m = create()
    assert m.bn.scale.shape == (5, 3) and m.bn.mean.shape == (3, 5)
    assert m.bn.var.shape == (5, 3) and m.bn.bias.shape == (3,)


@pytest.mark.parametrize("graph", [True, False])
def test_D18_state_axes_from_state_functional(graph):
    f0 = lambda p, v: (
        (p[0] == "linear" and p[1] == "kernel")
        or (  # noqa: E731
            p[0] == "bn" and p[1] in ("scale", "var")
        )
    )
    f1 = lambda p, v: (
        (p[0] == "linear" and p[1] == "bias")
        or (  # noqa: E731
            p[0] == "bn" and p[1] == "mean"
        )
    )
    abs_model = nnx.eval_shape(lambda: _foo_linear_bn(nnx.Rngs(0)))
    axes = nnx.prefix(abs_model, {f0: 0, f1: 1, ...: None}, graph=graph)

    @nnx.vmap(out_axes=axes, axis_size=5, graph=graph, graph_updates=False)
    def create():
        return _foo_linear_bn(nnx.Rngs(0))

    m = create()
    assert m.bn.scale.shape == (5, 3) and m.bn.mean.shape == (3, 5)
    assert m.bn.var.shape == (5, 3) and m.bn.bias.shape == (3,)


# ============================================================================================
# E. Modes: set_attributes / view / with_attributes / train / eval / view_info / repr
# ============================================================================================
def _block_drop_bn():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 5, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
            self.batch_norm = BN()(10, use_running_average=False, rngs=rngs)

    return Block(nnx.Rngs(0))


def test_E01_set_attributes():
    b = _block_drop_bn()
    assert b.batch_norm.use_running_average is False
    b.set_attributes(deterministic=True, use_running_average=True)
    assert b.dropout.deterministic is True and b.batch_norm.use_running_average is True
    b = _block_drop_bn()
    b.set_attributes(nnx.Dropout, deterministic=True)
    assert b.dropout.deterministic is True and b.batch_norm.use_running_average is False


def test_E02_set_attributes_unknown():
    b = _block_drop_bn()
    with pytest.raises(
        ValueError,
        match=r"Could not find at least one instance of the following "
        r"attributes: [\[{]'unknown'[\]}]",  # a list in flax >= 0.12.6, a set before
    ):
        b.set_attributes(deterministic=True, use_running_average=True, unknown=True)
    b.set_attributes(deterministic=True, use_running_average=True, unknown=True, raise_if_not_found=False)
    assert b.batch_norm.use_running_average is True


def test_E03_train_eval():
    b = _block_drop_bn()
    b.eval()
    assert b.batch_norm.use_running_average is True and b.dropout.deterministic is True
    b.train()
    assert b.batch_norm.use_running_average is False and b.dropout.deterministic is False


@pytest.mark.parametrize("graph", [True, False])
def test_E04_view(graph):
    b = _block_drop_bn()
    v = nnx.view(b, deterministic=True, use_running_average=True, graph=graph)
    assert v.dropout.deterministic is True and v.batch_norm.use_running_average is True
    assert v.linear.kernel is b.linear.kernel
    assert v.batch_norm.mean is b.batch_norm.mean  # variables shared with the original
    assert b.batch_norm.use_running_average is False
    v = nnx.view(b, only=nnx.Dropout, deterministic=True, graph=graph)
    assert v.batch_norm.use_running_average is False


@pytest.mark.parametrize("graph", [True, False])
def test_E05_view_unknown_key(graph):
    with pytest.raises(ValueError, match=r"Unused keys found in nnx.view: \['unknown'\]"):
        nnx.view(_block_drop_bn(), deterministic=True, use_running_average=True, unknown=True, graph=graph)


@pytest.mark.parametrize("graph", [True, False])
def test_E06_with_attributes(graph):
    b = _block_drop_bn()
    v = nnx.with_attributes(b, deterministic=True, use_running_average=True, graph=graph)
    assert v.batch_norm.use_running_average is True and v.linear.kernel is b.linear.kernel
    assert b.batch_norm.use_running_average is False
    v = nnx.with_attributes(b, only=nnx.Dropout, deterministic=True, graph=graph)
    assert v.batch_norm.use_running_average is False
    with pytest.raises(ValueError, match=r"Could not find at least one instance"):
        nnx.with_attributes(b, use_running_average=True, unknown=True, graph=graph)
    v = nnx.with_attributes(
        b, deterministic=True, use_running_average=True, unknown=True, raise_if_not_found=False, graph=graph
    )
    assert v.batch_norm.use_running_average is True


def _foo_two_blocks(norm="BatchNorm", rngs=None):
    class Block(nnx.Module):
        def __init__(self, din, dout, rngs):
            self.linear = nnx.Linear(din, dout, rngs=rngs)
            self.bn = nnx_layer(norm, dout, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)

        def forward(self, x):
            return nnx.relu(self.dropout(self.bn(self.linear(x))))

    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.block1 = Block(32, 128, rngs=rngs)
            self.block2 = Block(128, 10, rngs=rngs)

        def __call__(self, x):
            return self.block2.forward(self.block1.forward(x))

    return Foo(rngs or nnx.Rngs(0))


@pytest.mark.parametrize("graph", [True, False])
def test_E07_view_info(graph):
    obj = _foo_two_blocks()
    cls = BN().__qualname__
    info = nnx.view_info(obj, graph=graph)
    assert info.count(f"{cls}:") == 1 and info.count("Dropout:") == 1
    assert "use_running_average: bool | None = None" in info
    info = nnx.view_info(obj.block1, only=nnx.Dropout, graph=graph)
    assert "Dropout:" in info and f"{cls}:" not in info
    assert nnx.view_info(obj.block1, only=nnx.MultiHeadAttention, graph=graph) == ""


def test_E08_repr_counts():
    obj = _foo_two_blocks()
    leaves = nnx.to_flat_state(nnx.state(obj)).leaves
    size = lambda t: sum(
        int(np.prod(x.shape))
        for x in leaves  # noqa: E731
        if t is None or isinstance(x, t)
    )
    first = repr(obj).replace(",", "").splitlines()[0]
    for n in (size(None), size(nnx.Param), size(nnx.BatchStat), size(nnx.RngState)):
        assert str(n) in first


def test_E09_call_time_use_running_average_override():
    bn = BN()(3, use_running_average=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 3)) * 3 + 2
    y_eval = bn(x, use_running_average=True)  # override: stats untouched
    np.testing.assert_array_equal(bn.mean[...], 0)
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + bn.epsilon), rtol=1e-6)
    bn(x)
    np.testing.assert_allclose(bn.mean[...], 0.01 * x.mean(0), rtol=1e-5)


# ============================================================================================
# F. nnx.tabulate (tests/nnx/summary_test.py)
# ============================================================================================
def test_F01_tabulate_layout_and_totals():
    lines = nnx.tabulate(_foo_two_blocks(), jnp.ones((1, 32)), console_kwargs=CONSOLE).splitlines()
    cls = BN().__name__
    assert "Foo Summary" in lines[0]
    for col in ("path", "type", "BatchStat", "Param"):
        assert col in lines[2]
    assert "block1/bn" in lines[13] and cls in lines[13]
    assert "block1/dropout" in lines[18]
    assert "block2/bn" in lines[27] and cls in lines[27]
    assert "block2/dropout" in lines[32]
    assert "Total" in lines[34]
    assert "276 (1.1 KB)" in lines[34]  # BatchStat
    assert "5,790 (23.2 KB)" in lines[34]  # Param
    assert "4 (24 B)" in lines[34]  # RngState
    assert "Total Parameters: 6,070 (24.3 KB)" in lines[37]


def _nested(norm, shared=False):
    class Block(nnx.Module):
        def __init__(self, rngs, linear=None):
            self.linear = linear or nnx.Linear(2, 2, rngs=rngs)
            self.bn = nnx_layer(norm, 2, rngs=rngs, **({"num_groups": 1} if norm == "GroupNorm" else {}))

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            shared_lin = nnx.Linear(2, 2, rngs=rngs) if shared else None
            self.block1 = Block(rngs, shared_lin)
            self.block2 = Block(rngs, shared_lin)

        def __call__(self, x):
            return self.block2(self.block1(x))

    return Model(nnx.Rngs(0))


@pytest.mark.parametrize("name", names("BatchNorm"))
def test_F02_tabulate_flops_one_row_per_norm_call(name):
    # flax's test_nested uses BatchNorm with both flop counts; other layers: forward flops only
    table = nnx.tabulate(
        _nested(name),
        jnp.ones((4, 2)),
        compute_flops=True,
        compute_vjp_flops=name == "BatchNorm",
        console_kwargs=CONSOLE,
    )
    assert sum(s.startswith("├─") for s in table.splitlines()) == 7
    assert "flops" in table and ("vjp_flops" in table) == (name == "BatchNorm")


def test_F03_tabulate_shared_module():
    table = nnx.tabulate(_nested("BatchNorm", shared=True), jnp.ones((4, 2)), compute_vjp_flops=True)
    assert sum(s.startswith("├─") for s in table.splitlines()) == 6


# ============================================================================================
# G. nnx transforms over modules containing BatchNorm (tests/nnx/transforms_test.py)
# ============================================================================================
# flax's three graph modes; the default run keeps graph mode with updates, the slow run all three.
GRAPH_MODES = [(True, True), pytest.param(True, False, marks=pytest.mark.slow), pytest.param(False, False, marks=pytest.mark.slow)]


def test_G01_complex_vmap_init_scan_call():
    sa = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class MLP(nnx.Module):
        @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
        @nnx.vmap(in_axes=(sa, sa), graph=True, graph_updates=True)
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.bn = BN()(3, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.node = nnx.Variable(jnp.ones((2,)))

        @nnx.scan(in_axes=(sa, nnx.Carry), graph=True, graph_updates=True)
        def __call__(self, x):
            return nnx.gelu(self.dropout(self.bn(self.linear(x)))), None

    module = MLP(rngs=nnx.Rngs(0))
    module.set_attributes(deterministic=False, use_running_average=False)
    assert module.linear.kernel.shape == (5, 3, 3) and module.node.shape == (2,)
    y, _ = module(jnp.ones((1, 3)))
    assert y.shape == (1, 3)
    # the view flavour (test_complex_view)
    module2 = MLP(rngs=nnx.Rngs(0))
    y, _ = nnx.view(module2, deterministic=False, use_running_average=False)(jnp.ones((1, 3)))
    assert y.shape == (1, 3)


@pytest.mark.parametrize("graph_mode", [True, False])
@pytest.mark.parametrize("use_view", [False, True])
def test_G02_complex_functional(graph_mode, use_view):
    Block = block_cls(dmid=3)

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
        m = Block(rngs, din=3)
        if not use_view:
            m.set_attributes(deterministic=False, use_running_average=False)
        return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
        return module(x), None

    module = create(nnx.Rngs(0))
    assert module.bn.scale.shape == (5, 3) and module.bn.mean.shape == (5, 3)
    if use_view:
        module = nnx.view(module, deterministic=False, use_running_average=False)
    y, _ = forward(module, jnp.ones((1, 3)))
    assert y.shape == (1, 3)


def test_G03_complex_broadcast_dropout():
    sa = nnx.StateAxes({(nnx.Param, "params"): 0, ...: None})

    class MLP(nnx.Module):
        @nnx.split_rngs(splits=5, only="params", graph=True, graph_updates=True)
        @nnx.vmap(in_axes=(sa, sa), graph=True, graph_updates=True)
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.bn = BN()(3, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

        @nnx.split_rngs(splits=5, only="params", graph=True, graph_updates=True)
        @nnx.scan(in_axes=(sa, nnx.Carry), graph=True, graph_updates=True)
        def __call__(self, x):
            return nnx.gelu(self.dropout(self.bn(self.linear(x)))), None

    module = MLP(rngs=nnx.Rngs(params=0, dropout=1))
    module.set_attributes(deterministic=False, use_running_average=False)
    assert module.linear.kernel.shape == (5, 3, 3)
    assert module(jnp.ones((1, 3)))[0].shape == (1, 3)


def test_G04_complex_broadcast_dropout_functional_with_rngs_prefix():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.bn = BN()(3, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return nnx.gelu(self.dropout(self.bn(self.linear(x)))), None

    rngs = nnx.Rngs(params=0, dropout=1)
    module_axes, rngs_axes = nnx.prefix(
        (Block(rngs), rngs), {(nnx.Param, "params", "dropout"): 0, ...: None}, graph=False
    )

    @nnx.with_rngs(split={"params": 5}, broadcast={"dropout": 5}, graph=False, graph_updates=False)
    @nnx.vmap(in_axes=(rngs_axes,), out_axes=module_axes, axis_size=5, graph=False, graph_updates=False)
    def create(rngs):
        return Block(rngs=rngs)

    module = create(rngs)

    @nnx.scan(in_axes=(module_axes, nnx.Carry), graph=False, graph_updates=False)
    def forward(module, x):
        module = nnx.with_attributes(module, deterministic=False, use_running_average=False)
        return module(x)

    assert module.linear.kernel.shape == (5, 3, 3) and module.bn.mean.shape == (3,)
    assert forward(module, jnp.ones((1, 3)))[0].shape == (1, 3)


def test_G05_state_axes_batchstat_vmapped():
    Block = block_cls(bn_kwargs={"use_running_average": False})
    sa = nnx.StateAxes({(nnx.BatchStat, "dropout"): 0, ...: None})

    @nnx.split_rngs(splits=5, only="dropout", graph=True, graph_updates=True)
    @nnx.vmap(in_axes=(sa,), out_axes=sa, graph=True, graph_updates=True)
    def create_block(rngs):
        return Block(rngs)

    module = create_block(nnx.Rngs(params=0, dropout=1))
    assert module.linear.kernel.shape == (2, 3)
    assert module.bn.scale.shape == (3,) and module.bn.mean.shape == (5, 3)
    assert module.dropout.rngs.key.shape == (5,)

    @nnx.vmap(in_axes=(sa, 0), out_axes=0, graph=True, graph_updates=True)
    def forward_block(module, x):
        assert module.bn.mean.shape == (3,)
        return module(x)

    assert forward_block(module, jnp.ones((5, 1, 2))).shape == (5, 1, 3)


@pytest.mark.parametrize("graph", [True, False])
def test_G06_state_axes_functional_updates_running_mean(graph):
    Block = block_cls()
    rngs = nnx.Rngs(params=0, dropout=1).split({"dropout": 5})
    abs_block = nnx.eval_shape(lambda: Block(nnx.Rngs(params=0, dropout=1)))
    axes = nnx.prefix(abs_block, {(nnx.BatchStat, "dropout"): 0, ...: None}, graph=graph)

    @nnx.vmap(in_axes=(None, 0), out_axes=axes, graph=graph, graph_updates=False)
    def create(params, dropout):
        return Block(nnx.Rngs(params=params, dropout=dropout))

    module = create(rngs.params, rngs.dropout)
    assert module.bn.scale.shape == (3,) and module.bn.mean.shape == (5, 3)
    initial = module.bn.mean[...]

    @nnx.vmap(in_axes=(axes, 0), out_axes=0, graph=graph, graph_updates=False)
    def forward(module, x):
        return module(x)

    x = jax.random.normal(jax.random.key(0), (5, 4, 2))
    assert forward(module, x).shape == (5, 4, 3)
    assert not jnp.allclose(initial, module.bn.mean[...])  # in-place BatchStat update propagated


@pytest.mark.parametrize("graph", [True, False])
def test_G07_split_rngs_functional_prefix(graph):
    Block = block_cls(bn_kwargs={"use_running_average": False})
    rngs = nnx.Rngs(params=0, dropout=1)
    abs_block = nnx.eval_shape(lambda: Block(nnx.clone(rngs)))
    axes = nnx.prefix(abs_block, {(nnx.BatchStat, "dropout"): 0, ...: None}, graph=graph)
    rngs_axes = nnx.prefix(rngs, {"dropout": 0, ...: None}, graph=graph)

    @nnx.split_rngs(splits=5, only="dropout")
    @nnx.vmap(in_axes=(rngs_axes,), out_axes=axes, graph=graph, graph_updates=False)
    def create(rngs):
        return Block(rngs)

    module = create(rngs)
    assert module.bn.mean.shape == (5, 3) and module.dropout.rngs.key.shape == (5,)

    @nnx.vmap(in_axes=(axes, 0), out_axes=0, graph=graph, graph_updates=False)
    def forward(module, x):
        return module(x)

    assert forward(module, jnp.ones((5, 1, 2))).shape == (5, 1, 3)


@pytest.mark.parametrize("graph,graph_updates", GRAPH_MODES)
def test_G08_vmap_everything_ensemble(graph, graph_updates):
    Block = block_cls()

    @nnx.split_rngs(splits=5, graph=graph, graph_updates=graph_updates)
    @nnx.vmap(in_axes=0, out_axes=0, graph=graph, graph_updates=graph_updates)
    def create(rngs):
        return Block(rngs)

    module = create(nnx.Rngs(0))
    assert module.bn.scale.shape == (5, 3) and module.bn.mean.shape == (5, 3)

    @nnx.vmap(in_axes=(0, 0), out_axes=0, graph=graph, graph_updates=graph_updates)
    def forward(module, x):
        return module(x)

    assert forward(module, jnp.ones((5, 1, 2))).shape == (5, 1, 3)

    # test_example: ensemble from a batch of keys, input broadcast
    @nnx.vmap(in_axes=0, out_axes=0, graph=graph, graph_updates=graph_updates)
    def init_ensemble(key):
        return Block(nnx.Rngs(key), din=2)

    ens = init_ensemble(jax.random.split(jax.random.key(0), 5))

    @nnx.vmap(in_axes=(0, None), out_axes=0, graph=graph, graph_updates=graph_updates)
    def fwd(model, x):
        return model(x)

    assert fwd(ens, jnp.ones((4, 2))).shape == (5, 4, 3)


def test_G09_remat_over_batchnorm():
    """EXTRA (brief): no flax test remats a BatchNorm; checks remat + grad + stat update."""
    Block = block_cls(with_dropout=False, bn_kwargs={"use_running_average": False})
    m = Block(nnx.Rngs(0))

    @nnx.remat
    def fwd(m, x):
        return m(x)

    def loss(m, x):
        return jnp.sum(fwd(m, x) ** 2)

    x = jax.random.normal(jax.random.key(0), (4, 2))
    grads = nnx.jit(nnx.grad(loss))(m, x)
    assert grads.bn.scale.shape == (3,)
    assert not jnp.allclose(m.bn.mean[...], 0)


def test_G10_nnx_vmap_batchnorm_axis_name():
    """EXTRA (nnx analogue of C03): BatchNorm(axis_name=...) under nnx.vmap syncs the statistics."""
    x = jax.random.uniform(jax.random.key(2), (5, 4, 3))
    plain = BN()(3, use_running_average=False, rngs=nnx.Rngs(0))
    synced = BN()(3, use_running_average=False, axis_name="batch", rngs=nnx.Rngs(0))
    y1 = plain(x.reshape(-1, 3)).reshape(5, 4, 3)
    y2 = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(synced, x)
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    np.testing.assert_allclose(plain.mean[...], synced.mean[...], atol=1e-6)
    np.testing.assert_allclose(plain.var[...], synced.var[...], atol=1e-6)


# ============================================================================================
# H. Training integration (tests/nnx/integration_test.py)
# ============================================================================================
@pytest.mark.parametrize("graph_mode", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_H01_train_eval_views_with_optimizer(graph_mode):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 16, rngs=rngs)
            self.bn = BN()(16, use_running_average=False, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, deterministic=False, rngs=rngs)
            self.linear_out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear_out(nnx.relu(self.dropout(self.bn(self.linear(x)))))

    model = Model(nnx.Rngs(0))
    train_model = nnx.view(model, deterministic=False, use_running_average=False)
    eval_model = nnx.view(model, deterministic=True, use_running_average=True)
    opt = nnx.Optimizer(train_model, optax.adam(1e-3), wrt=nnx.Param)
    assert train_model.bn.use_running_average is False and eval_model.bn.use_running_average

    @nnx.jit(graph=graph_mode)
    def train_step(model, opt, x, y):
        loss, grads = nnx.compat.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    @nnx.jit(graph=graph_mode)
    def eval_step(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jax.random.normal(jax.random.key(1), (8, 3))
    train_step(train_model, opt, x, y)
    assert train_model.dropout.rngs.count[...] == 1
    assert not jnp.allclose(model.bn.mean[...], 0)  # shared variables updated through the view
    mean = model.bn.mean[...]
    eval_step(eval_model, x, y)
    np.testing.assert_array_equal(model.bn.mean[...], mean)


def _shared_model():
    class Block(nnx.Module):
        def __init__(self, linear, *, rngs):
            self.linear = linear
            self.bn = BN()(2, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    class Model(nnx.Module):
        def __init__(self, *, rngs):
            shared = nnx.Linear(2, 2, rngs=rngs)
            self.block1 = Block(shared, rngs=rngs)
            self.block2 = Block(shared, rngs=rngs)

        def __call__(self, x):
            return self.block2(self.block1(x))

    return Model(rngs=nnx.Rngs(0))


@pytest.mark.parametrize("use_view", [False, True])
def test_H02_shared_modules_stateful(use_view):
    @nnx.compat.jit
    def train_step(model, x, y):
        grads = nnx.compat.grad(lambda m: jnp.mean((y - m(x)) ** 2))(model)
        nnx.update(model, jax.tree.map(lambda w, g: w - 0.1 * g, nnx.compat.state(model, nnx.Param), grads))

    model = _shared_model()
    if use_view:
        model = nnx.compat.view(model, use_running_average=False)
    else:
        model.set_attributes(use_running_average=False, graph=True)
    x, y = np.random.uniform(size=(4, 2)), np.random.uniform(size=(4, 2))
    for _ in range(3):
        train_step(model, x, y)
    assert model.block1.linear is model.block2.linear
    assert model.block1.bn is not model.block2.bn
    assert not jnp.allclose(model.block1.bn.mean[...], 0)


@pytest.mark.parametrize("use_view", [False, True])
def test_H03_shared_modules_pure(use_view):
    @jax.jit
    def train_step(state, graphdef, x, y):
        model = nnx.merge(graphdef, state)
        if use_view:
            model = nnx.compat.view(model, use_running_average=False)
        else:
            model.set_attributes(use_running_average=False, graph=True)
        grads = nnx.compat.grad(lambda m: jnp.mean((y - m(x)) ** 2))(model)
        nnx.update(model, jax.tree.map(lambda w, g: w - 0.1 * g, nnx.compat.state(model, nnx.Param), grads))
        return nnx.compat.split(model)

    graphdef, state = nnx.compat.split(_shared_model())
    x, y = np.random.uniform(size=(4, 2)), np.random.uniform(size=(4, 2))
    for _ in range(3):
        graphdef, state = train_step(state, graphdef, x, y)
    model = nnx.merge(graphdef, state)
    assert model.block1.linear.kernel is model.block2.linear.kernel
    assert model.block1.bn is not model.block2.bn


def test_H04_tree_mode_train_step():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 2, rngs=rngs)
            self.bn = BN()(2, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.block1, self.block2 = Block(rngs), Block(rngs)

        def __call__(self, x):
            return self.block2(self.block1(x))

    @nnx.jit(graph=False)
    def train_step(model, x, y):
        grads = nnx.grad(lambda m: jnp.mean((y - m(x)) ** 2), graph=False)(model)
        return jax.tree.map(lambda w, g: w - 0.1 * g, model, grads)

    model = Model(nnx.Rngs(0))
    model.set_attributes(use_running_average=False)
    x, y = np.random.uniform(size=(4, 2)), np.random.uniform(size=(4, 2))
    for _ in range(3):
        model = train_step(model, x, y)
    assert isinstance(model.block1.bn, BN())


def test_H05_hijax_mutable_arrays():
    with nnx.var_defaults(hijax=True):

        class Model(nnx.Module):
            def __init__(self, rngs):
                self.linear = nnx.Linear(2, 16, rngs=rngs)
                self.bn = BN()(16, use_running_average=False, rngs=rngs)
                self.linear_out = nnx.Linear(16, 3, rngs=rngs)

            def __call__(self, x):
                return self.linear_out(nnx.relu(self.bn(self.linear(x))))

        model = Model(nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

        @jax.jit
        def train_step(x, y):
            gd, params, nondiff = nnx.split(model, nnx.Param, ...)

            def loss_fn(params):
                return ((nnx.merge(gd, params, nondiff)(x) - y) ** 2).mean()

            loss, grads = jax.value_and_grad(loss_fn)(nnx.with_vars(params, hijax=False))
            opt.update(model, grads)
            return loss

        train_step(jax.random.normal(jax.random.key(0), (8, 2)), jax.random.normal(jax.random.key(1), (8, 3)))


# ============================================================================================
# I. nnx.bridge (tests/nnx/bridge/wrappers_test.py)
# ============================================================================================
def test_I01_ToNNX_linen_batchnorm_lazy_init():
    class NNXOuter(nnx.Module):
        def __init__(self, dout, *, rngs):
            self.nn_dense1 = bridge.ToNNX(linen.Dense(dout, use_bias=False), rngs=rngs)
            self.b = nnx.Param(jax.random.uniform(rngs.params(), (1, dout)))
            self.batchnorm = bridge.ToNNX(LINEN["BatchNorm"](use_running_average=True), rngs=rngs)
            self.rngs = rngs

        def __call__(self, x):
            return self.batchnorm(self.nn_dense1(x) + self.b)

    x = jax.random.normal(jax.random.key(0), (2, 4))
    model = NNXOuter(3, rngs=nnx.Rngs(0))
    gdef_before, _ = nnx.split(model)
    bridge.lazy_init(model, x)
    gdef_full, state = nnx.split(model)
    assert gdef_before != gdef_full
    assert "batchnorm" in state and "kernel" in state["nn_dense1"]
    assert {"mean", "var", "scale", "bias"} <= set(state["batchnorm"].keys())
    y = model(x)
    np.testing.assert_allclose(y, x @ state["nn_dense1"]["kernel"][...] + state["b"][...], rtol=1e-5)
    assert gdef_full == nnx.graphdef(model)


def test_I02_to_linen_nnx_batchnorm_collections():
    class NNXInner(nnx.Module):
        def __init__(self, din, dout, rngs):
            self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (din, dout)))
            self.bn = BN()(dout, use_running_average=False, rngs=rngs)
            self.lora = nnx.LoRA(din, 3, dout, rngs=rngs)

        def __call__(self, x):
            return self.bn(x @ self.w[...]) + self.lora(x)

    xkey, pkey, dkey = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(xkey, (2, 4))
    model = bridge.to_linen(NNXInner, 4, 3)
    var = model.init({"params": pkey, "dropout": dkey}, x)
    assert set(var.keys()) == {"LoRAParam", "params", "batch_stats"}
    assert set(var["batch_stats"]["bn"].keys()) == {"mean", "var"}
    assert model.apply(var, x).shape == (2, 3)
    _, upd = model.apply(var, x, mutable=["batch_stats"])
    assert not jnp.allclose(upd["batch_stats"]["bn"]["mean"], 0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
