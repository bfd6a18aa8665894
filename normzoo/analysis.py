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

__all__ = ["ActivationStats", "InternalCovariateShift", "Landscape", "activation_stats", "capture",
           "distribution_shift", "internal_covariate_shift", "layer_names", "loss_landscape"]


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
    return (nn.Dense, nn.Conv, nn.ConvTranspose, nn.DenseGeneral, nn.BatchNorm, nn.LayerNorm, nn.GroupNorm,
            nn.RMSNorm, nn.InstanceNorm, _batch._Mapped, _sample.LayerNorm, _sample.GroupNorm, _sample.RMSNorm,
            _sample.InstanceNorm, _weight.WeightNormDense, _weight.WeightNormConv, _weight.CosineDense,
            _weight.CosineConv, _composite.IBN, Identity)


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
