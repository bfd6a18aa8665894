"""Whitening family as flax.linen modules: IterNorm.

The layer declares its variables, calls :func:`normzoo.functional.iter_norm`'s map and writes the
new running statistics back (not while initializing), as the batch family does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from normzoo import functional as F
from normzoo._batch import _Shell

Array = jax.Array
Initializer = Any


class IterNorm(_Shell):
    r"""Iterative normalization (Huang, Zhou, Zhu, Liu & Shao 2019, arXiv:1904.03441): ZCA
    whitening of groups of channels by Newton-Schulz iterations.

    The channels (``axis``) form groups of ``c = group_size`` consecutive channels (one group of
    all of them when there are fewer). In training, per group, over every other axis:

    .. math::
        \Sigma = \mathrm{Cov}_B(x) + \epsilon I, \quad \Sigma_N = \Sigma / \mathrm{tr}\,\Sigma, \quad
        P_0 = I, \quad P_k = \tfrac12 \big(3 P_{k-1} - P_{k-1}^3 \Sigma_N\big), \quad
        W = P_T / \sqrt{\mathrm{tr}\,\Sigma}

    .. math:: y = \gamma \odot \big((x - \mu_B) W^\top\big) + \beta

    ``W`` approaches :math:`\Sigma^{-1/2}` as ``T = iterations`` grows (the paper's ``T = 5``
    whitens partly). The running statistics move as BatchNorm's (flax's convention):
    ``mean = momentum * mean + (1 - momentum) * mu_B``, ``whitening = momentum * whitening +
    (1 - momentum) * W``; with ``use_running_average=True`` they replace the batch's:
    ``y = gamma * ((x - mean) whitening^T) + beta``. Statistics in at least float32, stable for
    large means, synced across ``axis_name`` in one ``psum`` (count-weighted, masks included).
    The arithmetic is :func:`normzoo.functional.iter_norm`. :func:`normzoo.deploy.fold` keeps
    the layer (its inference map mixes channels: not a per-channel scale and shift).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 6)) + 1e4
      >>> layer = normzoo.IterNorm(use_running_average=False, group_size=3)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> jax.tree.map(jnp.shape, updates["batch_stats"])
      {'mean': (6,), 'whitening': (2, 3, 3)}

    Attributes:
      use_running_average: if True, whiten with the running statistics (inference); may also
        be given at call time.
      axis: the channel axis (one int); statistics are taken over all others.
      momentum: decay of the running averages.
      epsilon: added to the covariance's diagonal (keeps it positive definite: a constant
        channel gives finite outputs and gradients).
      dtype: dtype of the result (default: promote input and params, as flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias ``beta`` per channel.
      use_scale: learn a scale ``gamma`` per channel.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: mapped axis (pmap / shard_map / vmap) to synchronize statistics over.
      axis_index_groups: partition of ``axis_name`` into groups synchronized separately.
      group_size: ``c``, the channels whitened together (the paper's code's ``num_channels``);
        must divide the number of channels, unless it is at least as large (then one group).
      iterations: ``T``, the number of Newton-Schulz steps.
      virtual_batch_size: (keyword-only) ghost batches, as :class:`normzoo.BatchNorm`.
      scale_plus_one: (keyword-only) store the scale as an offset from 1, as
        :class:`normzoo.BatchNorm`.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    group_size: int = 64
    iterations: int = 5
    virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Whitens ``x``.

        Args:
          x: the input.
          use_running_average: if True, whiten with the running statistics; may be given here
            or at construction, not both.
          mask: boolean, broadcastable to ``x`` and of size 1 along ``axis``: the positions that
            enter the statistics (every position is whitened).

        Returns:
          The whitened input, of x's shape.
        """
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        layer = type(self).__name__
        layout, groups, size = F._whitening_layout(x, self.axis, None, self.group_size, layer)
        shape = layout.shape
        running = [
            self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape),
            self.variable("batch_stats", "whitening",
                          lambda: jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), (groups, size, size))),
        ]
        scale, bias = self._affine(shape)
        mean, whitening = self._read(running, not use_ra)
        y, new = F._iter_map(
            x, mean, whitening, scale, bias, training=not use_ra, group_size=self.group_size,
            iterations=self.iterations, momentum=self.momentum, epsilon=self.epsilon, axis=self.axis, mask=mask,
            axis_name=None if self.is_initializing() else self.axis_name, axis_index_groups=self.axis_index_groups,
            virtual_batch_size=self.virtual_batch_size, dtype=self.dtype, layer=layer,
        )
        self._store(running, new, x, not use_ra)
        return y
