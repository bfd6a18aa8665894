"""Test setup: 8 simulated CPU devices (set before JAX is imported)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(params=[True, False], ids=["checked-fast-sums", "shifted-sums"])
def stats_path(request, monkeypatch):
    """Both statistics paths: CPU's checked fast sums, and the shifted sums of other backends."""
    import normzoo

    monkeypatch.setattr(normzoo._stats, "checked_fast_sums", lambda: request.param)
    return request.param


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
