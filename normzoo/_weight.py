"""Weight-side family: WeightNorm and CosineNorm versions of Dense and Conv.

Each layer has every field of ``flax.linen.Dense`` / ``flax.linen.Conv``, in flax's order and
with flax's meaning (padding modes, dilations, feature groups, kernel mask, precision, injected
``dot_general`` / ``conv_general_dilated``, ``promote_dtype``); its own fields come after them,
keyword-only. Only the kernel changes: ``g * v / ||v||`` (WeightNorm), or the output is divided by
the kernel's and the input patch's norms (CosineNorm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import initializers
from flax.linen.linear import default_kernel_init
from jax import lax

from normzoo import _stats
from normzoo import functional as F

Array = jax.Array
Initializer = Any
PaddingLike = str | int | Sequence[int | tuple[int, int]]


class _DenseFields(nn.Module):
    """flax.linen.Dense's fields, in flax's order with flax's defaults."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = initializers.zeros
    promote_dtype: Any = flax_dtypes.promote_dtype
    dot_general: Any = None
    dot_general_cls: Any = None

    @nn.nowrap
    def _geometry(self, x: Array) -> tuple[Callable, tuple[int, ...], Callable]:
        """``(op, kernel_shape, restore)``: ``op(x, kernel)`` the layer's linear map."""
        if x.ndim < 1:
            raise ValueError(f"{type(self).__name__}: expected an input of rank >= 1 (features last), got a scalar.")
        dot = self.dot_general_cls() if self.dot_general_cls is not None else self.dot_general
        return (lambda a, k: F._dense(a, k, self.precision, dot)), (x.shape[-1], self.features), (lambda y: y)


class _ConvFields(nn.Module):
    """flax.linen.Conv's fields, in flax's order with flax's defaults."""

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = initializers.zeros
    promote_dtype: Any = flax_dtypes.promote_dtype
    conv_general_dilated: Any = None
    conv_general_dilated_cls: Any = None

    @nn.nowrap
    def _geometry(self, x: Array) -> tuple[Callable, tuple[int, ...], Callable, Any]:
        """``(op, kernel_shape, restore, geometry)`` of flax.linen.Conv for input ``x``."""
        geometry = F._conv_geometry(
            x, self.features, self.kernel_size, strides=self.strides, padding=self.padding,
            input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count, mask=self.mask, precision=self.precision,
            layer=type(self).__name__,
        )
        fn = self.conv_general_dilated_cls() if self.conv_general_dilated_cls is not None else self.conv_general_dilated
        return (lambda a, k: F._convolve(geometry, a, k, fn)), geometry.kernel_shape, geometry.restore, geometry


def _bias(mdl: nn.Module, init: Initializer) -> Array | None:
    return mdl.param("bias", init, (mdl.features,), mdl.param_dtype) if mdl.use_bias else None


def _weight_norm(mdl: nn.Module, x: Array, op: Callable, kernel_shape: tuple[int, ...]) -> Array:
    """``op(x, g * v / ||v||) + bias`` (:func:`normzoo.functional.weight_norm`). With ``data_init``,
    ``init`` sets ``g`` and ``bias`` from this batch (Salimans & Kingma sec. 3)."""
    mask = getattr(mdl, "mask", None)
    v = mdl.param("v", mdl.kernel_init, kernel_shape, mdl.param_dtype)
    g_init, b_init = mdl.scale_init, mdl.bias_init
    if mdl.data_init and mdl.is_initializing():
        # Zero-mean, unit-variance pre-activations per unit on this batch.
        direction = F.weight_norm(v, jnp.ones(kernel_shape[-1:]), epsilon=mdl.epsilon, mask=mask, dtype=mdl.dtype)
        t = op(jnp.asarray(x, direction.dtype), direction)
        mean, var = _stats.moments(t, tuple(range(t.ndim - 1)), layer=type(mdl).__name__)
        g0 = mdl.init_scale * lax.rsqrt(var + 1e-6)
        b0 = -mean * g0
        g_init = lambda key, s, dtype: jnp.asarray(g0, dtype)  # noqa: E731
        b_init = lambda key, s, dtype: jnp.asarray(b0, dtype)  # noqa: E731
    g = mdl.param("g", g_init, (mdl.features,), mdl.param_dtype)
    bias = _bias(mdl, b_init)
    kernel = F.weight_norm(v, g, epsilon=mdl.epsilon, mask=mask, dtype=mdl.dtype)
    x, kernel, bias = mdl.promote_dtype(x, kernel, bias, dtype=mdl.dtype)
    return F._add_bias(op(x, kernel), bias)


