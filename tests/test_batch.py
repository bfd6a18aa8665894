"""BatchNorm, BatchRenorm and MeanOnlyBatchNorm against NumPy references."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests import reference as ref
from tests.conftest import forced_path, some_slow

CASES = {
    "normal": lambda r, s: r.normal(size=s) * 2.0 + 0.5,
    "large_mean": lambda r, s: r.normal(size=s) + 1e4,
    "constant_channel": lambda r, s: np.concatenate(
        [np.full(s[:-1] + (1,), 3.25), r.normal(size=s[:-1] + (s[-1] - 1,))], -1
    ),
}
TOL = {"normal": 2e-5, "large_mean": 2e-3, "constant_channel": 2e-5}


def make_input(case, shape, seed=0):
    return np.asarray(CASES[case](np.random.default_rng(seed), shape), np.float32)


def train_apply(layer, variables, x, **kw):
    return layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"], **kw)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape,axis", [((16, 5, 5, 4), -1), ((32, 6), -1), ((8, 3, 7), 1)])
def test_batch_norm_matches_reference(case, shape, axis, stats_path):
    # Build features-last, then move the feature axis into place.
    last = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:] + (shape[axis],)
    x = np.ascontiguousarray(np.moveaxis(make_input(case, last), -1, axis))
    layer = normzoo.BatchNorm(axis=axis, epsilon=1e-5)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    y, _ = jax.jit(lambda v, x: train_apply(layer, v, x))(variables, x)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    want = ref.batch_norm(x, axes, 1e-5)
    np.testing.assert_allclose(y, want, atol=TOL[case], rtol=0)
    assert np.all(np.isfinite(y))
    if case == "constant_channel":
        assert np.all(np.take(np.asarray(y), 0, axis=axis) == 0.0)


def test_large_mean_within_1e_2_of_float64():
    """The core issue's bar: x ~ N(1e4, 1) in float32 within 1e-2 of a float64 reference."""
    x = make_input("large_mean", (128, 8, 8, 16), seed=3)
    layer = normzoo.BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    y, upd = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))(v, x)
    err = np.abs(np.asarray(y, np.float64) - ref.batch_norm(x, (0, 1, 2), 1e-5)).max()
    assert err < 1e-2
    var64 = ref.f64(x).var((0, 1, 2))
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.99 + 0.01 * var64, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 3])
def test_running_statistics_update(steps, stats_path):
    layer = normzoo.BatchNorm(momentum=0.9)
    xs = [make_input("normal", (12, 3, 3, 4), seed=s) for s in range(steps)]
    variables = layer.init(jax.random.key(0), xs[0], use_running_average=False)
    assert np.all(variables["batch_stats"]["mean"] == 0) and np.all(variables["batch_stats"]["var"] == 1)
    mean, var = np.zeros(4), np.ones(4)
    for x in xs:
        _, upd = train_apply(layer, variables, x)
        variables = {**variables, **upd}
        mean = 0.9 * mean + 0.1 * ref.f64(x).mean((0, 1, 2))
        var = 0.9 * var + 0.1 * ref.f64(x).var((0, 1, 2))
    np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variables["batch_stats"]["var"], var, rtol=1e-6, atol=1e-7)


def test_eval_mode_uses_running_statistics():
    x = make_input("normal", (6, 5))
    layer = normzoo.BatchNorm(use_running_average=True, epsilon=1e-3)
    v = layer.init(jax.random.key(0), x)
    stats = {"mean": jnp.arange(5.0), "var": jnp.arange(1.0, 6.0)}
    params = {"scale": jnp.linspace(0.5, 2, 5), "bias": jnp.linspace(-1, 1, 5)}
    y, upd = layer.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    want = (ref.f64(x) - np.arange(5.0)) / np.sqrt(np.arange(1.0, 6.0) + 1e-3) * np.linspace(0.5, 2, 5) + np.linspace(-1, 1, 5)
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_array_equal(upd["batch_stats"]["mean"], stats["mean"])
    assert v["batch_stats"]["var"].dtype == jnp.float32


