"""normzoo against the installed flax.linen, side by side.

Fields, call signatures and positional construction are read from flax's own classes, so a
field flax adds shows up here as a failure. Values, running statistics (and their dtypes)
and gradients are compared on the same inputs and variables, in float32, bfloat16, float16
and complex64, with and without masks, under flax's lifted transforms, per example under
``jax.vmap`` with an axis name, and in ``nn.tabulate``. Where normzoo deliberately differs
(README, "Where we differ from flax.linen") the test asserts the improvement instead.
"""

import contextlib
import dataclasses
import functools
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests import reference as ref
from tests.conftest import PATHS, forced_path, some_slow

# name -> (normzoo class, flax class, constructor arguments of a training call)
PAIRS = {
    "BatchNorm": (normzoo.BatchNorm, nn.BatchNorm, {"use_running_average": False, "momentum": 0.9}),
    "LayerNorm": (normzoo.LayerNorm, nn.LayerNorm, {}),
    "RMSNorm": (normzoo.RMSNorm, nn.RMSNorm, {}),
    "GroupNorm": (normzoo.GroupNorm, nn.GroupNorm, {"num_groups": 2}),
    "InstanceNorm": (normzoo.InstanceNorm, nn.InstanceNorm, {}),
}
NAMES = sorted(PAIRS)
SHAPE = (6, 3, 4, 4)
KEY = jax.random.key(0)


