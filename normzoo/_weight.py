"""Weight-side family: WeightNorm and CosineNorm versions of Dense and Conv."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import initializers
from jax import lax

from normzoo import _stats

Array = jax.Array
Initializer = Any
PaddingLike = str | int | Sequence[int | tuple[int, int]]


def _tuple(value, n: int, *, argument: str, layer: str) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral):
        return (int(value),) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, numbers.Integral) for v in value):
        raise ValueError(
            f"{layer}: `{argument}`={value!r} must be an int or {n} ints, one per spatial axis."
        )
    return value


def _padding(padding: PaddingLike, n: int, *, layer: str):
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(
            f"{layer}: padding={padding!r} is not supported; use 'SAME', 'VALID', an int, "
            "or one (low, high) pair per spatial axis."
        )
    if isinstance(padding, numbers.Integral):
        return [(int(padding), int(padding))] * n
    pads = [(p, p) if isinstance(p, numbers.Integral) else tuple(p) for p in padding]
    if len(pads) != n or not all(len(p) == 2 for p in pads):
        raise ValueError(
            f"{layer}: padding={padding!r} must give one int or (low, high) pair per "
            f"spatial axis ({n})."
        )
    return pads


class _Linear(nn.Module):
    """Machinery shared by the Dense-like and Conv-like layers.

    Fields are declared on the two subclasses so that, as in flax.linen, ``features``
    (and ``kernel_size`` for convolutions) come first and can be given positionally.
    """

    def _kernel_shape(self, x: Array) -> tuple[int, ...]:
        raise NotImplementedError

    def _op(self, x: Array, kernel: Array) -> Array:
        raise NotImplementedError

    def _check_input(self, x: Array) -> None:
        if x.ndim < self._min_rank:
            raise ValueError(
                f"{type(self).__name__}: expected an input of rank >= {self._min_rank} "
                f"(features last), got shape {tuple(x.shape)}."
            )

    def _feature_axes(self, x: Array) -> tuple[int, ...]:
        """Axes of the kernel that are reduced by its norm: all but the output axis."""
        return tuple(range(len(self._kernel_shape(x)) - 1))

    def _add_bias(self, y: Array, bias_init: Initializer | None = None) -> Array:
        if not self.use_bias:
            return y
        bias = _stats.param_with_shape(
            self, "bias", bias_init or self.bias_init, (self.features,), self.param_dtype, what="output features"
        )
        return y + jnp.asarray(bias, y.dtype)


class _DenseLike(_Linear):
    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = initializers.lecun_normal()
    bias_init: Initializer = initializers.zeros
    epsilon: float = 1e-12

    _min_rank = 1

    def _kernel_shape(self, x):
        return (x.shape[-1], self.features)

    def _op(self, x, kernel):
        return lax.dot_general(
            x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision
        )

    def _patch_sumsq(self, x):
        return jnp.sum(jnp.square(x), -1, keepdims=True)


class _ConvLike(_Linear):
    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = initializers.lecun_normal()
    bias_init: Initializer = initializers.zeros
    epsilon: float = 1e-12

    _min_rank = 3

    def _spatial(self, x):
        return x.ndim - 2

    def _kernel_shape(self, x):
        ks = _tuple(self.kernel_size, self._spatial(x), argument="kernel_size", layer=type(self).__name__)
        return ks + (x.shape[-1], self.features)

    def _op(self, x, kernel):
        n = self._spatial(x)
        layer = type(self).__name__
        spec = (0, n + 1) + tuple(range(1, n + 1))
        dn = lax.ConvDimensionNumbers(
            lhs_spec=spec, rhs_spec=(n + 1, n) + tuple(range(n)), out_spec=spec
        )
        return lax.conv_general_dilated(
            x, kernel,
            window_strides=_tuple(self.strides, n, argument="strides", layer=layer),
            padding=_padding(self.padding, n, layer=layer),
            rhs_dilation=_tuple(self.kernel_dilation, n, argument="kernel_dilation", layer=layer),
            dimension_numbers=dn, precision=self.precision,
        )

    def _patch_sumsq(self, x):
        # ||patch||^2 = box filter of sum_c x^2: one channel in, one out, same geometry.
        sq = jnp.sum(jnp.square(x), -1, keepdims=True)
        ones = jnp.ones(self._kernel_shape(x)[:-2] + (1, 1), sq.dtype)
        return self._op(sq, ones)


class _WeightNormMixin:
    r"""kernel = g * v / ||v||, norm over every kernel axis but the output one."""

    def _weight_norm(self, x: Array) -> Array:
        self._check_input(x)
        shape = self._kernel_shape(x)
        v = _stats.param_with_shape(
            self, "v", self.kernel_init, shape, self.param_dtype, what="kernel shape"
        )
        axes = self._feature_axes(x)
        x_, v_ = flax_dtypes.promote_dtype(x, v, dtype=self.dtype)
        stats_dt = _stats.stats_dtype(v_.dtype)
        vf = jnp.asarray(v_, stats_dt)
        direction = vf * lax.rsqrt(jnp.sum(vf * vf, axes, keepdims=True) + self.epsilon)

        g_init, b_init = self.scale_init, self.bias_init
        if self.data_init and self.is_initializing():
            # Salimans & Kingma sec. 3: zero-mean, unit-variance pre-activations on this batch.
            t = self._op(jnp.asarray(x_, stats_dt), direction)
            mean, var = _stats.moments(t, tuple(range(t.ndim - 1)), layer=type(self).__name__)
            g0 = self.init_scale * lax.rsqrt(var + 1e-6)
            b0 = -mean * g0
            g_init = lambda key, s, dtype: jnp.asarray(g0, dtype)  # noqa: E731
            b_init = lambda key, s, dtype: jnp.asarray(b0, dtype)  # noqa: E731
        g = _stats.param_with_shape(
            self, "g", g_init, (self.features,), self.param_dtype, what="output features"
        )
        kernel = jnp.asarray(direction * jnp.asarray(g, stats_dt), x_.dtype)
        return self._add_bias(self._op(x_, kernel), b_init)


class WeightNormDense(_DenseLike, _WeightNormMixin):
    r"""Weight-normalized Dense layer (Salimans & Kingma 2016, arXiv:1602.07868).

    .. math:: y = x \cdot \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    with ``||v||`` the norm of each output unit's column (over the input axis). Parameters:
    ``v`` (in, out), ``g`` (out,), ``bias`` (out,).

    Data-dependent initialization (the paper's sec. 3): with ``data_init=True``, ``init``
    sets ``g`` and ``bias`` from the batch it is given, so that the initial pre-activations
    have zero mean and unit variance per unit. Because Flax's functional ``init`` runs the
    forward pass layer by layer, every layer of a model is initialized from the actual
    activations reaching it: pass a real data batch to ``model.init``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (256, 5)) * 3 + 1
      >>> layer = normzoo.WeightNormDense(4, data_init=True)
      >>> y, variables = layer.init_with_output(jax.random.key(1), x)
      >>> sorted(variables['params']), bool(jnp.abs(y.mean(0)).max() < 1e-4)
      (['bias', 'g', 'v'], True)

    Attributes:
      features: output features.
      use_bias: add a bias.
      data_init: data-dependent initialization of ``g`` and ``bias`` at ``init``.
      init_scale: target standard deviation of the initial pre-activations (data_init).
      scale_init: initializer of ``g`` when ``data_init`` is False.
      kernel_init, bias_init, dtype, param_dtype, precision: as ``flax.linen.Dense``
        (``kernel_init`` initializes ``v``).
      epsilon: added to ``||v||^2``.
    """

    data_init: bool = False
    init_scale: float = 1.0
    scale_init: Initializer = initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the weight-normalized layer to ``x`` (features last)."""
        return self._weight_norm(x)


