"""Weight-side family: WeightNorm and CosineNorm versions of Dense and Conv.

Each layer has every field of ``flax.linen.Dense`` / ``flax.linen.Conv``, in flax's order and
with flax's meaning (padding modes, dilations, feature groups, kernel mask, precision, injected
``dot_general`` / ``conv_general_dilated``, ``promote_dtype``); its own fields come after them,
keyword-only. Only the kernel changes: ``g * v / ||v||`` (WeightNorm), or the output is divided by
the kernel's and the input patch's norms (CosineNorm).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import initializers
from flax.linen.linear import canonicalize_padding, default_kernel_init
from jax import lax

from normzoo import _stats

Array = jax.Array
Initializer = Any
PaddingLike = str | int | Sequence[int | tuple[int, int]]
_PADDINGS = ("SAME", "VALID", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")  # flax.linen.Conv's


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
    def _kernel_shape(self, x: Array) -> tuple[int, ...]:
        if x.ndim < 1:
            raise ValueError(f"{type(self).__name__}: expected an input of rank >= 1 (features last), got a scalar.")
        return (x.shape[-1], self.features)

    @nn.nowrap
    def _op(self, x: Array, kernel: Array) -> Array:
        if self.dot_general_cls is not None:
            dot = self.dot_general_cls()
        else:
            dot = self.dot_general or lax.dot_general
        return dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)

    @nn.nowrap
    def _patch_sumsq(self, x: Array, kernel_shape) -> Array:
        return jnp.sum(_stats.abs_sq(x), -1, keepdims=True)


class _Geometry(NamedTuple):
    """An input prepared for ``lax.conv_general_dilated`` as flax.linen.Conv prepares it."""

    x: Array  # one leading batch axis, explicit padding modes already applied
    batch_shape: tuple[int, ...] | None  # the original batch axes, restored on the output
    kernel_shape: tuple[int, ...]
    conv: dict  # keyword arguments of the convolution


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
    def _geometry(self, x: Array) -> _Geometry:
        layer = type(self).__name__
        ks = (self.kernel_size,) if isinstance(self.kernel_size, numbers.Integral) else tuple(self.kernel_size)
        n = len(ks)
        if x.ndim < n + 1:
            raise ValueError(
                f"{layer}: kernel_size={self.kernel_size!r} convolves {n} spatial axes, which needs an "
                f"input of rank >= {n + 1} (features last), got shape {tuple(x.shape)}."
            )

        def per_axis(value, argument):
            value = 1 if value is None else value
            if isinstance(value, numbers.Integral):
                return (int(value),) * n
            value = tuple(value)
            if len(value) != n:
                raise ValueError(f"{layer}: `{argument}`={value!r} must be an int or {n} ints, one per spatial axis.")
            return value

        strides, lhs_dil = per_axis(self.strides, "strides"), per_axis(self.input_dilation, "input_dilation")
        rhs_dil = per_axis(self.kernel_dilation, "kernel_dilation")
        batch_shape = None
        if x.ndim != n + 2:  # flax folds any number of batch axes into one
            batch_shape = x.shape[: x.ndim - n - 1]
            x = jnp.reshape(x, (-1,) + x.shape[x.ndim - n - 1:])
        if isinstance(self.padding, str) and self.padding.upper() not in _PADDINGS:
            raise ValueError(
                f"{layer}: padding={self.padding!r} is not supported; use one of {', '.join(map(repr, _PADDINGS))}, "
                "an int, or one (low, high) pair per spatial axis."
            )
        try:
            padding = canonicalize_padding(self.padding, n)
        except ValueError:
            raise ValueError(
                f"{layer}: padding={self.padding!r} must give one int or (low, high) pair per "
                f"spatial axis ({n})."
            ) from None
        if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
            # Explicit padding modes pad the input and convolve VALID, as flax does.
            span = [(k - 1) * d + 1 for k, d in zip(ks, rhs_dil)]
            padding = padding.upper()
            if padding == "CAUSAL":
                if n != 1:
                    raise ValueError(f"{layer}: padding='CAUSAL' is only defined for 1-D convolutions, got kernel_size={ks}.")
                x = jnp.pad(x, [(0, 0), (span[0] - 1, 0), (0, 0)])
            else:
                widths = [(0, 0)] + [((s - 1) // 2, s // 2) for s in span] + [(0, 0)]
                x = jnp.pad(x, widths, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
            padding = "VALID"
        groups = self.feature_group_count
        if x.shape[-1] % groups or self.features % groups:
            raise ValueError(
                f"{layer}: feature_group_count={groups} must divide the {x.shape[-1]} input and "
                f"{self.features} output features."
            )
        kernel_shape = ks + (x.shape[-1] // groups, self.features)
        if self.mask is not None and tuple(self.mask.shape) != kernel_shape:
            raise ValueError(
                f"{layer}: `mask` has shape {tuple(self.mask.shape)}, but the kernel has shape "
                f"{kernel_shape}; give the mask the kernel's shape."
            )
        spec = (0, n + 1) + tuple(range(1, n + 1))
        dn = lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=(n + 1, n) + tuple(range(n)), out_spec=spec)
        conv = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                    dimension_numbers=dn, feature_group_count=groups, precision=self.precision)
        return _Geometry(x, batch_shape, kernel_shape, conv)

    @nn.nowrap
    def _convolve(self, geometry: _Geometry, x: Array, kernel: Array, injected: bool = True) -> Array:
        if not injected:
            fn = lax.conv_general_dilated
        elif self.conv_general_dilated_cls is not None:
            fn = self.conv_general_dilated_cls()
        else:
            fn = self.conv_general_dilated or lax.conv_general_dilated
        return fn(x, kernel, **geometry.conv)

    @nn.nowrap
    def _restore(self, geometry: _Geometry, y: Array) -> Array:
        return y if geometry.batch_shape is None else jnp.reshape(y, geometry.batch_shape + y.shape[1:])


def _add_bias(y: Array, bias: Array | None) -> Array:
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _bias(mdl: nn.Module, init: Initializer) -> Array | None:
    if not mdl.use_bias:
        return None
    return _stats.param_with_shape(mdl, "bias", init, (mdl.features,), mdl.param_dtype, what="output features")


def _weight_norm(mdl: nn.Module, x: Array, kernel_shape, op) -> Array:
    """``op(x, g * v / ||v||) + bias``, the norm over every kernel axis but the output one;
    ``op`` applies the layer's linear map. With ``data_init``, ``init`` sets ``g`` and ``bias``
    from this batch (Salimans & Kingma sec. 3)."""
    v = _stats.param_with_shape(mdl, "v", mdl.kernel_init, kernel_shape, mdl.param_dtype, what="kernel shape")
    stats_dt = _stats.stats_dtype(jnp.result_type(v) if mdl.dtype is None else mdl.dtype)
    direction = _direction(mdl, v, stats_dt)
    g_init, b_init = mdl.scale_init, mdl.bias_init
    if mdl.data_init and mdl.is_initializing():
        # Zero-mean, unit-variance pre-activations per unit on this batch.
        t = op(jnp.asarray(x, stats_dt), direction)
        mean, var = _stats.moments(t, tuple(range(t.ndim - 1)), layer=type(mdl).__name__)
        g0 = mdl.init_scale * lax.rsqrt(var + 1e-6)
        b0 = -mean * g0
        g_init = lambda key, s, dtype: jnp.asarray(g0, dtype)  # noqa: E731
        b_init = lambda key, s, dtype: jnp.asarray(b0, dtype)  # noqa: E731
    g = _stats.param_with_shape(mdl, "g", g_init, (mdl.features,), mdl.param_dtype, what="output features")
    bias = _bias(mdl, b_init)
    x, kernel, bias = mdl.promote_dtype(x, direction * jnp.asarray(g, stats_dt), bias, dtype=mdl.dtype)
    return _add_bias(op(x, kernel), bias)


def _direction(mdl: nn.Module, v: Array, stats_dt: Any) -> Array:
    """``v / ||v||`` (masked), the norm over every kernel axis but the output one."""
    mask = getattr(mdl, "mask", None)
    vf = jnp.asarray(v, stats_dt) if mask is None else jnp.asarray(v, stats_dt) * mask
    axes = tuple(range(vf.ndim - 1))
    return vf * lax.rsqrt(jnp.sum(_stats.abs_sq(vf), axes, keepdims=True) + mdl.epsilon)


def weight_norm_kernel(mdl: nn.Module, v: Array, g: Array) -> Array:
    """The kernel ``g * v / ||v||`` a WeightNorm layer ``mdl`` applies, given its parameters
    (used by ``normzoo.deploy`` to materialize it into a plain Dense / Conv kernel)."""
    stats_dt = _stats.stats_dtype(jnp.result_type(v) if mdl.dtype is None else mdl.dtype)
    return _direction(mdl, v, stats_dt) * jnp.asarray(g, stats_dt)


def _cosine(mdl: nn.Module, x: Array, kernel_shape, op, patch_sumsq) -> Array:
    """``scale * op(x, w) / (||w|| ||x_patch||) + bias`` per output unit (and patch)."""
    kernel = _stats.param_with_shape(mdl, "kernel", mdl.kernel_init, kernel_shape, mdl.param_dtype, what="kernel shape")
    mask = getattr(mdl, "mask", None)
    if mask is not None:
        kernel = kernel * mask
    x_, k_ = mdl.promote_dtype(x, kernel, dtype=mdl.dtype)
    dot = op(x_, k_)
    sdt = _stats.stats_dtype(dot.dtype)
    kf = jnp.asarray(k_, sdt)
    inv_w = lax.rsqrt(jnp.sum(_stats.abs_sq(kf), tuple(range(len(kernel_shape) - 1))) + mdl.epsilon)
    inv_x = lax.rsqrt(patch_sumsq(jnp.asarray(x_, sdt), kernel_shape) + mdl.epsilon)
    y = jnp.asarray(dot, sdt) * inv_w * inv_x
    if mdl.use_scale:
        y = y * mdl.param("scale", mdl.scale_init, (), mdl.param_dtype)
    bias = _bias(mdl, mdl.bias_init)
    return _add_bias(jnp.asarray(y, dot.dtype), None if bias is None else jnp.asarray(bias, dot.dtype))


class _ConvPatches(_ConvFields):
    """The receptive-field norms CosineConv divides by."""

    @nn.nowrap
    def _patch_sumsq(self, geometry: _Geometry, x: Array, kernel_shape) -> Array:
        """``||x_p||^2`` of every output unit's patch, without extracting patches: ``|x|^2``
        convolved with ones over the kernel's support (its mask, its feature group)."""
        sq = _stats.abs_sq(x)
        groups = self.feature_group_count
        if self.mask is not None:  # each unit has its own support
            return self._convolve(geometry, sq, jnp.asarray(self.mask != 0, sq.dtype), injected=False)
        # One box filter per feature group, repeated over the group's units.
        ones = jnp.ones(kernel_shape[:-1] + (groups,), sq.dtype)
        per_group = self._convolve(geometry, sq, ones, injected=False)
        return jnp.repeat(per_group, self.features // groups, axis=-1)


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
        return self._apply(x)

    @nn.nowrap
    def _apply(self, x: Array) -> Array:
        return _weight_norm(self, x, self._kernel_shape(x), self._op)


class WeightNormConv(_ConvFields):
    r"""Weight-normalized convolution (Salimans & Kingma 2016, arXiv:1602.07868).

    .. math:: y = x * \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    with ``||v||`` the norm of each output channel's filter over (spatial..., in) (of the
    masked filter, with ``mask``). Parameters ``v`` (*kernel_size, in / feature_group_count,
    out), ``g`` (out,), ``bias`` (out,). Every field of ``flax.linen.Conv`` is accepted, in its
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
        return self._apply(x)

    @nn.nowrap
    def _apply(self, x: Array) -> Array:
        geometry = self._geometry(x)
        op = lambda x, kernel: self._convolve(geometry, x, kernel)  # noqa: E731
        return self._restore(geometry, _weight_norm(self, geometry.x, geometry.kernel_shape, op))


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
        return self._apply(x)

    @nn.nowrap
    def _apply(self, x: Array) -> Array:
        return _cosine(self, x, self._kernel_shape(x), self._op, self._patch_sumsq)


class CosineConv(_ConvPatches):
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
        return self._apply(x)

    @nn.nowrap
    def _apply(self, x: Array) -> Array:
        geometry = self._geometry(x)
        op = lambda x, kernel: self._convolve(geometry, x, kernel)  # noqa: E731
        patches = lambda x, kernel_shape: self._patch_sumsq(geometry, x, kernel_shape)  # noqa: E731
        return self._restore(geometry, _cosine(self, geometry.x, geometry.kernel_shape, op, patches))
