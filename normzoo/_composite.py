"""Layers built from the others: IBN."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from normzoo import _stats
from normzoo._batch import BatchNorm, _BatchFamily
from normzoo._sample import InstanceNorm

Array = jax.Array


class IBN(_BatchFamily):
    r"""Instance-Batch Normalization, IBN-a (Pan et al. 2018, arXiv:1807.09441).

    The first ``k = int(C * ratio)`` channels go through an affine :class:`InstanceNorm`
    (submodule ``IN``), the remaining ``C - k`` through :class:`BatchNorm` (submodule
    ``BN``, with all of BatchNorm's fields, ``axis_name`` included):

    .. math:: y = \mathrm{concat}\big(\mathrm{IN}(x_{[:k]}),\ \mathrm{BN}(x_{[k:]})\big)

    ``ratio=1`` is InstanceNorm, ``ratio=0`` is BatchNorm. Instance statistics remove
    appearance (style, contrast) variation; batch statistics keep content discrimination.
    IBN-Net uses it in the early stages only (see ``Normalizer.late_norm``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
      >>> layer = normzoo.IBN(ratio=0.5, use_running_average=False)
      >>> y, v = layer.init_with_output(jax.random.key(1), x)
      >>> v['params']['IN']['scale'].shape, v['batch_stats']['BN']['mean'].shape
      ((4,), (4,))

    Attributes:
      ratio: fraction of channels instance-normalized, in [0, 1] (default 0.5).
      epsilon: used by both halves.
      (others): as :class:`BatchNorm`; ``axis`` is the channel axis of both halves.
    """

    ratio: float = 0.5

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes the first ``int(C * ratio)`` channels per instance, the rest per batch."""
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(
                f"IBN: ratio={self.ratio!r} must lie in [0, 1] (the fraction of channels that "
                "are instance-normalized; 0 is BatchNorm, 1 is InstanceNorm)."
            )
        if not isinstance(self.axis, int):
            raise ValueError(f"IBN: axis={self.axis!r} must be a single int (the channel axis).")
        (axis,) = _stats.canonicalize_axes(x.ndim, self.axis, argument="axis", layer="IBN")
        k = int(x.shape[axis] * self.ratio)
        if mask is not None:
            mask = _stats.check_mask(mask, x, layer="IBN")
        parts, masks = jnp.split(x, [k], axis), (None, None)
        if mask is not None:
            masks = jnp.split(mask, [k], axis)
        bn_fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(BatchNorm)
            if f.name not in ("parent", "name")
        }
        outs = []
        if k > 0:
            outs.append(
                InstanceNorm(
                    epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    use_bias=self.use_bias, use_scale=self.use_scale, bias_init=self.bias_init,
                    scale_init=self.scale_init, feature_axes=axis, name="IN",
                )(parts[0], mask=masks[0])
            )
        if k < x.shape[axis]:
            outs.append(BatchNorm(**bn_fields, name="BN")(parts[1], use_running_average, mask=masks[1]))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis)