def init_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def as_array(a):
    a = np.asarray(a)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def assert_close(ours, theirs, rel):
    """Every leaf within ``rel`` of flax's, relative to the leaf's largest magnitude (at least 1)."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = as_array(a), as_array(b)
        assert a.shape == b.shape
        scale = max(1.0, float(np.nanmax(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale, equal_nan=True)


def make_x(dtype=jnp.float32, shape=SHAPE, seed=0, shift=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2.0 + shift
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * (rng.normal(size=shape) - 1.0)
    return jnp.asarray(x, dtype)


def make_mask(name, shape=SHAPE, seed=1):
    rng = np.random.default_rng(seed)
    if name == "BatchNorm":  # whole examples, flax's test layout (broadcast over the rest)
        m = np.ones(shape[:1] + (1,) * (len(shape) - 1), bool)
        m[-2:] = False
        return jnp.asarray(m)
    m = rng.random(shape) < 0.7
    m[..., :2] = True  # every row keeps something
    return jnp.asarray(m)


def perturbed(variables, seed=2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + rng.normal(0, 0.3, a.shape), a.dtype), variables)


def run_pairs(names, x, *, ctor=None, masks=None, variables=None, paths=()):
    """Each named normzoo layer and its flax counterpart on the same input and variables:
    ``{name: [(y, updated batch_stats, grads) of normzoo, the same of flax]}``. ``x`` is one
    input for all, or a dict of one per name. With ``paths`` normzoo runs on each forced
    statistics path (one result each, before flax's).

    Gradients are taken w.r.t. the parameters and the input, of sum(Re(y * w)). flax runs
    in its stable mode (``use_fast_variance=False``), like with like: normzoo's variance
    is always stable (flax's default is compared in its own test below). One compilation
    per library for all the names.
    """
    layers = {}
    for name in names:
        ours_cls, flax_cls, kw = PAIRS[name]
        kw = {**kw, "use_fast_variance": False, **(ctor or {})}
        layers[name] = ours_cls(**kw), flax_cls(**kw)
    xs = x if isinstance(x, dict) else {n: x for n in names}
    if variables is None:
        variables = {n: perturbed(layers[n][1].init(KEY, xs[n])) for n in names}
    w = jnp.asarray(np.random.default_rng(3).normal(size=xs[names[0]].shape), jnp.float32)

    def run(which, params, x):
        out = {}
        for n in names:
            def loss(p, x, layer=layers[n][which], v=variables[n], mask=(masks or {}).get(n)):
                y, upd = layer.apply({**v, "params": p}, x, mask=mask, mutable=["batch_stats"])
                return jnp.sum(jnp.real(y * w)), (y, upd)

            (_, (y, upd)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params[n], x[n])
            out[n] = y, upd, grads
        return out

    params = {n: variables[n].get("params", {}) for n in names}
    theirs = jax.jit(functools.partial(run, 1))(params, xs)
    if not paths:
        ours = [jax.jit(functools.partial(run, 0))(params, xs)]
    else:  # flax once, normzoo on each statistics path
        ours = []
        for path in paths:
            with forced_path(path):
                ours.append(jax.jit(functools.partial(run, 0))(params, xs))
    return {n: [o[n] for o in ours] + [theirs[n]] for n in names}


def run_pair(name, x, *, ctor=None, mask=None, variables=None):
    """:func:`run_pairs` for one layer."""
    variables = None if variables is None else {name: variables}
    return run_pairs([name], x, ctor=ctor, masks={name: mask}, variables=variables)[name]


# ----------------------------------------------------------------------------- fields and calls


@pytest.mark.parametrize("name", NAMES)
def test_fields_are_flax_fields_in_flax_order_with_flax_defaults(name):
    ours, theirs, _ = PAIRS[name]
    mine, flax_fields = init_fields(ours), init_fields(theirs)
    assert [(f.name, f.default) for f in mine[: len(flax_fields)]] == [(f.name, f.default) for f in flax_fields]
    extras = mine[len(flax_fields):]
    assert all(f.kw_only for f in extras), [f.name for f in extras if not f.kw_only]


@pytest.mark.parametrize("cls", [normzoo.BatchRenorm, normzoo.MeanOnlyBatchNorm, normzoo.IBN])
def test_batch_family_leads_with_flax_batch_norm_fields(cls):
    flax_fields = init_fields(nn.BatchNorm)
    assert [f.name for f in init_fields(cls)[: len(flax_fields)]] == [f.name for f in flax_fields]
    assert all(f.kw_only for f in init_fields(cls)[len(flax_fields):])


@pytest.mark.parametrize("name", NAMES)
def test_call_signature_is_flax(name):
    ours, theirs, _ = PAIRS[name]
    mine = list(inspect.signature(ours.__call__).parameters.values())
    flax_params = list(inspect.signature(theirs.__call__).parameters.values())
    describe = lambda ps: [(p.name, p.kind, p.default) for p in ps]  # noqa: E731
    assert describe(mine[: len(flax_params)]) == describe(flax_params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in mine[len(flax_params):])


@pytest.mark.parametrize("name", NAMES)
def test_positional_arguments_land_in_flax_fields(name):
    ours, theirs, _ = PAIRS[name]
    values = [f"value{i}" for i in range(len(init_fields(theirs)))]
    a, b = ours(*values), theirs(*values)
    for f in init_fields(theirs):
        assert getattr(a, f.name) == getattr(b, f.name), f.name


def test_group_norm_seven_groups_positionally_as_in_flax():
    """The issue's example: GroupNorm(7) has 7 groups (it used to set epsilon=7)."""
    x = make_x(shape=(3, 2, 5, 77))
    mask = jnp.asarray(np.random.default_rng(0).random(x.shape) < 0.8)
    ours, theirs = normzoo.GroupNorm(7, use_bias=False, use_scale=False), nn.GroupNorm(7, use_bias=False, use_scale=False)
    assert (ours.num_groups, ours.epsilon) == (7, 1e-6)
    assert_close(ours.apply({}, x, mask=mask), theirs.apply({}, x, mask=mask), 1e-5)


def test_repr_is_flax_repr_plus_keyword_only_extras():
    ours, theirs = normzoo.BatchNorm(True, momentum=0.8), nn.BatchNorm(True, momentum=0.8)
    lines = repr(ours).splitlines()
    assert [ln for ln in lines if "virtual_batch_size" not in ln and "scale_plus_one" not in ln] == repr(theirs).splitlines()


# ----------------------------------------------------------------------------- values side by side

DTYPES = {  # input dtype -> (relative tolerance of outputs and statistics, of gradients)
    "float32": (jnp.float32, 1e-5, 1e-5),
    "bfloat16": (jnp.bfloat16, 1e-5, 2e-2),
    "float16": (jnp.float16, 1e-5, 2e-3),
    "complex64": (jnp.complex64, 1e-5, 1e-5),
}


# bfloat16 unmasked and complex64 masked by default, the rest in the slow run (the unmasked float32
# case is the one test_flax_test_configurations_side_by_side runs throughout; the masked one shares
# complex64's code but its variance).
@pytest.mark.parametrize("dtype, masked", some_slow(
    [(d, m) for d in sorted(DTYPES) for m in (False, True)],
    fast={("bfloat16", False), ("complex64", True)},
    ids=lambda v: f"{v[0]}-{'mask' if v[1] else 'nomask'}"))
def test_same_outputs_statistics_and_gradients_as_flax(dtype, masked):
    dt, rel, grad_rel = DTYPES[dtype]
    x = make_x(dt)
    masks = None
    if masked:  # garbage where the mask is off must not reach the statistics
        masks = {n: make_mask(n) for n in NAMES}  # BatchNorm: whole examples, as flax's test
        x = {n: jnp.where(m, x, jnp.asarray(300.0, dt)) for n, m in masks.items()}
    for name, (*ours, (y2, s2, g2)) in run_pairs(NAMES, x, masks=masks, paths=PATHS).items():
        for y1, s1, g1 in ours:  # each statistics path
            assert y1.dtype == y2.dtype, name
            assert jax.tree.map(lambda a: a.dtype, s1) == jax.tree.map(lambda a: a.dtype, s2), name
            assert jax.tree.map(lambda a: a.dtype, g1) == jax.tree.map(lambda a: a.dtype, g2), name
            assert_close(y1, y2, rel)
            assert_close(s1, s2, 1e-6)
            assert_close(g1, g2, grad_rel)


@pytest.mark.parametrize("name", NAMES)
def test_same_as_flax_default_fast_variance_on_well_conditioned_data(name):
    """Where flax's default E[x^2] - E[x]^2 keeps its digits (means within a few standard
    deviations), it and normzoo agree; beyond that see test_large_mean_is_closer_to_float64."""
    x = make_x(shape=(6, 3, 4, 16), shift=0.0)  # 16 features: LayerNorm's rows are well spread
    (y1, s1, g1), (y2, s2, g2) = run_pair(name, x, ctor={"use_fast_variance": True})
    assert_close(y1, y2, 1e-5)
    assert_close(s1, s2, 1e-6)
    assert_close(g1, g2, 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_output_dtype_as_flax(name):
    x = make_x(jnp.bfloat16)
    (y1, _, _), (y2, _, _) = run_pair(name, x, ctor={"dtype": jnp.bfloat16})
    assert y1.dtype == y2.dtype == jnp.bfloat16
    assert_close(y1, y2, 1e-2)  # one bfloat16 rounding


def test_complex_batch_norm_statistics_as_flax_defines_them():
    x = make_x(jnp.complex64, seed=5)
    (_, s1, _), _ = run_pair("BatchNorm", x, variables=nn.BatchNorm(True).init(KEY, x))
    xf = as_array(x)
    mean = xf.mean((0, 1, 2))
    var = (np.abs(xf - mean) ** 2).mean((0, 1, 2))
    assert s1["batch_stats"]["mean"].dtype == jnp.complex64 and s1["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_allclose(s1["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(s1["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


# flax's own test configurations: reduction axes across the batch, split feature axes, groups of one.
CONFIGS = [
    ("LayerNorm", {"reduction_axes": (0, 1, 2)}, (2, 3, 4)),
    ("LayerNorm", {"reduction_axes": -2, "feature_axes": (1, 3)}, (2, 3, 4, 5)),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, (2, 3, 4, 5)),
    ("RMSNorm", {"reduction_axes": (1, 2)}, (2, 3, 4)),
    ("GroupNorm", {"num_groups": 2, "reduction_axes": (0, 1, 3, 4)}, (2, 5, 4, 4, 8)),
    ("GroupNorm", {"num_groups": None, "group_size": 1}, (2, 3, 4, 5)),
    ("InstanceNorm", {"feature_axes": (1, -1)}, (2, 3, 4, 5)),
    ("InstanceNorm", {"feature_axes": (1, 2)}, (2, 3, 4, 5)),
    ("BatchNorm", {"axis": (1, 3)}, (4, 3, 2, 5)),
]


# The first configuration of each layer by default, every one in the slow run.
@pytest.mark.parametrize("name,ctor,shape", [
    pytest.param(*c, id=f"{c[0]}-{i}", marks=() if c[0] not in [n for n, _, _ in CONFIGS[:i]] else pytest.mark.slow)
    for i, c in enumerate(CONFIGS)])
def test_flax_test_configurations_side_by_side(name, ctor, shape, stats_path):
    (y1, s1, g1), (y2, s2, g2) = run_pair(name, make_x(shape=shape), ctor=ctor)
    assert_close(y1, y2, 1e-5)
    assert_close(s1, s2, 1e-6)
    assert_close(g1, g2, 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_uniform_initializers_give_flax_variables_exactly(name):
    """Same variable names, shapes, dtypes, creation order and random draws as flax."""
    ours_cls, flax_cls, kw = PAIRS[name]
    init = nn.initializers.uniform(2.0)
    extra = {"bias_init": init} if name != "RMSNorm" else {}
    ours, theirs = ours_cls(**kw, scale_init=init, **extra), flax_cls(**kw, scale_init=init, **extra)
    x = make_x()
    v1, v2 = ours.init(jax.random.key(7), x), theirs.init(jax.random.key(7), x)
    assert jax.tree.structure(v1) == jax.tree.structure(v2)
    assert list(v1) == list(v2) and all(list(v1[c]) == list(v2[c]) for c in v1)  # creation order
    for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_eval_shape_as_flax(name):
    ours_cls, flax_cls, kw = PAIRS[name]
    x = make_x()
    shapes = [jax.eval_shape(cls(**kw).init, KEY, x) for cls in (ours_cls, flax_cls)]
    assert shapes[0] == shapes[1]
    v = flax_cls(**kw).init(KEY, x)
    outs = [jax.eval_shape(functools.partial(cls(**kw).apply, mutable=["batch_stats"]), v, x)
            for cls in (ours_cls, flax_cls)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "RMSNorm"])  # no mean: flax's formula
def test_large_mean_is_closer_to_float64_than_flax(name, stats_path):
    """The documented improvement: stable statistics. flax's default (fast variance) loses
    every digit at x ~ N(1e4, 2); its stable mode is matched."""
    x = make_x(shift=1e4, seed=4)
    reference = {
        "BatchNorm": lambda x: ref.batch_norm(x, (0, 1, 2), 1e-5),
        "LayerNorm": lambda x: ref.layer_norm(x, (-1,), 1e-6),
        "RMSNorm": lambda x: ref.rms_norm(x, (-1,), 1e-6),
        "GroupNorm": lambda x: ref.group_norm(x, 2, 1e-6),
        "InstanceNorm": lambda x: ref.instance_norm(x, 1e-6),
    }[name](np.asarray(x))
    ours_cls, flax_cls, kw = PAIRS[name]
    v = flax_cls(**kw).init(KEY, x)

    def err(layer):
        y, _ = layer.apply(v, x, mutable=["batch_stats"])
        return np.abs(as_array(y) - reference).max()

    ours, fast, stable = err(ours_cls(**kw)), err(flax_cls(**kw)), err(flax_cls(**kw, use_fast_variance=False))
    assert ours <= 1.5 * stable + 1e-6, (ours, stable)
    assert 100 * ours < fast, (ours, fast)


@pytest.mark.parametrize("name", some_slow(NAMES, fast={"BatchNorm"}))  # the other families with -m slow
def test_force_float32_reductions_false_keeps_flax_dtypes_and_float32_statistics(name):
    """flax then reduces in bfloat16; normzoo keeps the variables' and output's dtypes and
    reduces in float32 anyway (documented), so it is closer to the float64 result."""
    x = make_x(jnp.bfloat16, seed=6, shift=3.0)
    kw = {"force_float32_reductions": False, "param_dtype": jnp.bfloat16}
    ours_cls, flax_cls, base = PAIRS[name]
    v1, v2 = ours_cls(**base, **kw).init(KEY, x), flax_cls(**base, **kw).init(KEY, x)
    assert jax.tree.map(lambda a: a.dtype, v1) == jax.tree.map(lambda a: a.dtype, v2)
    v = perturbed(v2)
    (y1, s1, _), (y2, s2, _) = run_pair(name, x, ctor=kw, variables=v)
    assert jax.tree.map(lambda a: a.dtype, s1) == jax.tree.map(lambda a: a.dtype, s2)
    assert y1.dtype == y2.dtype
    # The same layer with the same (bfloat16-valued) variables, all in float32.
    (exact, _, _), _ = run_pair(name, x.astype(jnp.float32), variables=jax.tree.map(lambda a: a.astype(jnp.float32), v))
    want = as_array(exact)
    assert np.abs(as_array(y1) - want).max() <= np.abs(as_array(y2) - want).max()


# ----------------------------------------------------------------------------- nothing to reduce


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_per_example_under_vmap_with_axis_name_equals_batched(masked, stats_path):
    """The per-example-gradient pattern: vmap over examples, statistics across the vmap axis.

    With a mask (some examples padding) flax returns NaN everywhere (a masked example's
    mean over no axis is 0/0, and pmean spreads it); normzoo counts each example by its
    mask, so the result equals the batched layer. Unmasked, both equal flax's.
    """
    x = make_x(shape=(8, 5))
    mask = jnp.asarray(np.arange(8) < 6)[:, None] if masked else None
    ours = normzoo.BatchNorm(use_running_average=False, axis_name="batch")
    theirs = nn.BatchNorm(use_running_average=False, axis_name="batch")
    v = perturbed(theirs.init(KEY, x))
    w = make_x(shape=(8, 5), seed=9)

    def per_example(layer, params, xi, wi, mi):
        y, upd = layer.apply({**v, "params": params}, xi, mask=mi, mutable=["batch_stats"])
        return jnp.sum(y * wi), (y, upd)

    def run(layer):
        f = jax.vmap(jax.value_and_grad(functools.partial(per_example, layer), has_aux=True),
                     in_axes=(None, 0, 0, 0 if masked else None), axis_name="batch")
        (_, (y, upd)), g = jax.jit(f)(v["params"], x, w, mask)
        return y, jax.tree.map(lambda a: a[0], upd), g

    y1, s1, g1 = run(ours)
    y2, s2, g2 = run(theirs)
    if masked:
        assert np.all(np.isnan(y2))
    else:
        assert_close(y1, y2, 1e-5)
        assert_close(s1, s2, 1e-6)
        assert_close(g1, g2, 1e-5)
    batched, upd = ours.clone(axis_name=None).apply(v, x, mask=mask, mutable=["batch_stats"])
    assert_close(y1, batched, 1e-5)
    assert_close(s1, upd, 1e-6)
    # per-example gradients of a batch-coupled layer: their sum is the batched gradient
    gb = jax.grad(lambda p: jnp.sum(ours.clone(axis_name=None).apply(
        {**v, "params": p}, x, mask=mask, mutable=["batch_stats"])[0] * w))(v["params"])
    assert_close(jax.tree.map(lambda a: a.sum(0), g1), gb, 1e-5)


def test_batch_norm_without_reduction_axes_on_one_example_as_flax():
    x = make_x(shape=(3,))
    for layer in (normzoo.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False)):
        y, upd = layer.apply(layer.init(KEY, x), x, mutable=["batch_stats"])
        np.testing.assert_array_equal(y, np.zeros(3))
        np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.01 * np.asarray(x), rtol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["var"], np.full(3, 0.99), rtol=1e-6)


def test_instance_norm_with_every_axis_a_feature_axis_returns_the_bias():
    x = make_x()
    v = perturbed(nn.InstanceNorm(feature_axes=(1, 2, 3)).init(KEY, x))
    y1 = normzoo.InstanceNorm(feature_axes=(1, 2, 3)).apply(v, x)
    y2 = nn.InstanceNorm(feature_axes=(1, 2, 3)).apply(v, x)
    np.testing.assert_array_equal(y1, np.broadcast_to(v["params"]["bias"], x.shape))
    assert_close(y1, y2, 1e-6)


def test_group_norm_per_example_with_negative_axes_equals_batched():
    x = make_x(shape=(5, 3, 4, 8))
    layer = normzoo.GroupNorm(num_groups=2, reduction_axes=(-3, -2, -1))
    v = perturbed(layer.init(KEY, x[0]))
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda xi: layer.apply(v, xi)))(x), layer.apply(v, x), atol=1e-5)
    assert_close(layer.apply(v, x), nn.GroupNorm(num_groups=2, reduction_axes=(-3, -2, -1)).apply(v, x), 1e-5)