def _cosine(mdl: nn.Module, x: Array, op: Callable, kernel_shape: tuple[int, ...], sumsq: Callable) -> Array:
    """:func:`normzoo.functional.cosine_dense` / ``cosine_conv`` on the layer's parameters."""
    kernel = mdl.param("kernel", mdl.kernel_init, kernel_shape, mdl.param_dtype)
    mask = getattr(mdl, "mask", None)
    if mask is not None:
        kernel = kernel * mask
    scale = mdl.param("scale", mdl.scale_init, (), mdl.param_dtype) if mdl.use_scale else None
    bias = _bias(mdl, mdl.bias_init)
    x, kernel = mdl.promote_dtype(x, kernel, dtype=mdl.dtype)
    return F._cosine(x, kernel, scale, bias, mdl.epsilon, op, sumsq, mdl.dtype, promote=False)


def _dense_sumsq(x: Array, kernel_shape) -> Array:
    return jnp.sum(_stats.abs_sq(x), -1, keepdims=True)


class WeightNormDense(_DenseFields):
    r"""Weight-normalized Dense layer (Salimans & Kingma 2016, arXiv:1602.07868).

    .. math:: y = x \cdot \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    with ``||v||`` the norm of each output unit's column (over the input axis). Parameters:
    ``v`` (in, out), ``g`` (out,), ``bias`` (out,). Every field of ``flax.linen.Dense`` is
    accepted, in its order, with flax's meaning (``kernel_init`` initializes ``v``).

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
      features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
      promote_dtype, dot_general, dot_general_cls: as ``flax.linen.Dense``.
      data_init: (keyword-only) data-dependent initialization of ``g`` and ``bias`` at ``init``.
      init_scale: (keyword-only) target standard deviation of the initial pre-activations.
      scale_init: (keyword-only) initializer of ``g`` when ``data_init`` is False.
      epsilon: (keyword-only) added to ``||v||^2``.
    """

    data_init: bool = dataclasses.field(default=False, kw_only=True)
    init_scale: float = dataclasses.field(default=1.0, kw_only=True)
    scale_init: Initializer = dataclasses.field(default=initializers.ones, kw_only=True)
    epsilon: float = dataclasses.field(default=1e-12, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the weight-normalized layer to ``x`` (features last)."""
        op, kernel_shape, restore = self._geometry(x)
        return restore(_weight_norm(self, x, op, kernel_shape))


class WeightNormConv(_ConvFields):
    r"""Weight-normalized convolution (Salimans & Kingma 2016, arXiv:1602.07868).

    .. math:: y = x * \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    with ``||v||`` the norm of each output channel's filter over (spatial..., in) (of the
    masked filter, with ``mask``). Parameters ``v`` ``(*kernel_size, in / feature_group_count,
    out)``, ``g`` (out,), ``bias`` (out,). Every field of ``flax.linen.Conv`` is accepted, in its
    order, with flax's meaning. See :class:`WeightNormDense` for ``data_init``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> y, v = normzoo.WeightNormConv(4, (3, 3)).init_with_output(jax.random.key(1), x)
      >>> y.shape, v['params']['v'].shape
      ((2, 8, 8, 4), (3, 3, 3, 4))

    Attributes:
      features, kernel_size, strides, padding, input_dilation, kernel_dilation,
      feature_group_count, use_bias, mask, dtype, param_dtype, precision, kernel_init,
      bias_init, promote_dtype, conv_general_dilated, conv_general_dilated_cls: as
      ``flax.linen.Conv``.
      data_init, init_scale, scale_init, epsilon: (keyword-only) as :class:`WeightNormDense`.
    """

    data_init: bool = dataclasses.field(default=False, kw_only=True)
    init_scale: float = dataclasses.field(default=1.0, kw_only=True)
    scale_init: Initializer = dataclasses.field(default=initializers.ones, kw_only=True)
    epsilon: float = dataclasses.field(default=1e-12, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the weight-normalized convolution to ``x`` (batch..., spatial..., C)."""
        op, kernel_shape, restore, geometry = self._geometry(x)
        return restore(_weight_norm(self, geometry.x, op, kernel_shape))


