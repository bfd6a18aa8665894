"""Test setup: 8 simulated CPU devices and a shared compilation cache (set before JAX is imported)."""

import os
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
                     ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def lowered_branches(fn, *args) -> int:
    """Number of branches (``stablehlo.case``) in ``fn``'s lowered computation."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.case")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