def test_init_outside_a_mapped_context_ignores_axis_name_as_flax():
    x = make_x(shape=(2, 4))
    y1, v1 = normzoo.BatchNorm(use_running_average=False, axis_name="batch").init_with_output(KEY, x)
    y2, v2 = nn.BatchNorm(use_running_average=False, axis_name="batch").init_with_output(KEY, x)
    assert_close(y1, y2, 1e-6)
    assert_close(v1, v2, 0)


def test_masked_out_positions_holding_nan_do_not_reach_the_statistics(stats_path):
    """flax's mask tests put NaN where the mask is off; statistics and other outputs stay finite."""
    for name in NAMES:
        x = make_x()
        mask = make_mask(name)
        x = jnp.where(jnp.broadcast_to(mask, x.shape), x, jnp.nan)
        ours_cls, flax_cls, kw = PAIRS[name]
        kw = {**kw, "use_fast_variance": False}
        v = perturbed(flax_cls(**kw).init(KEY, x))
        (y1, s1), (y2, s2) = (cls(**kw).apply(v, x, mask=mask, mutable=["batch_stats"]) for cls in (ours_cls, flax_cls))
        keep = np.broadcast_to(np.asarray(mask), x.shape)
        assert np.all(np.isfinite(np.asarray(y1)[keep])), name
        assert_close(np.asarray(y1)[keep], np.asarray(y2)[keep], 1e-5)
        assert_close(s1, s2, 1e-6)


