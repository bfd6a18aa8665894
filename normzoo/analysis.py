r"""What a normalizer does to optimization, measured on any Flax model and loss.

The measurements of Santurkar, Tsipras, Ilyas & Mądry, "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018, arXiv:1805.11604), as pure, jitted functions of a loss
``loss_fn(params, batch) -> scalar``. ``params`` is the pytree being trained; ``batch`` is
anything else the loss reads (inputs, labels, ``batch_stats``, an rng key), so one
``loss_fn`` defined once serves every step and is compiled once.

* :func:`internal_covariate_shift`, the paper's Definition 2.1: for layer ``i``,
  ``G_i = grad_{W_i} L(W^t)`` and ``G'_i = grad_{W_i} L(W_1^{t+1}, .., W_{i-1}^{t+1}, W_i^t, ..,
  W_k^t)`` on the same batch; ``||G_i - G'_i||_2`` and ``cos(G_i, G'_i)``. Costs one backward
  pass per layer, in one compiled program.
* :func:`loss_landscape`: the loss at ``theta - eta g`` for step sizes ``eta`` along the
  gradient ``g`` (the paper's "variation of the loss"), the gradient predictiveness
  ``||g - grad L(theta - eta g)||`` and the effective beta-smoothness ``max_eta ||g - grad
  L(theta - eta g)|| / ||eta g||``. Costs one forward and backward pass per step size.
* :func:`capture` and :func:`activation_stats`: the pre-activations of every linear layer
  and normalizer (percentiles, histogram, share below zero or saturated, per-channel mean
  and variance), and :func:`distribution_shift`, their change between two parameter values:
  the distributional view of internal covariate shift.
* :func:`jacobian_spectrum`: the singular values of a layer's or block's input-output Jacobian
  (exact SVD for small inputs, Lanczos on Jacobian-vector products for large ones).
* :func:`invariance_probe`: the relative change of a model's output when a layer's weights, the
  whole input or each example is re-scaled, and the ratio of the weights' gradient norms: which
  row of the invariance table a normalizer has.

Example (a two-layer linear model; the first layer has no predecessor, so its shift is 0):
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from normzoo import analysis
  >>> model = nn.Sequential([nn.Dense(4), nn.Dense(1)])
  >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> def loss_fn(params, batch):
  ...     x, y = batch
  ...     return jnp.mean((model.apply({"params": params}, x) - y) ** 2)
  >>> ics = analysis.internal_covariate_shift(loss_fn, params, (x, y), learning_rate=0.1)
  >>> ics.layers, round(float(ics.l2[0]), 4), round(float(ics.cosine[0]), 4)
  (('layers_0', 'layers_1'), 0.0, 1.0)
  >>> land = analysis.loss_landscape(loss_fn, params, (x, y), jnp.array([0.05, 0.1, 0.2]))
  >>> land.loss.shape, bool(land.smoothness > 0)
  ((3,), True)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from normzoo import _batch, _composite, _sample, _weight
from normzoo._registry import Identity
from normzoo.deploy import _sub_jaxprs

Array = jax.Array
LossFn = Callable[[Any, Any], Array]

__all__ = ["ActivationStats", "InternalCovariateShift", "Invariance", "JacobianSpectrum", "Landscape",
           "activation_stats", "capture", "distribution_shift", "internal_covariate_shift", "invariance_probe",
           "jacobian_spectrum", "layer_names", "loss_landscape"]


# ----------------------------------------------------------------------------- parameters by layer


def _ordered_leaves(tree: Any) -> list[tuple[str, Array]]:
    """``(path, leaf)`` in the order the parameters were created: Flax creates them in call
    order and nested dicts keep it, so mappings are walked in insertion order. (``jax.tree``
    sorts keys, ``Conv_10`` before ``Conv_2``, and ``jax.grad`` returns sorted dicts: a tree
    with the same keys in another order gives its leaves in the same order here.)"""
    if isinstance(tree, Mapping):
        out = []
        for key, value in tree.items():
            out += [((f"{key}/{p}" if p else str(key)), leaf) for p, leaf in _ordered_leaves(value)]
        return out
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def _leaves_like(template: Any, tree: Any) -> list[Array]:
    """``tree``'s leaves in ``template``'s order (the two have the same keys)."""
    if isinstance(template, Mapping):
        return [leaf for key in template for leaf in _leaves_like(template[key], tree[key])]
    return jax.tree.leaves(tree)


def _rebuild(template: Any, leaves: list) -> Any:
    """A tree shaped like ``template`` holding ``leaves`` (in :func:`_ordered_leaves` order)."""
    it = iter(leaves)

    def build(node):
        if isinstance(node, Mapping):
            return {k: build(v) for k, v in node.items()}
        flat, treedef = jax.tree_util.tree_flatten(node)
        return jax.tree_util.tree_unflatten(treedef, [next(it) for _ in flat])

    return build(template)


def _owner(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def _use_order(loss_fn: LossFn, params: Any, batch: Any) -> list[int]:
    """Indices of ``params``' leaves in the order the loss first reads them: the forward order
    of the layers, from the traced computation (dicts returned by ``jit`` or ``grad`` have
    sorted keys, so the parameters' own order says nothing). Leaves never read come last."""
    leaves = _leaves_like(params, params)
    closed = jax.make_jaxpr(lambda *ls: loss_fn(_rebuild(params, list(ls)), batch))(*leaves)
    order: list[int] = []

    def walk(jaxpr, tracked):
        for eqn in jaxpr.eqns:
            ins = [(i, tracked.get(v)) for i, v in enumerate(eqn.invars) if not hasattr(v, "val")]
            fresh = [(i, leaf) for i, leaf in ins if leaf is not None and leaf not in order]
            if not fresh:
                continue
            subs = list(_sub_jaxprs(eqn.params))
            if not subs:
                order.extend(dict.fromkeys(leaf for _, leaf in fresh))
                continue
            for sub in subs:  # an inner computation (jit, custom_jvp, remat, cond): look inside
                skip = len(eqn.invars) - len(sub.invars)  # cond's predicate comes first
                walk(sub, {sub.invars[i - skip]: leaf for i, leaf in fresh if 0 <= i - skip < len(sub.invars)})
            order.extend(dict.fromkeys(leaf for _, leaf in fresh if leaf not in order))

    walk(closed.jaxpr, dict(zip(closed.jaxpr.invars, range(len(leaves)))))
    return order + [i for i in range(len(leaves)) if i not in order]


def layer_names(params: Any, loss_fn: LossFn | None = None, batch: Any = None) -> tuple[str, ...]:
    """The default layers of :func:`internal_covariate_shift`: every module that owns a
    ``kernel`` (Dense, Conv, normzoo's weight-normalized and cosine layers), or every module
    that owns parameters in a model without kernels. In forward order when ``loss_fn`` and
    ``batch`` are given (the order the loss reads them), else in the parameters' order."""
    paths = [p for p, _ in _ordered_leaves(params)]
    return _default_layers(paths, _use_order(loss_fn, params, batch) if loss_fn is not None else range(len(paths)))


def _default_layers(paths: list[str], order) -> tuple[str, ...]:
    paths = [paths[i] for i in order]
    kernels = [_owner(p) for p in paths if p.rsplit("/", 1)[-1] == "kernel"]
    return tuple(dict.fromkeys(kernels or [_owner(p) for p in paths]))


def _layer_index(paths: list[str], rank: list[int], layers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: which leaves belong to it, and which the loss reads before any of them
    (``rank[j]``: the position of leaf ``j`` in the forward order)."""
    member = np.zeros((len(layers), len(paths)), bool)
    before = np.zeros((len(layers), len(paths)), bool)
    for i, layer in enumerate(layers):
        own = [j for j, p in enumerate(paths) if p == layer or p.startswith(layer + "/")]
        if not own:
            raise ValueError(
                f"internal_covariate_shift: layer {layer!r} owns no parameter; give '/'-joined "
                f"module paths of the parameters, such as {list(dict.fromkeys(map(_owner, paths)))[:3]!r}."
            )
        first = min(rank[j] for j in own)
        member[i, own] = True
        before[i] = [rank[j] < first for j in range(len(paths))]
    return member, before


# ----------------------------------------------------------------------------- internal covariate shift


def _map(f, xs: Array, chunk: int | None):
    """``f`` over the leading axis of ``xs``: unrolled (``chunk=None``), or ``jax.lax.map`` with
    ``batch_size=chunk`` (a loop over ``vmap``-ed chunks)."""
    if chunk is not None:
        return jax.lax.map(f, xs, batch_size=chunk)
    outs = [f(xs[i]) for i in range(xs.shape[0])]
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)



@functools.partial(jax.tree_util.register_dataclass, data_fields=["l2", "cosine", "grad_norm"],
                   meta_fields=["layers"])
@dataclasses.dataclass(frozen=True)
class InternalCovariateShift:
    """Per layer (``layers``, in call order): ``l2 = ||G - G'||_2``, ``cosine = cos(G, G')``
    (1 where both are zero) and ``grad_norm = ||G||_2``."""

    layers: tuple[str, ...]
    l2: Array
    cosine: Array
    grad_norm: Array


def _tree_map_masked(flags, params, updates):
    # flags: one bool per leaf, in _ordered_leaves order; returns params + flags * updates.
    leaves, steps = _leaves_like(params, params), _leaves_like(params, updates)
    return _rebuild(params, [p + jnp.where(f, u, jnp.zeros_like(u)) for f, p, u in zip(flags, leaves, steps)])


@functools.partial(jax.jit, static_argnames=("loss_fn", "layers", "chunk"))
def internal_covariate_shift(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    updates: Any = None,
    *,
    learning_rate: float | Array | None = None,
    layers: tuple[str, ...] | None = None,
    chunk: int | None = None,
) -> InternalCovariateShift:
    r"""Internal covariate shift as Santurkar et al. 2018 define it (Definition 2.1).

    .. math::
        G_i = \nabla_{W_i} L(W_1^t, \dots, W_k^t), \qquad
        G'_i = \nabla_{W_i} L(W_1^{t+1}, \dots, W_{i-1}^{t+1}, W_i^t, \dots, W_k^t)

    on the same batch, where ``W^{t+1} = W^t + updates`` is the step the optimizer takes from
    ``params`` (plain SGD: ``updates = -learning_rate * G``). Every parameter created before
    layer ``i``'s first one (normalizers' scales and biases included) counts as preceding it.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; keep it the same function across calls
        (it is a static argument: a new function compiles anew).
      params: the parameters at step ``t``.
      batch: everything else the loss reads.
      updates: the optimizer's update for this step (``optax``'s ``updates``), a pytree like
        ``params``; or give ``learning_rate`` for plain SGD.
      learning_rate: with ``updates=None``, the SGD step ``-learning_rate * G``.
      layers: '/'-joined module paths of the layers to report (default
        :func:`layer_names`: every module with a ``kernel``, in forward order).
      chunk: None (default): the per-layer backward passes are unrolled into one program,
        whose shared work XLA computes once (a few gradients' time for a whole network); an
        int: ``jax.lax.map`` over ``vmap``-ed chunks of that many layers, which bounds memory
        and compilation time for very deep models but runs a batch of different weights
        through each layer, i.e. grouped convolutions, which are far slower.

    Returns:
      :class:`InternalCovariateShift`; one backward pass per layer plus one.
    """
    if (updates is None) == (learning_rate is None):
        raise ValueError(
            "internal_covariate_shift: give exactly one of updates (the optimizer's step, a pytree "
            "like params) and learning_rate (plain SGD: updates = -learning_rate * grad)."
        )
    grads = jax.grad(loss_fn)(params, batch)
    if learning_rate is not None:
        rate = learning_rate
        updates = jax.tree.map(lambda g: -rate * g, grads)
    paths = [p for p, _ in _ordered_leaves(params)]
    use = _use_order(loss_fn, params, batch)
    rank = [use.index(j) for j in range(len(paths))]
    layers = _default_layers(paths, use) if layers is None else tuple(layers)
    member, before = _layer_index(paths, rank, layers)

    def shifted_grad(flags):
        return _leaves_like(params, jax.grad(loss_fn)(_tree_map_masked(flags, params, updates), batch))

    shifted = _map(shifted_grad, jnp.asarray(before), chunk)
    g = _leaves_like(params, grads)
    rows = []
    for i in range(len(layers)):
        own = np.flatnonzero(member[i])
        a = jnp.concatenate([jnp.ravel(g[j]) for j in own])
        b = jnp.concatenate([jnp.ravel(shifted[j][i]) for j in own])
        na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
        cos = jnp.where(na * nb > 0, jnp.vdot(a, b) / jnp.maximum(na * nb, jnp.finfo(na.dtype).tiny),
                        jnp.where(na + nb > 0, 0.0, 1.0))
        rows.append((jnp.linalg.norm(a - b), cos, na))
    l2, cosine, norm = (jnp.stack(c) for c in zip(*rows))
    return InternalCovariateShift(layers, l2, cosine, norm)


# ----------------------------------------------------------------------------- landscape along the gradient


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step_sizes", "loss", "grad_distance", "loss0", "grad_norm"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Landscape:
    r"""The loss and gradient along ``theta - eta d`` (``d``: the gradient, or the given direction).

    Attributes:
      step_sizes: the ``eta`` values.
      loss: ``L(theta - eta d)`` per step size; its range is the paper's "variation of the loss".
      grad_distance: ``||grad L(theta) - grad L(theta - eta d)||_2`` per step size (gradient
        predictiveness: small means the gradient stays predictive along the step).
      loss0: ``L(theta)``.
      grad_norm: ``||d||_2``.
    """

    step_sizes: Array
    loss: Array
    grad_distance: Array
    loss0: Array
    grad_norm: Array

    @property
    def smoothness(self) -> Array:
        r"""Effective beta-smoothness: ``max_eta ||grad L(theta) - grad L(theta - eta d)|| / ||eta d||``."""
        moved = jnp.abs(self.step_sizes) * self.grad_norm
        return jnp.max(jnp.where(moved > 0, self.grad_distance / jnp.where(moved > 0, moved, 1.0), 0.0))


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk"))
def loss_landscape(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    step_sizes: Array,
    direction: Any = None,
    *,
    chunk: int | None = None,
) -> Landscape:
    r"""The loss landscape along the gradient at ``params`` (Santurkar et al. 2018, sec. 3.1).

    For every ``eta`` in ``step_sizes``: ``L(theta - eta d)`` and ``||g - grad L(theta - eta
    d)||_2``, where ``g = grad L(theta)`` and ``d = g`` unless ``direction`` is given. The
    paper moves along the gradient with steps of 1/2 to 4 times the learning rate.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (static, as in
        :func:`internal_covariate_shift`).
      params, batch: the point and the batch.
      step_sizes: 1-D array of ``eta``.
      direction: a pytree like ``params`` to move along instead of the gradient.
      chunk: None (default): the step sizes unrolled into one program; an int: ``jax.lax.map``
        over ``vmap``-ed chunks of that many (see :func:`internal_covariate_shift`).

    Returns:
      :class:`Landscape`; costs one forward and backward pass per step size, plus one.
    """
    step_sizes = jnp.asarray(step_sizes)
    if step_sizes.ndim != 1:
        raise ValueError(f"loss_landscape: step_sizes must be 1-D, got shape {step_sizes.shape}.")
    loss0, g = jax.value_and_grad(loss_fn)(params, batch)
    d = g if direction is None else direction
    g_flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])

    def at(eta):
        moved = jax.tree.map(lambda p, v: p - eta * v, params, d)
        loss, g_eta = jax.value_and_grad(loss_fn)(moved, batch)
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g_eta)])
        return loss, jnp.linalg.norm(g_flat - flat)

    loss, dist = _map(at, step_sizes, chunk)
    d_norm = jnp.linalg.norm(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(d)]))
    return Landscape(step_sizes, loss, dist, loss0, d_norm)


# ----------------------------------------------------------------------------- activation probes


def _probed() -> tuple[type, ...]:
    from normzoo import _whiten

    return (nn.Dense, nn.Conv, nn.ConvTranspose, nn.DenseGeneral, nn.BatchNorm, nn.LayerNorm, nn.GroupNorm,
            nn.RMSNorm, nn.InstanceNorm, _batch._Mapped, _sample.LayerNorm, _sample.GroupNorm, _sample.RMSNorm,
            _sample.InstanceNorm, _weight.WeightNormDense, _weight.WeightNormConv, _weight.CosineDense,
            _weight.CosineConv, _composite.IBN, Identity, _whiten.IterNorm)


def capture(model: nn.Module, variables: Any, *args, filter: Callable | None = None, **apply_kwargs):
    """Runs ``model.apply(variables, *args, **apply_kwargs)`` and returns ``(output,
    activations)``: ``activations`` maps each probed module's path ('/'-joined) to its output.

    By default the probed modules are the linear layers (Dense, Conv and normzoo's weight
    layers: the pre-activations before normalization) and the normalizers (flax's and
    normzoo's: the pre-activations after it). ``filter(module, method_name) -> bool``
    chooses others (flax's ``capture_intermediates``). Traceable; ``apply_kwargs`` may hold
    ``mutable`` and ``rngs`` as for ``apply`` (their updates are dropped).
    """
    probed = _probed()
    chosen = filter or (lambda m, name: name == "__call__" and isinstance(m, probed))
    mutable = apply_kwargs.pop("mutable", False)
    mutable = ["intermediates"] + ([] if mutable is False else [mutable] if isinstance(mutable, str) else list(mutable))
    out, state = model.apply(variables, *args, capture_intermediates=chosen, mutable=mutable, **apply_kwargs)
    acts = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if keys[-2:-1] == ["__call__"]:
            keys = keys[:-2] + ([keys[-1]] if keys[-1] != "0" else [])
        acts["/".join(keys)] = leaf
    return out, acts


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["mean", "std", "percentiles", "negative", "saturated", "histogram",
                                "channel_mean", "channel_var"],
                   meta_fields=["quantiles", "edges"])
@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Summary of one layer's activations.

    Attributes:
      mean, std: over every element.
      percentiles: at ``quantiles`` (in percent).
      negative: share of elements < 0 (what a following ReLU zeroes).
      saturated: share with ``|x| > saturation`` (where tanh and sigmoid are flat).
      histogram: counts per bin of ``edges`` (elements outside are clipped into the end bins).
      channel_mean, channel_var: per channel (last axis), over every other axis.
    """

    quantiles: tuple[float, ...]
    edges: tuple[float, ...]
    mean: Array
    std: Array
    percentiles: Array
    negative: Array
    saturated: Array
    histogram: Array
    channel_mean: Array
    channel_var: Array


@functools.partial(jax.jit, static_argnames=("quantiles", "edges", "saturation"))
def activation_stats(
    activations: Mapping[str, Array],
    quantiles: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0),
    edges: tuple[float, ...] = tuple(np.linspace(-6.0, 6.0, 49).tolist()),
    saturation: float = 2.0,
) -> dict[str, ActivationStats]:
    """:class:`ActivationStats` of each array in ``activations`` (e.g. from :func:`capture`),
    computed in float32."""
    out = {}
    for name, a in activations.items():
        a = jnp.asarray(a, jnp.promote_types(a.dtype, jnp.float32))
        flat = jnp.ravel(a)
        e = jnp.asarray(edges, flat.dtype)
        hist = jnp.histogram(jnp.clip(flat, e[0], e[-1]), bins=e)[0]
        per_channel = jnp.reshape(a, (-1, a.shape[-1])) if a.ndim else jnp.reshape(a, (1, 1))
        out[name] = ActivationStats(
            tuple(quantiles), tuple(edges), jnp.mean(flat), jnp.std(flat),
            jnp.percentile(flat, jnp.asarray(quantiles)), jnp.mean(flat < 0), jnp.mean(jnp.abs(flat) > saturation),
            hist, jnp.mean(per_channel, 0), jnp.var(per_channel, 0),
        )
    return out


def distribution_shift(before: Mapping[str, ActivationStats], after: Mapping[str, ActivationStats]) -> dict[str, dict[str, Array]]:
    """The distributional view of internal covariate shift: per layer, the mean over channels
    of ``|change of the channel mean|`` and ``|change of the channel standard deviation|``
    between two :func:`activation_stats` of the same batch (e.g. before and after a step)."""
    out = {}
    for name in before:
        b, a = before[name], after[name]
        out[name] = {
            "mean": jnp.mean(jnp.abs(a.channel_mean - b.channel_mean)),
            "std": jnp.mean(jnp.abs(jnp.sqrt(a.channel_var) - jnp.sqrt(b.channel_var))),
        }
    return out


# ----------------------------------------------------------------------------- Jacobian spectrum


@dataclasses.dataclass(frozen=True)
class JacobianSpectrum:
    """The singular values of the Jacobian ``J = d fn(x) / d x`` (inputs and outputs flattened).

    Attributes:
      singular_values: descending. Exact: all ``min(out, in)`` of them. Lanczos: the Ritz
        values' square roots, one per iteration (the extremes converge first; the interior
        ones are a coarse picture of the spectrum).
      weights: the share of the spectrum each value stands for (exact: ``1/len``; Lanczos: the
        squared first components of the tridiagonal matrix's eigenvectors, the stochastic
        Lanczos quadrature weights), summing to 1: ``histogram`` uses them.
      method: ``"exact"`` or ``"lanczos"``.
      shape: ``(out_size, in_size)`` of ``J``.
    """

    singular_values: np.ndarray
    weights: np.ndarray
    method: str
    shape: tuple[int, int]

    @property
    def largest(self) -> float:
        """The largest singular value (the operator norm of ``J``)."""
        return float(self.singular_values[0])

    @property
    def smallest(self) -> float:
        """The smallest singular value found (0 when ``J`` has a null space, as BatchNorm's
        Jacobian over the batch has: the mean and scale directions of each channel)."""
        return float(self.singular_values[-1])

    def smallest_nonzero(self, rtol: float = 1e-4) -> float:
        """The smallest singular value above ``rtol * largest``."""
        s = self.singular_values[self.singular_values > rtol * self.largest]
        return float(s[-1]) if s.size else 0.0

    def histogram(self, edges: Sequence[float]) -> np.ndarray:
        """The share of singular values in each bin of ``edges`` (values outside are dropped)."""
        return np.histogram(self.singular_values, bins=np.asarray(edges), weights=self.weights)[0]


def _flat_fn(fn: Callable[[Array], Array], x: Array) -> tuple[Callable[[Array], Array], Array]:
    shape, dtype = x.shape, jnp.promote_types(x.dtype, jnp.float32)
    return (lambda v: jnp.ravel(jnp.asarray(fn(jnp.reshape(v, shape)), dtype))), jnp.ravel(jnp.asarray(x, dtype))


@functools.partial(jax.jit, static_argnames=("fn", "iterations"))
def _lanczos(fn, x: Array, v0: Array, iterations: int):
    """Lanczos with full re-orthogonalization on ``J^T J`` (one JVP and one VJP per step)."""
    _, vjp = jax.vjp(fn, x)
    linear = jax.linearize(fn, x)[1]

    def gram(v):
        return vjp(linear(v))[0]

    n = x.size
    basis = jnp.zeros((iterations + 1, n), x.dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def step(j, carry):
        basis, alpha, beta = carry
        v = basis[j]
        w = gram(v)
        a = jnp.vdot(v, w)
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        ok = b > 1e-6 * jnp.maximum(jnp.abs(a), 1e-30)
        basis = basis.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0))
        return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))

    init = (basis, jnp.zeros(iterations, x.dtype), jnp.zeros(iterations, x.dtype))
    _, alpha, beta = jax.lax.fori_loop(0, iterations, step, init)
    return alpha, beta


