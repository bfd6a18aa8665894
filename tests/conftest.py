"""Test setup: 8 simulated CPU devices (set before JAX is imported), and the two statistics paths."""

import contextlib
import os
import re
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's processes (test workers, and the CIFAR
# example's subprocesses, which compile the same programs): keyed by the program, so a hit is
# always the same executable. A fresh clone (CI) starts it empty.
for _key, _value in (("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "normzoo-tests-jax-cache")),
                     ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                     ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
                     # JAX's default random-bit generator compiles slowly on XLA:CPU for kernels of
                     # rank > 1 (measured: 0.7-2 s per uniform of a 3x3xCxC kernel, 0.3 s with
                     # this setting), and every model's init pays it. Tests only need random
                     # inputs, not a particular stream: the CIFAR tests ran 183 s -> 93 s.
                     ("JAX_THREEFRY_PARTITIONABLE", "0")):
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def some_slow(values, fast, ids=None):
    """``values`` as test parameters, the ones not in ``fast`` marked slow (run with ``-m slow``):
    where cases exercise the same code, the default run keeps one of each kind."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), id=None if ids is None else ids(v),
                         marks=() if v in fast else pytest.mark.slow) for v in values]


def lowered_branches(fn, *args, key=None) -> int:
    """Number of data-dependent branches (``stablehlo.case``) in ``fn``'s lowered computation;
    ``key`` (a static argument ``fn`` ignores) keeps traces under different forced paths apart."""
    return jax.jit(fn, static_argnums=len(args)).lower(*args, key).as_text().count("stablehlo.case")


def _bn_step(x, key=None):
    import normzoo

    layer = normzoo.BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    return jax.grad(lambda x: jnp.sum(layer.apply(v, x, mutable=["batch_stats"])[0] ** 2))(x)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@contextlib.contextmanager
def forced_path(path):
    """Runs the body on one statistics path: ``"checked"`` (XLA:CPU's checked fast sums) or
    ``"shifted"`` (every other platform), forced here on the CPU.

    Asserts from the lowered computation that the forced path is the one compiled (the
    checked path branches on the data, the shifted one never does), and that the body
    really traced statistics through it.
    """
    from normzoo import _stats

    traced = []
    moments = _stats.local_moments

    def counting(*args, **kwargs):  # every statistic passes the forced path on from here
        traced.append(path)
        return moments(*args, **kwargs)

    # normzoo's jitted pieces take the forced path as a static argument, so nothing compiled
    # on the other path is reused; tests trace their own functions anew.
    with pytest.MonkeyPatch.context() as mp, _stats.statistics_path(path):
        mp.setattr(_stats, "local_moments", counting)
        branches = lowered_branches(_bn_step, jnp.ones((4, 3)), key=path)
        assert (branches > 0) == (path == "checked"), (path, branches)
        traced.clear()
        yield path
    assert traced, f"the test never traced the {path} statistics path"


PATHS = ("checked", "shifted")


@pytest.fixture(params=PATHS)
def stats_path(request):
    """Runs a test on both statistics paths (see :func:`forced_path`)."""
    with forced_path(request.param) as path:
        yield path


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# tests/test_flax_nnx_behaviours.py re-states flax.nnx's own tests as of flax 0.12.8, with the nnx API
# of that version (nnx.prefix, nnx.unpack, nnx.compat, nnx.with_attributes, graph_updates=, ...).
# With an older flax (CI's minimum-version run) a behaviour whose API that flax does not have yet
# is skipped, saying which; any other failure stays a failure.
_NEWER_NNX_API = re.compile(
    r"Module flax\.nnx has no attribute '\w+'"
    r"|got an unexpected keyword argument '(graph_updates|arrays)'"
    r"|module 'jax\.experimental\.hijax' has no attribute"
    r"|No RngStream named 'split' found in Rngs")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except (AttributeError, TypeError) as e:
        import flax

        written_for = (0, 12, 8)
        older = tuple(int(p) for p in flax.__version__.split(".")[:3]) < written_for
        if item.module.__name__.endswith("test_flax_nnx_behaviours") and older and _NEWER_NNX_API.search(str(e)):
            pytest.skip(f"flax {flax.__version__} predates this flax.nnx API ({e}); the behaviour is checked "
                        "with flax >= 0.12.8")
        raise