def test_a_feature_without_valid_elements_leaves_its_running_statistics_alone():
    """Documented improvement: flax returns NaN statistics for an all-masked channel."""
    x = make_x(shape=(6, 3))
    mask = jnp.asarray([True, True, False])
    v = normzoo.BatchNorm(use_running_average=False).init(KEY, x)
    y, upd = normzoo.BatchNorm(use_running_average=False).apply(v, x, mask=mask, mutable=["batch_stats"])
    _, flax_upd = nn.BatchNorm(use_running_average=False).apply(v, x, mask=mask, mutable=["batch_stats"])
    assert np.isnan(flax_upd["batch_stats"]["var"][2])
    assert upd["batch_stats"]["mean"][2] == 0.0 and upd["batch_stats"]["var"][2] == 1.0
    assert_close(upd["batch_stats"]["var"][:2], flax_upd["batch_stats"]["var"][:2], 1e-6)
    assert np.all(np.isfinite(y))


# ----------------------------------------------------------------------------- lifted transforms


class Block(nn.Module):
    """Dense, then every normalizer in turn (from normzoo or from flax), then relu."""

    lib: str
    synced: bool = False

    @nn.compact
    def __call__(self, x):
        mod = normzoo if self.lib == "normzoo" else nn
        x = nn.Dense(x.shape[-1])(x)
        for name in NAMES:
            kw = {**PAIRS[name][2], "use_fast_variance": False}
            if name == "BatchNorm" and self.synced:
                kw["axis_name"] = "batch"
            x = getattr(mod, name)(**kw)(x)
        return nn.relu(x)


