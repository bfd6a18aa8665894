"""Layers built from the others: IBN."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from normzoo import functional as F
from normzoo._batch import BatchNorm, _BatchFields
from normzoo._sample import InstanceNorm
from normzoo._stats import AffineMap

Array = jax.Array


class IBN(_BatchFields):
    r"""Instance-Batch Normalization, IBN-a (Pan et al. 2018, arXiv:1807.09441).

    The first ``k = int(C * ratio)`` channels go through an affine :class:`InstanceNorm`
    (submodule ``IN``), the remaining ``C - k`` through :class:`BatchNorm` (submodule
    ``BN``, with all of BatchNorm's fields, ``axis_name`` included):

    .. math:: y = \mathrm{concat}\big(\mathrm{IN}(x_{[:k]}),\ \mathrm{BN}(x_{[k:]})\big)

    ``ratio=1`` is InstanceNorm, ``ratio=0`` is BatchNorm. Instance statistics remove
    appearance (style, contrast) variation; batch statistics keep content discrimination.
    IBN-Net uses it in the early stages only (see ``Normalizer.late_norm``).

    The two parts contribute only their maps (``affine_map``: statistics and parameters
    folded into ``y = (x - mean) * mul + add``); the maps are joined along the channels
    and applied in one pass over ``x``, so the activations are never split into copies and
    concatenated back (``benchmarks/README.md`` has the measured cost). The arithmetic is
    :func:`normzoo.functional.ibn`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
      >>> layer = normzoo.IBN(ratio=0.5, use_running_average=False)
      >>> y, v = layer.init_with_output(jax.random.key(1), x)
      >>> v['params']['IN']['scale'].shape, v['batch_stats']['BN']['mean'].shape
      ((4,), (4,))

    Attributes:
      ratio: (keyword-only) fraction of channels instance-normalized, in [0, 1] (default 0.5).
      epsilon: used by both parts.
      (others): as :class:`BatchNorm`; ``axis`` is the channel axis of both parts.
    """

    ratio: float = dataclasses.field(default=0.5, kw_only=True)

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        # The joined map of the two parts; updates BN's running statistics.
        def instance(part, mask, axis):
            return InstanceNorm(
                epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                use_bias=self.use_bias, use_scale=self.use_scale, bias_init=self.bias_init,
                scale_init=self.scale_init, feature_axes=axis,
                force_float32_reductions=self.force_float32_reductions, scale_plus_one=self.scale_plus_one, name="IN",
            ).affine_map(part, mask=mask)

        def batch(part, mask):
            fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(BatchNorm)
                      if f.name not in ("parent", "name")}
            return BatchNorm(**fields, name="BN").affine_map(part, use_running_average, mask=mask)

        return F._ibn_map(x, mask, self.ratio, self.axis, instance, batch)