def test_init_leaves_running_statistics_untouched():
    x = make_input("large_mean", (4, 3))
    v = normzoo.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))


def _bn_input_grad(x, g, axes, eps, scale):
    """Analytic BatchNorm backward (Ioffe & Szegedy eq. in sec. 3), float64."""
    x, g = ref.f64(x), ref.f64(g) * scale
    xhat = ref.batch_norm(x, axes, eps)
    inv = 1 / np.sqrt(x.var(axes, keepdims=True) + eps)
    return inv * (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))


@pytest.mark.parametrize("case", ["normal", "large_mean"])
def test_gradients_match_reference(case, stats_path):
    x = make_input(case, (10, 4, 3))
    w = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    layer = normzoo.BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    params = {"scale": jnp.array([0.5, 1.5, 2.0]), "bias": jnp.array([0.1, 0.2, 0.3])}

    def loss(params, x):
        y, _ = layer.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
        return jnp.sum(y * w)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    xhat = ref.batch_norm(x, (0, 1), 1e-5)
    np.testing.assert_allclose(gp["bias"], ref.f64(w).sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(gp["scale"], (xhat * w).sum((0, 1)), atol=5e-3 if case == "large_mean" else 1e-4)
    want = _bn_input_grad(x, w, (0, 1), 1e-5, np.array([0.5, 1.5, 2.0]))
    np.testing.assert_allclose(gx, want, atol=5e-4 if case == "large_mean" else 2e-5)


@pytest.mark.parametrize("sigmas", [0.0, 3.5, 4.5, 1e4])
def test_both_statistics_paths_on_both_sides_of_the_4_sigma_check(stats_path, sigmas):
    """Means at 3.5 and 4.5 standard deviations sit either side of the fast path's check.

    ``stats_path`` also forces the shifted sums that non-CPU backends use, so both paths
    are held to the same float64 reference, values and gradients, mask included.
    """
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(24, 5, 3)) * 0.5 + 0.5 * sigmas).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    mask = np.ones((24, 1, 1), bool)
    mask[20:] = False
    x[20:] = -3e5  # padding far from everything must not matter
    layer = normzoo.BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    scale = np.array([0.5, 1.5, 2.0], np.float32)

    def loss(x):
        y, upd = layer.apply(
            {"params": {"scale": scale, "bias": np.zeros(3, np.float32)}, "batch_stats": v["batch_stats"]},
            x, mask=mask, mutable=["batch_stats"],
        )
        return jnp.sum(jnp.where(mask, y * w, 0)), (y, upd)

    (_, (y, upd)), gx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    xv, wv = x[:20], w[:20]
    atol = 2e-3 if sigmas > 100 else 2e-5
    np.testing.assert_allclose(np.asarray(y)[:20], ref.batch_norm(xv, (0, 1), 1e-5) * scale, atol=atol)
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], 0.99 + 0.01 * ref.f64(xv).var((0, 1)), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(gx)[:20], _bn_input_grad(xv, wv, (0, 1), 1e-5, scale),
                               atol=5e-4 if sigmas > 100 else 5e-5)
    np.testing.assert_array_equal(np.asarray(gx)[20:], 0.0)


def test_mask_excludes_padded_examples(stats_path):
    x = make_input("normal", (8, 4, 3))
    x[5:] = 1e6  # padding garbage must not leak into the statistics
    mask = np.zeros((8, 1, 1), bool)
    mask[:5] = True
    layer = normzoo.BatchNorm(use_running_average=False, momentum=0.0)
    v = layer.init(jax.random.key(0), x)
    y, upd = layer.apply(v, x, mask=jnp.asarray(mask), mutable=["batch_stats"])
    want, mu, var = ref.masked_batch_norm(x, mask, (0, 1), 1e-5)
    np.testing.assert_allclose(np.asarray(y)[:5], want[:5], atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mu.ravel(), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var.ravel(), rtol=1e-5)