class ScanBody(nn.Module):
    lib: str

    @nn.compact
    def __call__(self, carry, _):
        return Block(self.lib)(carry), None


class Lifted(nn.Module):
    """``transform`` applied to blocks holding every normalizer; input (batch, 4, 4, 4)."""

    transform: str
    lib: str

    @nn.compact
    def __call__(self, x):
        t, lib = self.transform, self.lib
        if t == "scan":
            scan = nn.scan(ScanBody, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, length=3)
            return scan(lib)(x, None)[0]
        if t == "vmap":  # an ensemble: one set of variables per member
            return nn.vmap(Block, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True})(lib)(x)
        if t == "vmap_synced":  # flax's test: shared variables, batch statistics over the vmap axis
            return nn.vmap(Block, variable_axes={"params": None, "batch_stats": None},
                           split_rngs={"params": False}, axis_name="batch")(lib, synced=True)(x)
        if t == "map_variables":  # (flax cannot map params while batch_stats are mutable)
            half = lambda v: jax.tree.map(lambda a: 0.5 * a, v)  # noqa: E731
            double = lambda v: jax.tree.map(lambda a: 2.0 * a, v)  # noqa: E731
            return nn.map_variables(Block, "batch_stats", half, double, init=True, mutable=True)(lib)(x)
        return {"remat": nn.remat, "jit": nn.jit}[t](Block)(lib)(x)