def jacobian_spectrum(
    fn: Callable[[Array], Array],
    x: Array,
    *,
    method: str = "auto",
    iterations: int = 64,
    key: Array | None = None,
    max_exact: int = 4096,
) -> JacobianSpectrum:
    r"""The singular values of the input–output Jacobian of ``fn`` at ``x``.

    ``fn`` maps an array to an array (a layer or block with its variables closed over, e.g.
    ``lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]``); ``J`` is
    the Jacobian of the flattened output with respect to the flattened input, so for a layer
    with batch statistics it includes the coupling between examples.

    * ``method="exact"``: ``J`` by forward-mode differentiation and all its singular values by
      SVD (float64 on the host); for inputs of up to a few thousand elements.
    * ``method="lanczos"``: ``iterations`` steps of Lanczos with full re-orthogonalization on
      ``J^T J``, each one Jacobian-vector and one vector-Jacobian product, never forming ``J``:
      the largest singular value converges in a few tens of steps; the smallest and the
      interior ones are estimates (Ritz values), and ``weights`` are the stochastic Lanczos
      quadrature weights of the spectral density from one random start vector (``key``).
    * ``method="auto"``: exact when the input has at most ``max_exact`` elements.

    Example (a linear map with singular values 3, 2 and 0.5):
      >>> import jax.numpy as jnp
      >>> from normzoo import analysis
      >>> m = jnp.diag(jnp.array([3.0, 2.0, 0.5]))
      >>> s = analysis.jacobian_spectrum(lambda x: m @ x, jnp.ones(3))
      >>> s.singular_values.round(4).tolist(), s.method
      ([3.0, 2.0, 0.5], 'exact')
      >>> round(analysis.jacobian_spectrum(lambda x: m @ x, jnp.ones(3), method="lanczos").largest, 4)
      3.0
    """
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"jacobian_spectrum: method={method!r}; use 'auto', 'exact' or 'lanczos'.")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"jacobian_spectrum: iterations={iterations!r} must be a positive int.")
    x = jnp.asarray(x)
    flat, v = _flat_fn(fn, x)
    out_size = int(jax.eval_shape(flat, v).size)
    shape = (out_size, int(v.size))
    if method == "auto":
        method = "exact" if v.size <= max_exact else "lanczos"
    if method == "exact":
        jac = np.asarray(jax.jit(jax.jacfwd(flat))(v), np.float64)
        s = np.linalg.svd(jac, compute_uv=False)
        return JacobianSpectrum(s, np.full(s.shape, 1.0 / max(s.size, 1)), "exact", shape)
    k = min(iterations, int(v.size))
    v0 = jax.random.normal(jax.random.key(0) if key is None else key, v.shape, v.dtype)
    alpha, beta = (np.asarray(a, np.float64) for a in _lanczos(flat, v, v0, k))
    steps = k
    stops = np.flatnonzero(beta[: k - 1] == 0)  # an invariant subspace: the rest is padding
    if stops.size:
        steps = int(stops[0]) + 1
    tri = np.diag(alpha[:steps]) + np.diag(beta[: steps - 1], 1) + np.diag(beta[: steps - 1], -1)
    theta, vecs = np.linalg.eigh(tri)
    order = np.argsort(theta)[::-1]
    s = np.sqrt(np.clip(theta[order], 0.0, None))
    return JacobianSpectrum(s, vecs[0, order] ** 2, "lanczos", shape)