def test_bfloat16_output_float32_statistics():
    x = jnp.asarray(make_input("large_mean", (16, 4, 4, 8)), jnp.bfloat16)
    layer = normzoo.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    v = layer.init(jax.random.key(0), x)
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert upd["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(y, np.float32), ref.batch_norm(np.asarray(x, np.float32), (0, 1, 2), 1e-5), atol=0.05
    )


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_same_as_flax_with_swapped_variables(use_fast_variance):
    """Variables are interchangeable with flax.linen.BatchNorm and results agree."""
    x = make_input("normal", (16, 4, 4, 6))
    ours = normzoo.BatchNorm(momentum=0.8, use_running_average=False)
    theirs = nn.BatchNorm(momentum=0.8, use_running_average=False, use_fast_variance=use_fast_variance)
    v_theirs = theirs.init(jax.random.key(0), x)
    v_ours = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(v_theirs) == jax.tree.structure(v_ours)
    params = {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1, 1, 6)}
    v = {"params": params, "batch_stats": v_theirs["batch_stats"]}
    y1, u1 = ours.apply(v, x, mutable=["batch_stats"])
    y2, u2 = theirs.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(u1["batch_stats"][k], u2["batch_stats"][k], atol=1e-6)
    e1 = ours.clone(use_running_average=True).apply(u1 | {"params": params}, x)
    e2 = theirs.clone(use_running_average=True).apply(u1 | {"params": params}, x)
    np.testing.assert_allclose(e1, e2, atol=1e-5)


# ----------------------------------------------------------------------------- BatchRenorm


def test_renorm_with_unit_bounds_equals_batch_norm(stats_path):
    x = make_input("normal", (12, 3, 3, 5))
    bn = normzoo.BatchNorm(use_running_average=False)
    brn = normzoo.BatchRenorm(use_running_average=False, r_max=1.0, d_max=0.0, warmup_steps=0)
    vb = bn.init(jax.random.key(0), x)
    stats = {"mean": jnp.full(5, 3.0), "var": jnp.full(5, 9.0), "steps": jnp.array(7, jnp.int32)}
    y1, u1 = bn.apply(vb, x, mutable=["batch_stats"])
    y2, u2 = brn.apply({"params": vb["params"], "batch_stats": stats}, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, atol=1e-6)
    g1 = jax.grad(lambda x: jnp.sum(bn.apply(vb, x, mutable=["batch_stats"])[0] ** 3))(x)
    g2 = jax.grad(
        lambda x: jnp.sum(brn.apply({"params": vb["params"], "batch_stats": stats}, x, mutable=["batch_stats"])[0] ** 3)
    )(x)
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    assert int(u2["batch_stats"]["steps"]) == 8


