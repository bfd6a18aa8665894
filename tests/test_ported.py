"""FilterResponseNorm, GlobalResponseNorm, EvoNorm-S0 and EvoNorm-B0 (linen, nnx, functional)
against float64 NumPy references, timm's own PyTorch modules side by side (the torch extra), large
means, zero channels and the NNX twins."""

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
SHAPE = (6, 5, 4, 8)  # N, H, W, C (channels last)


def f64(a):
    return np.asarray(a, np.float64)


def _params(seed=1, c=8):
    r = np.random.default_rng(seed)
    return {k: r.uniform(0.5, 1.5, c).astype(np.float32) if k in ("scale", "v") else r.normal(0, 0.5, c).astype(np.float32)
            for k in ("scale", "bias", "v", "tau")}


# float64 references, channels last: one formula each
def frn_ref(x, p, eps=1e-5):
    x = f64(x)
    nu2 = (x**2).mean((1, 2), keepdims=True)
    return np.maximum(x / np.sqrt(nu2 + eps) * p["scale"] + p["bias"], p["tau"])


def grn_ref(x, p, eps=1e-6):
    x = f64(x)
    g = np.sqrt((x**2).sum((1, 2), keepdims=True))
    n = g / (g.mean(-1, keepdims=True) + eps)
    return x + p["scale"] * (x * n) + p["bias"]


def s0_ref(x, p, groups, eps=1e-5):
    x = f64(x)
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    std = np.sqrt(g.var((1, 2, 4), keepdims=True) + eps)
    std = np.broadcast_to(std, g.shape).reshape(x.shape)
    return x / (1 + np.exp(-f64(p["v"]) * x)) / std * p["scale"] + p["bias"]


def b0_ref(x, p, var=None, eps=1e-3):
    x = f64(x)
    batch_var = x.var((0, 1, 2)) if var is None else f64(var)
    left = np.sqrt(batch_var + eps)
    right = f64(p["v"]) * x + np.sqrt(x.var((1, 2), keepdims=True) + eps)
    return x / np.maximum(left, right) * p["scale"] + p["bias"]


@pytest.mark.parametrize("offset", some_slow([0.0, 1e4], fast={1e4}))
def test_functions_against_numpy(offset):
    x = (RNG.normal(size=SHAPE) * 2 + offset).astype(np.float32)
    p = _params()
    tol = dict(rtol=2e-4, atol=2e-4) if offset else dict(rtol=1e-5, atol=1e-5)
    jp = {k: jnp.asarray(v) for k, v in p.items()}
    np.testing.assert_allclose(F.filter_response_norm(x, jp["scale"], jp["bias"], jp["tau"]), frn_ref(x, p), **tol)
    # GRN's output is x plus a correction: compare the correction, relative to its size.
    got = f64(F.global_response_norm(x, jp["scale"], jp["bias"])) - f64(x)
    np.testing.assert_allclose(got, grn_ref(x, p) - f64(x), rtol=1e-4, atol=1e-3 if offset else 1e-5)
    np.testing.assert_allclose(F.evonorm_s0(x, jp["scale"], jp["bias"], jp["v"], num_groups=4), s0_ref(x, p, 4), **tol)
    y, var = F.evonorm_b0(x, jnp.ones(8), jp["scale"], jp["bias"], jp["v"], training=True, momentum=0.9)
    np.testing.assert_allclose(y, b0_ref(x, p), **tol)
    np.testing.assert_allclose(var, 0.9 + 0.1 * f64(x).var((0, 1, 2)), rtol=1e-5)
    y_eval, same = F.evonorm_b0(x, jnp.full(8, 3.0), jp["scale"], jp["bias"], jp["v"], training=False)
    np.testing.assert_allclose(y_eval, b0_ref(x, p, var=np.full(8, 3.0)), **tol)
    np.testing.assert_array_equal(same, 3.0)


@pytest.mark.slow  # four layers' gradients at a dead channel
def test_a_zero_channel_gives_finite_values_and_gradients():
    x = RNG.normal(size=SHAPE).astype(np.float32)
    x[..., 2] = 0.0  # a dead (ReLU) channel
    x = jnp.asarray(x)
    for f in (lambda x: F.global_response_norm(x, jnp.ones(8)), lambda x: F.filter_response_norm(x, tau=jnp.zeros(8)),
              lambda x: F.evonorm_s0(x, v=jnp.ones(8), num_groups=4),
              lambda x: F.evonorm_b0(x, jnp.ones(8), v=jnp.ones(8), training=True)[0]):
        y, g = f(x), jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)
        assert bool(jnp.isfinite(y).all()) and bool(jnp.isfinite(g).all())


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"filter_response_norm: x has shape \(3,\); it needs a batch axis and a channel "
                                         r"axis \(last\)"):
        F.filter_response_norm(jnp.ones(3))
    with pytest.raises(ValueError, match=r"evonorm_b0: training=False normalizes by the running variance, but `var` is None"):
        F.evonorm_b0(jnp.ones((2, 3, 4)), v=jnp.ones(4), training=False)
    with pytest.raises(ValueError, match=r"evonorm_s0: `v` has shape \(3,\)"):
        F.evonorm_s0(jnp.ones((2, 3, 4)), v=jnp.ones(3), num_groups=2)


LINEN = {  # name -> (linen layer, its nnx twin's keywords, call keywords)
    "FilterResponseNorm": (normzoo.FilterResponseNorm(), {}, {}),
    "GlobalResponseNorm": (normzoo.GlobalResponseNorm(), {}, {}),
    "EvoNormS0": (normzoo.EvoNormS0(num_groups=4), {"num_groups": 4}, {}),
    "EvoNormB0": (normzoo.EvoNormB0(), {}, {"use_running_average": False}),
}