class CosineDense(_DenseFields):
    r"""Cosine-normalized Dense layer (Luo et al. 2017, arXiv:1702.05870).

    .. math:: y_j = s \frac{w_j \cdot x}{\lVert w_j \rVert \, \lVert x \rVert} + b_j

    Each output is the cosine between the input and the unit's weights, in [-1, 1]. By
    default there is no bias and no scale (``s = 1``); ``use_scale=True`` learns a scalar
    ``s`` (a temperature, useful before a softmax), ``use_bias=True`` adds ``b``. Every field
    of ``flax.linen.Dense`` is accepted, in its order, with flax's meaning.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (3, 5))
      >>> y, _ = normzoo.CosineDense(4).init_with_output(jax.random.key(1), x)
      >>> bool(jnp.all(jnp.abs(y) <= 1.0))
      True

    Attributes:
      features, use_bias (default False here), dtype, param_dtype, precision, kernel_init,
      bias_init, promote_dtype, dot_general, dot_general_cls: as ``flax.linen.Dense``.
      use_scale: (keyword-only) learn a scalar output scale ``scale`` (default False).
      scale_init: (keyword-only) its initializer (default 1).
      epsilon: (keyword-only) added to the squared norms (zero inputs give zero output).
    """

    use_bias: bool = False
    use_scale: bool = dataclasses.field(default=False, kw_only=True)
    scale_init: Initializer = dataclasses.field(default=initializers.ones, kw_only=True)
    epsilon: float = dataclasses.field(default=1e-12, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Cosine similarity of ``x`` (features last) with each unit's weights."""
        op, kernel_shape, restore = self._geometry(x)
        return restore(_cosine(self, x, op, kernel_shape, _dense_sumsq))


class CosineConv(_ConvFields):
    r"""Cosine-normalized convolution (Luo et al. 2017, arXiv:1702.05870).

    .. math:: y_{p,j} = s \frac{w_j \cdot x_p}{\lVert w_j \rVert \, \lVert x_p \rVert} + b_j

    where ``x_p`` is the receptive-field patch of output position ``p`` (within the unit's
    feature group, and under its ``mask``). ``||x_p||`` is computed without extracting
    patches: ``|x|^2`` is box-filtered with the convolution's kernel size, strides, padding
    and dilations. Every field of ``flax.linen.Conv`` is accepted, in its order, with flax's
    meaning.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
      >>> y, v = normzoo.CosineConv(4, (3, 3)).init_with_output(jax.random.key(1), x)
      >>> y.shape, sorted(v['params'])
      ((2, 6, 6, 4), ['kernel'])

    Attributes:
      (flax.linen.Conv's fields): as there; ``use_bias`` defaults to False here.
      use_scale, scale_init, epsilon: (keyword-only) as :class:`CosineDense`.
    """

    use_bias: bool = False
    use_scale: bool = dataclasses.field(default=False, kw_only=True)
    scale_init: Initializer = dataclasses.field(default=initializers.ones, kw_only=True)
    epsilon: float = dataclasses.field(default=1e-12, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Cosine similarity of each patch of ``x`` with each filter."""
        op, kernel_shape, restore, geometry = self._geometry(x)
        sumsq = lambda a, shape: F._patch_sumsq(geometry, a, shape, self.mask, self.feature_group_count)  # noqa: E731
        return restore(_cosine(self, geometry.x, op, kernel_shape, sumsq))


def _standardized(mdl: nn.Module, x: Array, op: Callable, kernel_shape: tuple[int, ...], scaled: bool) -> Array:
    """``op(x, standardized kernel) + bias`` (:func:`normzoo.functional.weight_standardize`); the
    scaled form multiplies by a learned ``gain`` and ``gamma / sqrt(fan_in)`` (NF-Nets)."""
    kernel = mdl.param("kernel", mdl.kernel_init, kernel_shape, mdl.param_dtype)
    gain = mdl.param("gain", mdl.gain_init, (mdl.features,), mdl.param_dtype) if scaled else None
    bias = _bias(mdl, mdl.bias_init)
    fan_in = 1
    for d in kernel_shape[:-1]:
        fan_in *= d
    kernel = F.weight_standardize(kernel, gain, scale=mdl.gamma * fan_in ** -0.5 if scaled else 1.0,
                                  epsilon=mdl.epsilon, mask=getattr(mdl, "mask", None), dtype=mdl.dtype)
    x, kernel, bias = mdl.promote_dtype(x, kernel, bias, dtype=mdl.dtype)
    return F._add_bias(op(x, kernel), bias)


class StdConv(_ConvFields):
    r"""Convolution with a standardized kernel (weight standardization, Qiao et al. 2019,
    arXiv:1903.10520; BiT's ``StdConv2d``, Kolesnikov et al. 2020), drop-in for ``flax.linen.Conv``.

    .. math:: y = x * \frac{w - \mathrm{E}[w]}{\sqrt{\mathrm{Var}[w] + \epsilon}} + b

    each output channel's filter standardized over (spatial..., in) (:func:`normzoo.functional.weight_standardize`),
    so the layer's output is invariant to the filter's shift and scale. Paired with GroupNorm it
    is BiT's recipe (registry ``group_ws``). Parameters and fields are ``flax.linen.Conv``'s.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> layer = normzoo.StdConv(4, (3, 3))
      >>> v = layer.init(jax.random.key(1), x)
      >>> shifted = {'params': {**v['params'], 'kernel': v['params']['kernel'] * 3 + 1}}
      >>> bool(jnp.allclose(layer.apply(v, x), layer.apply(shifted, x), rtol=1e-4, atol=1e-3))
      True

    Attributes:
      (flax.linen.Conv's fields, in its order).
      epsilon: (keyword-only) added to the filters' variance (timm's default; BiT's models 1e-8).
    """

    epsilon: float = dataclasses.field(default=1e-6, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the convolution with the standardized kernel to ``x`` (batch..., spatial..., C)."""
        op, kernel_shape, restore, geometry = self._geometry(x)
        return restore(_standardized(self, geometry.x, op, kernel_shape, scaled=False))


class ScaledStdConv(_ConvFields):
    r"""Scaled weight-standardized convolution (NF-Nets, Brock et al. 2021, arXiv:2102.06171);
    timm's ``ScaledStdConv2d``, with ``flax.linen.Conv``'s fields.

    .. math:: y = x * \Big(g \, \frac{\gamma}{\sqrt{N}} \frac{w - \mathrm{E}[w]}{\sqrt{\mathrm{Var}[w] + \epsilon}}\Big) + b

    with ``N`` the fan-in (kernel size times input channels per group), ``g`` a learned gain per
    output channel (parameter ``gain``) and ``gamma`` the activation's gain (NF-Nets: e.g.
    1.7139 for ReLU).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> v = normzoo.ScaledStdConv(4, (3, 3)).init(jax.random.key(1), jnp.ones((1, 8, 8, 3)))
      >>> sorted(v['params']), v['params']['gain'].shape
      (['bias', 'gain', 'kernel'], (4,))

    Attributes:
      (flax.linen.Conv's fields, in its order).
      gamma, epsilon, gain_init: (keyword-only) the activation gain, the variance offset
        (timm's 1e-6) and the gain's initializer (ones).
    """

    gamma: float = dataclasses.field(default=1.0, kw_only=True)
    epsilon: float = dataclasses.field(default=1e-6, kw_only=True)
    gain_init: Initializer = dataclasses.field(default=initializers.ones, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the convolution with the scaled standardized kernel to ``x``."""
        op, kernel_shape, restore, geometry = self._geometry(x)
        return restore(_standardized(self, geometry.x, op, kernel_shape, scaled=True))


class StdDense(_DenseFields):
    r"""Dense layer with a standardized kernel (weight standardization): :class:`StdConv` for
    ``flax.linen.Dense``, each output unit's weights standardized over the inputs.

    .. math:: y = x \cdot \frac{w - \mathrm{E}[w]}{\sqrt{\mathrm{Var}[w] + \epsilon}} + b

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> y, v = normzoo.StdDense(3).init_with_output(jax.random.key(0), jnp.ones((2, 5)))
      >>> y.shape
      (2, 3)

    Attributes:
      (flax.linen.Dense's fields, in its order).
      epsilon: (keyword-only) as :class:`StdConv`.
    """

    epsilon: float = dataclasses.field(default=1e-6, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the layer to ``x`` (features last)."""
        op, kernel_shape, restore = self._geometry(x)
        return restore(_standardized(self, x, op, kernel_shape, scaled=False))


class ScaledStdDense(_DenseFields):
    r""":class:`ScaledStdConv` for ``flax.linen.Dense`` (NF-Nets' scaled weight standardization).

    .. math:: y = x \cdot \Big(g \, \frac{\gamma}{\sqrt{N}} \frac{w - \mathrm{E}[w]}{\sqrt{\mathrm{Var}[w] + \epsilon}}\Big) + b

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> v = normzoo.ScaledStdDense(3).init(jax.random.key(0), jnp.ones((2, 5)))
      >>> sorted(v['params'])
      ['bias', 'gain', 'kernel']

    Attributes:
      (flax.linen.Dense's fields, in its order).
      gamma, epsilon, gain_init: (keyword-only) as :class:`ScaledStdConv`.
    """

    gamma: float = dataclasses.field(default=1.0, kw_only=True)
    epsilon: float = dataclasses.field(default=1e-6, kw_only=True)
    gain_init: Initializer = dataclasses.field(default=initializers.ones, kw_only=True)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the layer to ``x`` (features last)."""
        op, kernel_shape, restore = self._geometry(x)
        return restore(_standardized(self, x, op, kernel_shape, scaled=True))
