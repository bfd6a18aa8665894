"""Wrappers that reparameterize the weights of any linen layer: SpectralNorm and WeightNorm,
drop-ins for flax.linen's (fields, order, defaults, variable names), as true
reparameterizations: the stored parameters are never overwritten by their normalized values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import initializers

from normzoo import _stats
from normzoo import functional as F

Array = jax.Array
Initializer = Any


def _key(k: Any) -> str:
    """One step of a variable's path as flax names it (dict keys, boxed values' attributes)."""
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


class _Reparameterized(nn.Module):
    """Runs ``layer_instance`` on a view of its variables in which ``_transform`` has replaced
    some leaves; what the layer stores (at ``init``, or by mutating a collection) keeps the
    original leaves, so the stored parameters stay the unnormalized ones."""

    @nn.nowrap
    def _run(self, args, kwargs, transform, call=None) -> Any:
        originals: dict = {}

        def trans_in(variables):
            def visit(path, leaf):
                new = transform(path, leaf)
                if new is not leaf:
                    originals[path] = leaf
                return new
            return jax.tree_util.tree_map_with_path(visit, variables)

        def trans_out(variables):
            return jax.tree_util.tree_map_with_path(lambda path, leaf: originals.get(path, leaf), variables)

        call = call or (lambda layer: layer(*args, **kwargs))
        return nn.map_variables(call, trans_in_fn=trans_in, trans_out_fn=trans_out, init=self.is_initializing(),
                                mutable=True)(self.layer_instance)


class SpectralNorm(_Reparameterized):
    r"""Spectral normalization of a layer's weights (Miyato et al. 2018, arXiv:1802.05957);
    drop-in for ``flax.linen.SpectralNorm``.

    .. math:: \bar W = W / \sigma(W)

    for every parameter of ``layer_instance`` with two or more axes (as a matrix of its last
    axis: a convolution's ``(kh * kw * in, out)``), ``sigma`` estimated by ``n_steps`` power
    iterations from the stored vector ``u`` (:func:`normzoo.functional.spectral_norm`). The
    variables are flax's: ``<collection_name>/<'{layer}/{path}/u'>`` of shape ``(1, out)`` and
    ``.../sigma``, updated when ``update_stats``, so flax code and checkpoints swap unchanged.

    Where normzoo differs: it is a reparameterization. flax stores the *normalized* kernel in
    ``params`` at ``init`` (and overwrites it on every ``apply(..., mutable=True)``; flax.nnx's
    version does so on every call, flax#5576); here ``params`` keep ``W`` itself, so ``W`` is
    what the optimizer updates and ``sigma(W)`` is recomputed from it at each call. A flax
    checkpoint loads unchanged (its stored ``W`` already has ``sigma`` near 1, which dividing
    again leaves as it is). ``exact=True`` (keyword-only) takes ``sigma`` as the largest
    singular value (an SVD of each matrix: small kernels).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import normzoo
      >>> layer = normzoo.SpectralNorm(nn.Dense(3), n_steps=10)
      >>> x = jnp.ones((2, 4))
      >>> variables = layer.init(jax.random.key(0), x, update_stats=True)
      >>> sorted(variables['batch_stats'])
      ['layer_instance/kernel/sigma', 'layer_instance/kernel/u']
      >>> kernel = variables['params']['layer_instance']['kernel']     # W itself, not W / sigma
      >>> sigma = variables['batch_stats']['layer_instance/kernel/sigma']
      >>> bool(jnp.isclose(sigma, jnp.linalg.norm(kernel, 2), rtol=1e-3))
      True

    Attributes:
      layer_instance: the layer whose weights are normalized.
      n_steps: power iterations per call (0: no normalization).
      epsilon: added inside the normalizations' square roots.
      dtype: the normalized weights' dtype (default: promote the weight's, ``u``'s and
        ``sigma``'s, as flax).
      param_dtype: dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for weights with more than two axes instead of reshaping.
      collection_name: the collection of ``u`` and ``sigma``.
      exact: (keyword-only, normzoo) ``sigma`` by SVD instead of the power-iteration estimate.
      conv_aware: (keyword-only, normzoo) for a wrapped convolution, ``sigma`` is the operator
        norm of the convolution on the input the layer sees (its padding, strides and size), by
        power iteration on the convolution and its transpose
        (:func:`normzoo.functional.conv_spectral_norm`): the Lipschitz constant of the layer,
        which the reshaped kernel's norm only bounds (equinox#810). Its ``u`` has the shape of
        one input example, so these variables are not flax's.
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    exact: bool = dataclasses.field(default=False, kw_only=True)
    conv_aware: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, *args, update_stats: bool, **kwargs) -> Any:
        """Applies ``layer_instance(*args, **kwargs)`` with its weights spectrally normalized;
        ``update_stats`` (required) stores the new ``u`` and ``sigma``."""
        conv = self._convolution(args)

        def normalize(path, leaf):
            value = jnp.asarray(leaf)
            if value.ndim <= 1 or self.n_steps < 1:
                return leaf
            name = f"{self.layer_instance.name}/" + "/".join(_key(k) for k in path[1:])
            if conv is not None and _key(path[-1]) == "kernel" and value.ndim == len(conv[0]):
                return self._conv_normalize(name, value, conv, update_stats)
            if value.ndim > 2 and self.error_on_non_matrix:
                raise ValueError(
                    f"SpectralNorm: Input is {value.ndim}D but error_on_non_matrix is True (the parameter {name} "
                    f"of shape {value.shape}); pass error_on_non_matrix=False to normalize it as a matrix of its "
                    "last axis."
                )
            shape = (1, value.shape[-1])
            first = not self.has_variable(self.collection_name, name + "/u")
            u = self.variable(self.collection_name, name + "/u", jax.random.normal,
                              self.make_rng("params") if first else None, shape, self.param_dtype)
            sigma = self.variable(self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype)
            out = F.spectral_norm(value, u.value, n_steps=self.n_steps, epsilon=self.epsilon, dtype=self.dtype,
                                  exact=self.exact, layer="SpectralNorm")
            if update_stats:
                u.value, sigma.value = out.u, out.sigma
            return out.kernel

        return self._run(args, kwargs, normalize)

    @nn.nowrap
    def _convolution(self, args) -> tuple[tuple[int, ...], dict] | None:
        """With ``conv_aware``: the shape of ``u`` (one input example) and the convolution's options,
        read from the wrapped ``nn.Conv`` (or normzoo's convolutions) and its input."""
        if not self.conv_aware:
            return None
        layer = self.layer_instance
        if not hasattr(layer, "kernel_size") or isinstance(layer, nn.ConvTranspose):
            raise ValueError(
                f"SpectralNorm: conv_aware=True normalizes a convolution by its operator norm, but layer_instance is "
                f"a {type(layer).__name__}; wrap an nn.Conv (or leave conv_aware False)."
            )
        size = layer.kernel_size
        n = 1 if isinstance(size, int) else len(size)
        x = jnp.asarray(args[0])
        options = dict(strides=layer.strides, padding=layer.padding, input_dilation=layer.input_dilation,
                       kernel_dilation=layer.kernel_dilation, feature_group_count=layer.feature_group_count)
        return (1,) + tuple(x.shape[-(n + 1):]), options

    @nn.nowrap
    def _conv_normalize(self, name: str, value: Array, conv: tuple, update_stats: bool) -> Array:
        shape, options = conv
        first = not self.has_variable(self.collection_name, name + "/u")
        u = self.variable(self.collection_name, name + "/u", jax.random.normal,
                          self.make_rng("params") if first else None, shape, self.param_dtype)
        sigma = self.variable(self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype)
        if tuple(u.value.shape) != shape:
            raise ValueError(
                f"SpectralNorm: conv_aware keeps u of the input's shape, {tuple(u.value.shape)}, but this input gives "
                f"{shape}; the operator norm depends on the input size: call it with inputs of one size."
            )
        out = F.conv_spectral_norm(value, u.value, n_steps=self.n_steps, epsilon=self.epsilon, dtype=self.dtype,
                                   **options)
        if update_stats:
            u.value, sigma.value = out.u, out.sigma
        return out.kernel


class WeightNorm(_Reparameterized):
    r"""Weight normalization of any layer's weights (Salimans & Kingma 2016, arXiv:1602.07868);
    drop-in for ``flax.linen.WeightNorm``.

    .. math:: w = g \frac{v}{\lVert v \rVert}

    for each parameter of ``layer_instance`` whose path contains an entry of
    ``variable_filter`` (default: kernels; an empty filter or None: every parameter), the norm
    over every axis but ``feature_axes`` (default -1: a Dense kernel's output units; None or
    ``()``: one norm over the whole parameter) and ``g`` a learned scale of the feature axes'
    sizes, ``params/<'{layer}/{path}/scale'>`` as flax names it
    (:func:`normzoo.functional.weight_norm`, in at least float32).

    Where normzoo differs: it is a reparameterization. flax stores the normalized ``g v/||v||``
    in ``params`` at ``init``; here ``params`` keep ``v``, and the layer always computes with
    ``g v/||v||``. A flax checkpoint loads unchanged (its stored ``v`` is already of unit norm
    per unit, which normalizing again leaves as it is). For Dense and Conv layers
    :class:`WeightNormDense` and :class:`WeightNormConv` (PyTorch's ``weight_g``/``weight_v``
    layout) are the direct forms.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import normzoo
      >>> layer = normzoo.WeightNorm(nn.Dense(3))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> sorted(variables['params'])
      ['layer_instance', 'layer_instance/kernel/scale']
      >>> v = variables['params']['layer_instance']['kernel']
      >>> y = layer.apply(variables, jnp.eye(4))          # the rows of g v / ||v|| (+ bias 0)
      >>> bool(jnp.allclose(y, v / jnp.linalg.norm(v, axis=0), atol=1e-6))
      True

    Attributes:
      layer_instance: the layer whose weights are normalized.
      epsilon: added to the squared norm.
      dtype: the normalized weights' dtype (default: promote the weight's and the scale's).
      param_dtype: dtype of the scales.
      use_scale: learn ``g`` (else ``g = 1``: unit-norm weights).
      scale_init: initializer of ``g``.
      feature_axes: the axes that keep their own norm (and scale).
      variable_filter: substrings of the parameters' paths (``'{layer}/{path}'``) to normalize.
      data_init: (keyword-only, normzoo) at ``init``, set the scale and the wrapped layer's
        bias from the batch so that its outputs have zero mean and standard deviation
        ``init_scale`` per feature (Salimans & Kingma sec. 3); one normalized kernel, features
        last.
      init_scale: (keyword-only, normzoo) that standard deviation.
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    feature_axes: Any = -1
    variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})
    data_init: bool = dataclasses.field(default=False, kw_only=True)
    init_scale: float = dataclasses.field(default=1.0, kw_only=True)

    @nn.compact
    def __call__(self, *args, **kwargs) -> Any:
        """Applies ``layer_instance(*args, **kwargs)`` with its filtered weights normalized."""
        scales: list[str] = []

        def normalize(path, leaf):
            value = jnp.asarray(leaf)
            name = f"{self.layer_instance.name}/" + "/".join(_key(k) for k in path[1:])
            if self.variable_filter and not any(f in name for f in self.variable_filter):
                return leaf
            axes = () if self.feature_axes is None else _stats.canonicalize_axes(
                value.ndim, self.feature_axes, argument="feature_axes", layer="WeightNorm")
            shape = tuple(value.shape[a] for a in axes)
            scale = self.param(name + "/scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
            scales.append(name + "/scale")
            kernel = F.weight_norm(value, jnp.ones(shape, value.dtype) if scale is None else scale,
                                   epsilon=self.epsilon, feature_axes=axes)
            dtype = flax_dtypes.canonicalize_dtype(*(a for a in (leaf, scale) if a is not None), dtype=self.dtype)
            return jnp.asarray(kernel, dtype)

        if not (self.data_init and self.is_initializing()):
            return self._run(args, kwargs, normalize)

        def initialize(layer):
            # Salimans & Kingma sec. 3: scale and bias so that this batch's outputs have zero mean
            # and variance init_scale^2 per feature (the wrapped layer's bias, where it has one).
            y = layer(*args, **kwargs)
            if not scales and self.use_scale:  # map_variables' first pass: it creates the variables only
                return y
            if not self.use_scale or len(scales) != 1 or jnp.shape(self.get_variable("params", scales[0])) != y.shape[-1:]:
                raise ValueError(
                    f"WeightNorm: data_init needs one normalized weight whose scale has one entry per output "
                    f"feature (the last axis, {y.shape[-1]}); got scales {scales} with use_scale={self.use_scale}. "
                    "Use feature_axes=-1 and a variable_filter that selects one kernel, or data_init=False."
                )
            mean, var = _stats.moments(y, tuple(range(y.ndim - 1)), layer="WeightNorm")
            g = self.init_scale * jax.lax.rsqrt(var + 1e-6)
            self.put_variable("params", scales[0], jnp.asarray(g * self.get_variable("params", scales[0]),
                                                               self.param_dtype))
            if layer.has_variable("params", "bias"):
                bias = layer.get_variable("params", "bias")
                layer.put_variable("params", "bias", jnp.asarray((bias - mean) * g, jnp.result_type(bias)))
                return jnp.asarray((y - mean) * g, y.dtype)
            return jnp.asarray(y * g, y.dtype)

        return self._run(args, kwargs, normalize, initialize)