# ----------------------------------------------------------------------------- invariance probe


@dataclasses.dataclass(frozen=True)
class Invariance:
    """What re-scaling does to a model, per factor ``a`` in ``factors``.

    Attributes:
      factors: the scale factors.
      weights_output: ``||f(aW, x) - f(W, x)|| / ||f(W, x)||`` with the chosen weights ``W``
        multiplied by ``a`` (0 for a normalizer that undoes it: BatchNorm after the layer,
        weight normalization, cosine normalization).
      weights_grad_ratio: ``||grad_W L(aW)|| / ||grad_W L(W)||`` for a fixed random linear
        loss of the output: ``1/a`` where the output is invariant (the gradient shrinks as the
        weights grow, an automatic learning-rate decay).
      input_output: ``||f(W, a x) - f(W, x)|| / ||f(W, x)||``: the whole input (dataset)
        re-scaled.
      example_output: the same with each example ``i`` re-scaled by its own factor, ``a``
        raised to powers spread evenly over [-1, 1] across the batch.
    """

    factors: tuple[float, ...]
    weights_output: np.ndarray
    weights_grad_ratio: np.ndarray
    input_output: np.ndarray
    example_output: np.ndarray


def _select(params: Any, weights: str | Callable[[str, Any], bool]) -> list[bool]:
    paths = [p for p, _ in _ordered_leaves(params)]
    if callable(weights):
        return [bool(weights(p, leaf)) for p, leaf in _ordered_leaves(params)]
    return [p == weights or p.endswith("/" + weights) or p.startswith(weights + "/") for p in paths]