# jit, remat and map_variables only wrap the computation, vmap_synced includes vmap, and the
# per-example vmap with axis_name runs by default below: scan by default, the rest in the slow run.
@pytest.mark.parametrize("transform", some_slow(["scan", "remat", "vmap", "vmap_synced", "jit", "map_variables"],
                                                fast={"scan"}))
def test_lifted_transforms_behave_as_with_flax(transform):
    x = make_x(shape=(2, 3, 4, 4))
    models = Lifted(transform, "normzoo"), Lifted(transform, "flax")
    v = perturbed(jax.jit(models[1].init)(KEY, x))
    assert jax.tree.map(jnp.shape, jax.eval_shape(models[0].init, KEY, x)) == jax.tree.map(jnp.shape, v)

    def run(model):
        def loss(params, x):
            y, upd = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * jnp.cos(x)), (y, upd)

        (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v["params"], x)
        return y, s, g

    y2, s2, g2 = run(models[1])
    # normzoo on each statistics path where the transform reshapes the computation (jit and
    # map_variables only wrap it: the default path), flax once.
    for path in PATHS if transform in ("scan", "remat", "vmap", "vmap_synced") else (None,):
        with forced_path(path) if path else contextlib.nullcontext():
            y1, s1, g1 = run(models[0])
        assert_close(y1, y2, 1e-5)
        assert_close(s1, s2, 1e-6)
        assert_close(g1, g2, 1e-5)