@pytest.mark.parametrize("name", some_slow(list(LINEN), fast={"EvoNormB0", "FilterResponseNorm"}))
def test_layers_compute_their_function_and_the_nnx_twin_agrees(name):
    layer, nnx_kw, call = LINEN[name]
    x = jnp.asarray(RNG.normal(size=SHAPE) * 2 + 1, jnp.float32)
    v = layer.init(jax.random.key(0), x, **call)
    v = {**v, "params": jax.tree.map(lambda a: a + 0.25, v["params"])}
    y, updates = layer.apply(v, x, mutable=["batch_stats"], **call)
    p = {k: np.asarray(a) for k, a in v["params"].items()}
    want = {"FilterResponseNorm": lambda: frn_ref(x, p), "GlobalResponseNorm": lambda: grn_ref(x, p),
            "EvoNormS0": lambda: s0_ref(x, p, 4), "EvoNormB0": lambda: b0_ref(x, p)}[name]()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    twin = getattr(nznnx, name)(8, **nnx_kw, rngs=nnx.Rngs(0))
    nznnx.from_linen(twin, v)
    np.testing.assert_allclose(twin(x), y, rtol=1e-6, atol=1e-6)
    if name == "EvoNormB0":
        np.testing.assert_allclose(twin.var[...], updates["batch_stats"]["var"], rtol=1e-6)
        np.testing.assert_allclose(updates["batch_stats"]["var"], 0.99 + 0.01 * f64(x).var((0, 1, 2)), rtol=1e-5)


def _timm():
    torch = pytest.importorskip("torch", reason="optional: pip install 'normzoo[torch]' runs the side-by-side tests")
    from examples.porting.torch_models import torchvision_models

    try:
        torchvision_models()  # timm imports torchvision; where its compiled operators do not load, without them
        import timm  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("optional: timm is not installed (pip install 'normzoo[torch]')")
    return torch


def _nchw(a):
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1))


@pytest.mark.parametrize("name", LINEN)
def test_side_by_side_with_timm(name):
    """timm's module and ours on the same input and parameters: outputs, input gradients and
    (EvoNorm-B0) the running variance, in training and at inference."""
    torch = _timm()
    from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d
    from timm.layers.grn import GlobalResponseNorm

    theirs = {"FilterResponseNorm": lambda: FilterResponseNormTlu2d(8), "GlobalResponseNorm":
              lambda: GlobalResponseNorm(8, channels_last=False), "EvoNormS0": lambda: EvoNorm2dS0(8, groups=4),
              "EvoNormB0": lambda: EvoNorm2dB0(8, momentum=0.1)}[name]()
    layer, _, call = LINEN[name]
    x = (RNG.normal(size=SHAPE) * 2 + 1).astype(np.float32)
    v = layer.init(jax.random.key(0), x, **call)
    v = {**v, "params": jax.tree.map(lambda a: a + jnp.linspace(0.1, 0.4, a.size).reshape(a.shape), v["params"])}
    torch_names = {"scale": "weight", "bias": "bias", "v": "v", "tau": "tau"}
    with torch.no_grad():
        for ours_name, value in v["params"].items():
            getattr(theirs, torch_names[ours_name]).copy_(torch.from_numpy(np.array(value)))
    # deploy.from_torch / to_torch carry the state both ways (the running variance as stored).
    import flax.linen as nn

    from normzoo import deploy

    state = {k: t.numpy() for k, t in torch.nn.Sequential(theirs).state_dict().items()}
    template = nn.Sequential([layer]).init(jax.random.key(0), x, **call)
    ported = deploy.from_torch(state, template, {"0": "layers_0"})
    want = {c: {"layers_0": dict(t)} for c, t in v.items()}
    jax.tree.map(np.testing.assert_array_equal, ported, want)
    back = deploy.to_torch(ported, {"0": "layers_0"})
    assert list(back) == list(state)
    jax.tree.map(np.testing.assert_array_equal, back, state)
    for training in (True, False):
        theirs.train(training)
        if hasattr(theirs, "running_var"):  # at inference both normalize by the same running variance
            with torch.no_grad():
                theirs.running_var.copy_(torch.from_numpy(np.array(v["batch_stats"]["var"]) + 0.5))
            v = {**v, "batch_stats": {"var": jnp.asarray(theirs.running_var.numpy())}}
        xt = torch.from_numpy(_nchw(x)).requires_grad_(True)
        yt = theirs(xt)
        (yt**2).sum().backward()
        kw = {"use_running_average": not training} if name == "EvoNormB0" else {}
        f = lambda x: layer.apply(v, x, mutable=["batch_stats"], **kw)  # noqa: E731
        (y, updates), pullback = jax.vjp(f, jnp.asarray(x))
        (gx,) = pullback((2 * y, jax.tree.map(jnp.zeros_like, updates)))
        np.testing.assert_allclose(_nchw(y), yt.detach().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_nchw(gx), xt.grad.numpy(), rtol=1e-3, atol=1e-3)
        if name == "EvoNormB0" and training:
            # timm stores 0.9 r + 0.1 var n/(n-1) (unbiased); normzoo 0.99 r + 0.01 var (biased, flax's momentum)
            n, r = x.size // 8, f64(v["batch_stats"]["var"])
            batch = (theirs.running_var.numpy() - 0.9 * r) / 0.1 * (n - 1) / n
            np.testing.assert_allclose(updates["batch_stats"]["var"], 0.99 * r + 0.01 * batch, rtol=1e-5)