class WeightNormConv(_ConvLike, _WeightNormMixin):
    r"""Weight-normalized convolution (Salimans & Kingma 2016, arXiv:1602.07868).

    .. math:: y = x * \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    with ``||v||`` the norm of each output channel's filter over (spatial..., in).
    Parameters ``v`` (*kernel_size, in, out), ``g`` (out,), ``bias`` (out,). See
    :class:`WeightNormDense` for ``data_init``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> y, v = normzoo.WeightNormConv(4, (3, 3)).init_with_output(jax.random.key(1), x)
      >>> y.shape, v['params']['v'].shape
      ((2, 8, 8, 4), (3, 3, 3, 4))

    Attributes:
      features, kernel_size, strides, padding ('SAME', 'VALID', int or pairs),
      kernel_dilation: as ``flax.linen.Conv``.
      (others): as :class:`WeightNormDense`.
    """

    data_init: bool = False
    init_scale: float = 1.0
    scale_init: Initializer = initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the weight-normalized convolution to ``x`` (N, spatial..., C)."""
        return self._weight_norm(x)


class _CosineMixin:
    r"""y = (w . x) / (||w|| ||x||) per output unit (and patch)."""

    def _cosine(self, x: Array) -> Array:
        self._check_input(x)
        kernel = _stats.param_with_shape(
            self, "kernel", self.kernel_init, self._kernel_shape(x), self.param_dtype,
            what="kernel shape",
        )
        x_, k_ = flax_dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        dot = self._op(x_, k_)
        sdt = _stats.stats_dtype(dot.dtype)
        kf = jnp.asarray(k_, sdt)
        inv_w = lax.rsqrt(jnp.sum(kf * kf, self._feature_axes(x)) + self.epsilon)
        inv_x = lax.rsqrt(self._patch_sumsq(jnp.asarray(x_, sdt)) + self.epsilon)
        y = jnp.asarray(dot, sdt) * inv_w * inv_x
        if self.use_scale:
            scale = self.param("scale", self.scale_init, (), self.param_dtype)
            y = y * scale
        return self._add_bias(jnp.asarray(y, dot.dtype))


class CosineDense(_DenseLike, _CosineMixin):
    r"""Cosine-normalized Dense layer (Luo et al. 2017, arXiv:1702.05870).

    .. math:: y_j = s \frac{w_j \cdot x}{\lVert w_j \rVert \, \lVert x \rVert} + b_j

    Each output is the cosine between the input and the unit's weights, in [-1, 1]. By
    default there is no bias and no scale (``s = 1``); ``use_scale=True`` learns a scalar
    ``s`` (a temperature, useful before a softmax), ``use_bias=True`` adds ``b``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (3, 5))
      >>> y, _ = normzoo.CosineDense(4).init_with_output(jax.random.key(1), x)
      >>> bool(jnp.all(jnp.abs(y) <= 1.0))
      True

    Attributes:
      features: output units.
      use_bias: add a bias (default False).
      use_scale: learn a scalar output scale ``scale`` (default False).
      scale_init: its initializer (default 1).
      kernel_init, bias_init, dtype, param_dtype, precision: as ``flax.linen.Dense``.
      epsilon: added to the squared norms (zero inputs give zero output).
    """

    use_bias: bool = False
    use_scale: bool = False
    scale_init: Initializer = initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Cosine similarity of ``x`` (features last) with each unit's weights."""
        return self._cosine(x)


class CosineConv(_ConvLike, _CosineMixin):
    r"""Cosine-normalized convolution (Luo et al. 2017, arXiv:1702.05870).

    .. math:: y_{p,j} = s \frac{w_j \cdot x_p}{\lVert w_j \rVert \, \lVert x_p \rVert} + b_j

    where ``x_p`` is the receptive-field patch of output position ``p``. ``||x_p||`` is
    computed without extracting patches: ``sum_c x^2`` is box-filtered with the same
    kernel size, strides, padding and dilation as the convolution.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
      >>> y, v = normzoo.CosineConv(4, (3, 3)).init_with_output(jax.random.key(1), x)
      >>> y.shape, sorted(v['params'])
      ((2, 6, 6, 4), ['kernel'])

    Attributes:
      features, kernel_size, strides, padding, kernel_dilation: as ``flax.linen.Conv``.
      (others): as :class:`CosineDense`.
    """

    use_bias: bool = False
    use_scale: bool = False
    scale_init: Initializer = initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Cosine similarity of each patch of ``x`` with each filter."""
        return self._cosine(x)
