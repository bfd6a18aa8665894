"""An sbx-style BatchRenorm written from sbx's published formula (``sbx/common/jax_layers.py``,
the layer CrossQ's critics use): the reference of ``tests/test_sbx.py`` and the baseline of
``benchmarks.rl``. Our own code for their algorithm, not a copy:

flax's batch statistics and normalization (its private ``_compute_stats`` and ``_normalize``, which
sbx calls; the fast variance by default); after ``warmup_steps`` steps, ``r = clip(sqrt(var_B + eps) /
sqrt(var + eps), 1/r_max, r_max)``, ``d = clip((mean_B - mean) / sqrt(var + eps), -d_max, d_max)``
(gradients stopped), then BatchNorm with the mean ``mean_B - d sqrt(var_B) / r`` and the variance
``var_B / r^2``; ``r_max``, ``d_max`` and ``steps`` live in ``batch_stats``.
"""

import flax.linen as nn
from flax.linen.normalization import _compute_stats, _normalize
import jax
import jax.numpy as jnp


class SbxStyle(nn.Module):
    """The reference: sbx's algorithm on flax's helpers (features on the last axis)."""

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-3
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x):
        axes = tuple(range(x.ndim - 1))
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(c, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(c, jnp.float32))
        r_max = self.variable("batch_stats", "r_max", lambda: 3)
        d_max = self.variable("batch_stats", "d_max", lambda: 5)
        steps = self.variable("batch_stats", "steps", lambda: 0)
        if self.use_running_average:
            m, v = ra_mean.value, ra_var.value
        else:
            mb, vb = _compute_stats(x, axes, dtype=None)
            m, v = mb, vb
            if not self.is_initializing():
                sd_run = jnp.sqrt(ra_var.value + self.epsilon)
                r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(vb + self.epsilon) / sd_run, 1 / r_max.value, r_max.value))
                d = jax.lax.stop_gradient(jnp.clip((mb - ra_mean.value) / sd_run, -d_max.value, d_max.value))
                on = jnp.greater_equal(steps.value, self.warmup_steps).astype(jnp.float32)
                m = on * (mb - d * jnp.sqrt(vb) / r) + (1 - on) * mb
                v = on * (vb / r**2) + (1 - on) * vb
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mb
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * vb
                steps.value = steps.value + 1
        return _normalize(self, x, m, v, axes, (x.ndim - 1,), None, jnp.float32, self.epsilon,
                          True, True, nn.initializers.zeros, nn.initializers.ones)