# ----------------------------------------------------------------------------- introspection


class Net(nn.Module):
    """Two convolutions, one normalizer module called twice, as flax's summary tests do."""

    norm: type
    kw: dict

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = self.norm(**self.kw)
        x = norm(nn.Conv(4, (3, 3))(x))
        x = nn.Conv(4, (3, 3))(nn.relu(x))
        return nn.Dense(2)(norm(x).mean((1, 2)))


def _table(model, x, **options):
    text = nn.tabulate(model, KEY, console_kwargs={"force_terminal": False, "no_color": True, "width": 400},
                       **options)(x)
    rows = [ln for ln in text.splitlines() if "│" in ln or "┃" in ln]
    header = [c.strip() for c in re.split(r"[┃│]", rows[0])]
    keep = [i for i, c in enumerate(header) if c not in ("flops", "vjp_flops")]
    # flops depend on each library's op sequence; every other cell must be flax's.
    return [[c.strip() for j, c in enumerate(re.split(r"[┃│]", r)) if j in keep] for r in rows]


@pytest.mark.parametrize("name", some_slow(NAMES, fast={"BatchNorm"}))  # the other families with -m slow
def test_tabulate_rows_are_flax_rows(name):
    ours_cls, flax_cls, kw = PAIRS[name]
    x = make_x(shape=(2, 6, 6, 4))
    ours, theirs = Net(ours_cls, kw), Net(flax_cls, kw)
    default = [nn.tabulate(m, KEY, console_kwargs={"force_terminal": False, "width": 400})(x) for m in (ours, theirs)]
    assert default[0] == default[1]
    options = {"show_repeated": True, "compute_flops": True, "compute_vjp_flops": True, "mutable": True}
    assert _table(ours, x, **options) == _table(theirs, x, **options)
    assert _table(ours, x, depth=1, **options) == _table(theirs, x, depth=1, **options)