@pytest.mark.parametrize("case", ["normal", "large_mean"])
def test_renorm_matches_reference_and_r_d_carry_no_gradient(case, stats_path):
    x = make_input(case, (16, 4, 3))
    ra_mean = np.float32(x.mean((0, 1))) + np.array([0.3, -2.0, 0.0], np.float32)
    ra_var = np.array([0.5, 4.0, 1.2], np.float32) * x.var((0, 1)).astype(np.float32)
    layer = normzoo.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5, warmup_steps=0)
    v = layer.init(jax.random.key(0), x)
    stats = {"mean": jnp.asarray(ra_mean), "var": jnp.asarray(ra_var), "steps": jnp.array(0, jnp.int32)}
    w = np.random.default_rng(2).normal(size=x.shape)

    def f(x):
        y, _ = layer.apply({"params": v["params"], "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(y * w), y

    (_, y), gx = jax.value_and_grad(f, has_aux=True)(x)
    want = ref.batch_renorm(x, (0, 1), 1e-5, ra_mean, ra_var, 1.5, 0.5)
    np.testing.assert_allclose(y, want, atol=TOL[case])
    # With r, d constants the backward is BatchNorm's scaled by r.
    sb = np.sqrt(ref.f64(x).var((0, 1)) + 1e-5)
    r = np.clip(sb / np.sqrt(ref.f64(ra_var) + 1e-5), 1 / 1.5, 1.5)
    np.testing.assert_allclose(gx, r * _bn_input_grad(x, w, (0, 1), 1e-5, 1.0), atol=5e-4 if case == "large_mean" else 2e-5)


@pytest.mark.parametrize("schedule", ["linear", "step"])
def test_renorm_warmup_relaxes_bounds_on_schedule(schedule, stats_path):
    x = make_input("normal", (32, 2)) * 5.0  # batch std ~10: r wants to be ~10 against var=1
    layer = normzoo.BatchRenorm(use_running_average=False, r_max=3.0, d_max=0.0, warmup_steps=4, momentum=1.0,
                                warmup_schedule=schedule)
    v = layer.init(jax.random.key(0), x)
    sb = np.sqrt(ref.f64(x).var(0) + 1e-5)
    for step in range(6):
        v = {**v, "batch_stats": {**v["batch_stats"], "steps": jnp.array(step, jnp.int32)}}
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        # The paper relaxes r_max linearly from 1 to 3 over 4 steps; CrossQ / sbx switch at step 4.
        r_max = 1 + 2.0 * (min(step / 4, 1.0) if schedule == "linear" else float(step >= 4))
        want = ref.batch_norm(x, (0,), 1e-5) * np.clip(sb / np.sqrt(1 + 1e-5), 1 / r_max, r_max)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        assert int(upd["batch_stats"]["steps"]) == step + 1


def test_renorm_eval_equals_batch_norm_eval():
    x = make_input("normal", (5, 4))
    stats = {"mean": jnp.arange(4.0), "var": jnp.arange(1.0, 5.0)}
    y1 = normzoo.BatchNorm(use_running_average=True).apply({"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, "batch_stats": stats}, x)
    y2 = normzoo.BatchRenorm(use_running_average=True).apply(
        {"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, "batch_stats": {**stats, "steps": jnp.array(3)}}, x
    )
    np.testing.assert_array_equal(y1, y2)


# ----------------------------------------------------------------------------- ghost batches


def test_virtual_batch_size_matches_reference(stats_path):
    x = make_input("normal", (12, 3, 4), seed=5)
    layer = normzoo.BatchNorm(use_running_average=False, virtual_batch_size=4, momentum=0.5)
    v = layer.init(jax.random.key(0), x)
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    ghosts = x.reshape(3, 4, 3, 4)
    want = np.concatenate([ref.batch_norm(g, (0, 1), 1e-5) for g in ghosts])
    np.testing.assert_allclose(y, want, atol=2e-5)
    means = np.mean([ref.f64(g).mean((0, 1)) for g in ghosts], 0)
    vars_ = np.mean([ref.f64(g).var((0, 1)) for g in ghosts], 0)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.5 * means, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.5 + 0.5 * vars_, rtol=1e-6)


# ----------------------------------------------------------------------------- mean-only


def test_mean_only_batch_norm(stats_path):
    x = make_input("normal", (7, 3))
    layer = normzoo.MeanOnlyBatchNorm(momentum=0.0)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref.f64(x) - ref.f64(x).mean(0), atol=1e-6)
    assert set(upd["batch_stats"]) == {"mean"} and set(v["params"]) == {"bias"}
    y_eval = layer.apply({**v, **upd}, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, y, atol=1e-6)


# ----------------------------------------------------------------------------- output map


def _map_case(kind, rng):
    x = rng.normal(size=(6, 3, 4, 5)) + 1.0
    per_channel = lambda: rng.normal(size=(1, 1, 1, 5))  # noqa: E731
    if kind == "per_example":  # ghost batches and IBN's instance part
        mean, mul = rng.normal(size=(6, 1, 1, 5)), rng.normal(size=(6, 1, 1, 5))
    else:
        mean, mul = per_channel(), per_channel()
    add = None if kind == "no_add" else per_channel()
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    return f32(x), f32(mean), f32(mul), f32(add)


@pytest.mark.parametrize("small_mean", [None, True, False])
@pytest.mark.parametrize("kind", ["per_channel", "per_example", "no_add"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_affine_map_value_and_backward_equal_its_formula(kind, small_mean, dtype):
    x, mean, mul, add = _map_case(kind, np.random.default_rng(11))
    x = x.astype(dtype)
    flag = None if small_mean is None else jnp.asarray(small_mean)

    def ours(x, mean, mul, add):
        return normzoo._stats.AffineMap(mean, mul, add, dtype, flag)(x)

    def formula(x, mean, mul, add):
        y = (x.astype(jnp.float32) - mean) * mul
        return (y if add is None else y + add).astype(dtype)

    dy = jnp.asarray(np.random.default_rng(12).normal(size=x.shape), dtype)
    y1, vjp1 = jax.vjp(ours, x, mean, mul, add)
    y2, vjp2 = jax.vjp(formula, x, mean, mul, add)
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32),
                               rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6, atol=1e-6)
    for got, want in zip(jax.tree.leaves(vjp1(dy)), jax.tree.leaves(vjp2(dy)), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2 if dtype == jnp.bfloat16 else 2e-5, atol=1e-4)


def test_affine_map_small_mean_flag_selects_the_backward_formula():
    """With x ~ N(1e4, 1) the shortcut's sum(dy x) - mean sum(dy) cancels. On the checked path
    (XLA:CPU) the flag must steer; the shifted path (every other platform) always centres first,
    so there the flag changes nothing (on a GPU XLA may also reassociate the shortcut: measured on
    an H200, both gave the careful result)."""
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(256, 4)) + 1e4, jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    mean = jnp.mean(x, 0, keepdims=True)
    exact = (np.asarray(dy, np.float64) * (np.asarray(x, np.float64) - np.asarray(mean, np.float64))).sum(0)

    def error(flag, path):
        f = lambda mul: normzoo._stats.AffineMap(mean, mul, None, jnp.float32, jnp.asarray(flag))(x)  # noqa: E731
        with normzoo._stats.statistics_path(path):
            got = np.asarray(jax.vjp(f, jnp.ones((1, 4), jnp.float32))[1](dy)[0]).ravel()
        return np.abs(got - exact).max()

    careful = error(False, "checked")
    assert careful < 1e-3 * np.abs(exact).max()
    if jax.default_backend() == "cpu":  # where the shortcut is computed as written
        assert error(True, "checked") > 100 * careful
    assert error(True, "shifted") < 1e-3 * np.abs(exact).max()
    assert error(False, "shifted") < 1e-3 * np.abs(exact).max()


# One batch-statistics case by default; the other path and the per-example layers in the slow run.
@pytest.mark.parametrize("name,path", some_slow([("batch", "checked"), ("batch", "shifted"), ("instance", None),
                                                 ("group", None), ("layer", None)],
                                                fast={("batch", "checked")}))
def test_forward_over_reverse_hessian_vector_product_matches_flax(name, path):
    """Forward mode works through the checked statistics (custom_jvp, lax.cond) as through flax."""
    ours, theirs = {
        "batch": (normzoo.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False)),
        "instance": (normzoo.InstanceNorm(), nn.InstanceNorm()),
        "group": (normzoo.GroupNorm(num_groups=2), nn.GroupNorm(num_groups=2)),
        "layer": (normzoo.LayerNorm(), nn.LayerNorm()),
    }[name]
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.normal(size=(6, 3, 3, 4)) * 2 + 1, jnp.float32)
    t = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def hvp(layer):
        v = layer.init(jax.random.key(0), x)
        loss = lambda x: jnp.sum(jnp.tanh(layer.apply(v, x, mutable=["batch_stats"])[0]) * w)  # noqa: E731
        return jax.jvp(jax.grad(loss), (x,), (t,))[1]

    with forced_path(path) if path else contextlib.nullcontext():  # BatchNorm on both paths
        np.testing.assert_allclose(hvp(ours), hvp(theirs), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- complex inputs


def _complex_input(shape, seed=0):
    r = np.random.default_rng(seed)
    return (r.normal(size=shape) + 1.0 + 1j * (r.normal(size=shape) * 2 - 0.5)).astype(np.complex64)


@pytest.mark.parametrize("case", ["renorm", "mean_only", "ghost", "ibn"])
def test_complex_inputs_in_the_batch_family(case, stats_path):
    """Complex mean, real variance E|x - mean|^2 (flax's definition) in every batch layer;
    BatchRenorm clips d in magnitude."""
    x = _complex_input((8, 3, 3, 4))
    xf = x.astype(np.complex128)
    axes = (0, 1, 2)
    layer = {
        "renorm": normzoo.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5, warmup_steps=0, momentum=0.5),
        "mean_only": normzoo.MeanOnlyBatchNorm(use_running_average=False, momentum=0.5),
        "ghost": normzoo.BatchNorm(use_running_average=False, virtual_batch_size=4, momentum=0.5),
        "ibn": normzoo.IBN(use_running_average=False, momentum=0.5),
    }[case]
    v = layer.init(jax.random.key(0), x)
    if case == "renorm":
        v = {**v, "batch_stats": {"mean": jnp.asarray([0.0, 1.0, 2.0, 3.0], jnp.float32),
                                  "var": jnp.asarray([0.5, 1.0, 2.0, 9.0], jnp.float32),
                                  "steps": jnp.array(0, jnp.int32)}}
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    assert y.dtype == jnp.complex64
    mean = xf.mean(axes)
    var = (np.abs(xf - mean) ** 2).mean(axes)
    if case == "renorm":
        ra_mean, ra_var = np.asarray(v["batch_stats"]["mean"], np.float64), np.asarray(v["batch_stats"]["var"], np.float64)
        sb, s = np.sqrt(var + 1e-5), np.sqrt(ra_var + 1e-5)
        r = np.clip(sb / s, 1 / 1.5, 1.5)
        d = (mean - ra_mean) / s
        d = np.where(np.abs(d) > 0.5, d * 0.5 / np.abs(d), d)
        want = (xf - mean) / sb * r + d
        stats = {"mean": 0.5 * ra_mean + 0.5 * mean, "var": 0.5 * ra_var + 0.5 * var, "steps": 1}
    elif case == "mean_only":
        want = xf - mean
        stats = {"mean": 0.5 * mean}
    elif case == "ghost":
        g = xf.reshape(2, 4, 3, 3, 4)
        gm = g.mean((1, 2, 3), keepdims=True)
        gv = (np.abs(g - gm) ** 2).mean((1, 2, 3), keepdims=True)
        want = ((g - gm) / np.sqrt(gv + 1e-5)).reshape(xf.shape)
        stats = {"mean": 0.5 * gm.mean(0).ravel(), "var": 0.5 + 0.5 * gv.mean(0).ravel()}
    else:
        inst_m = xf[..., :2].mean((1, 2), keepdims=True)
        inst_v = (np.abs(xf[..., :2] - inst_m) ** 2).mean((1, 2), keepdims=True)
        bm, bv = mean[2:], var[2:]
        want = np.concatenate([(xf[..., :2] - inst_m) / np.sqrt(inst_v + 1e-5), (xf[..., 2:] - bm) / np.sqrt(bv + 1e-5)], -1)
        stats = {"BN": {"mean": 0.5 * bm, "var": 0.5 + 0.5 * bv}}
    np.testing.assert_allclose(y, want, atol=2e-5)
    jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6), upd["batch_stats"], stats)
    for path, leaf in jax.tree_util.tree_flatten_with_path(upd["batch_stats"])[0]:
        want_dtype = {"mean": jnp.complex64, "var": jnp.float32, "steps": jnp.int32}[path[-1].key]
        assert leaf.dtype == want_dtype, (path, leaf.dtype)