def invariance_probe(
    fn: Callable[[Any, Array], Array],
    params: Any,
    x: Array,
    *,
    weights: str | Callable[[str, Any], bool] = "kernel",
    factors: Sequence[float] = (0.1, 0.5, 2.0, 10.0),
    key: Array | None = None,
) -> Invariance:
    r"""Measures which re-scalings ``fn(params, x)`` is invariant to (the invariance table of
    the normalization framework :math:`h = f(g \cdot (x - \mu)/\sigma + b)`).

    For each factor ``a``: the relative change of the output when the weights chosen by
    ``weights`` are multiplied by ``a`` (with the ratio of their gradient norms), when the whole
    input is multiplied by ``a``, and when each example is multiplied by its own factor
    (``a ** t_i``, ``t_i`` evenly spaced in [-1, 1]). The axis 0 of ``x`` is the batch.

    ``weights`` is a parameter path (``"Dense_0/kernel"``), a last path component matched
    anywhere (the default ``"kernel"``: every kernel), a module path (``"Dense_0"``: all of its
    parameters), or ``weights(path, leaf) -> bool``. The gradient is of ``sum(r * fn(params,
    x))`` for a fixed random ``r`` (``key``); for an output invariant to the re-scaling it is
    exactly ``1/a`` times the original for any loss.

    Example (BatchNorm after a Dense layer undoes its kernel's scale, LayerNorm each example's):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import normzoo
      >>> from normzoo import analysis
      >>> x = jax.random.normal(jax.random.key(0), (16, 8))
      >>> def probe(norm):
      ...     model = nn.Sequential([nn.Dense(8, use_bias=False), norm])
      ...     variables = model.init(jax.random.key(1), x)
      ...     fn = lambda p, x: model.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]
      ...     return analysis.invariance_probe(fn, variables["params"], x, factors=(10.0,))
      >>> bn, ln = probe(normzoo.BatchNorm(use_running_average=False)), probe(normzoo.LayerNorm())
      >>> [bool(bn.weights_output[0] < 1e-4), bool(bn.example_output[0] < 1e-4)]
      [True, False]
      >>> [bool(ln.weights_output[0] < 1e-4), bool(ln.example_output[0] < 1e-4)]
      [True, True]
      >>> round(float(bn.weights_grad_ratio[0]), 3)
      0.1
    """
    factors = tuple(float(a) for a in factors)
    if not factors or any(not np.isfinite(a) or a <= 0 for a in factors):
        raise ValueError(f"invariance_probe: factors={factors!r} must be finite and positive.")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"invariance_probe: x of shape {x.shape} needs a batch axis 0.")
    chosen = _select(params, weights)
    if not any(chosen):
        paths = [p for p, _ in _ordered_leaves(params)]
        raise ValueError(f"invariance_probe: weights={weights!r} selects no parameter; the paths are {paths}.")
    base = jax.eval_shape(fn, params, x)
    r = jax.random.normal(jax.random.key(1) if key is None else key, base.shape, jnp.float32)
    t = jnp.linspace(-1.0, 1.0, x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))

    def scaled(a):
        leaves = _leaves_like(params, params)
        return _rebuild(params, [leaf * a if c else leaf for c, leaf in zip(chosen, leaves)])

    def grad_norm(p):
        g = jax.grad(lambda q: jnp.sum(r * jnp.asarray(fn(q, x), jnp.float32)))(p)
        gs = [leaf for c, leaf in zip(chosen, _leaves_like(params, g)) if c]
        return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32))) for leaf in gs))

    @jax.jit
    def measure(params, x, a):
        y = jnp.asarray(fn(params, x), jnp.float32)
        norm = jnp.linalg.norm(y)

        def change(z):
            return jnp.linalg.norm(jnp.asarray(z, jnp.float32) - y) / norm

        g0 = grad_norm(params)
        return (change(fn(scaled(a), x)), grad_norm(scaled(a)) / g0,
                change(fn(params, x * a)), change(fn(params, x * a ** t)))

    rows = [jax.device_get(measure(params, x, jnp.float32(a))) for a in factors]
    cols = [np.asarray([row[i] for row in rows], np.float64) for i in range(4)]
    return Invariance(factors, *cols)
