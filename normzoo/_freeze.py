"""Freezing the batch normalizers of an existing linen model for fine-tuning (torchvision's
``FrozenBatchNorm2d`` swap, timm's ``freeze_batch_norm_2d``), without editing the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from normzoo import functional as F
from normzoo._batch import BatchNorm, BatchRenorm, FrozenBatchNorm, LpBatchNorm, NoisyBatchNorm

# The layers whose inference map is BatchNorm's over the stored mean and var (IBN's batch part is
# a BatchNorm and is frozen as one; its instance part has no batch statistics).
_FREEZABLE = (nn.BatchNorm, BatchNorm, BatchRenorm, LpBatchNorm, NoisyBatchNorm)


def _frozen(m: nn.Module, x: jax.Array):
    """``m``'s inference map as :class:`FrozenBatchNorm` computes it, from ``m``'s variables."""
    scale: Any = m.get_variable("params", "scale")
    if scale is not None and getattr(m, "scale_plus_one", False):
        scale = 1 + scale
    return F._frozen_map(x, m.get_variable("batch_stats", "mean"), m.get_variable("batch_stats", "var"), scale,
                         m.get_variable("params", "bias"), epsilon=m.epsilon, axis=m.axis, dtype=m.dtype,
                         layer=f"freeze_batch_norm ({type(m).__name__} at '{'/'.join(m.path)}')")


@contextlib.contextmanager
def freeze_batch_norm() -> Iterator[None]:
    r"""Within this context every batch normalizer of a linen model computes as
    :class:`FrozenBatchNorm`: by its stored statistics in training as at inference, updating
    nothing, with no gradient to its statistics or to its ``scale`` and ``bias``.

    .. math:: y = \mathrm{sg}(\gamma) \frac{x - \mathrm{sg}(\mu)}{\sqrt{\mathrm{sg}(\sigma^2) + \epsilon}} + \mathrm{sg}(\beta)

    For fine-tuning a pretrained model on small batches (detection, segmentation) without
    editing its code, as torchvision's ``FrozenBatchNorm2d`` and timm's
    ``freeze_batch_norm_2d`` do for PyTorch models; leaving the context is the reverse. It
    covers ``flax.linen.BatchNorm`` and normzoo's BatchNorm, BatchRenorm, LpBatchNorm,
    NoisyBatchNorm and IBN's batch part; ``model.init`` inside it initializes as usual. The
    frozen parameters get zero gradients, but an optimizer's weight decay would still move
    them: mask them with :func:`batch_norm_mask`. Models switched by a registry string can use
    ``normzoo.make("frozen_batch")`` instead (the same variables).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import normzoo
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> with normzoo.freeze_batch_norm():
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> jax.tree.all(jax.tree.map(jnp.array_equal, updates["batch_stats"], variables["batch_stats"]))
      True
    """
    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if (context.method_name not in ("__call__", "affine_map") or not isinstance(m, _FREEZABLE)
                or m.is_initializing()):
            return next_fun(*args, **kwargs)
        amap = _frozen(m, args[0])
        return amap if context.method_name == "affine_map" else amap(args[0])

    with nn.intercept_methods(intercept):
        yield


def batch_norm_mask(variables: Mapping[str, Any]) -> Any:
    """A pytree of booleans shaped like ``variables["params"]``: True for the parameters of every
    module that keeps running statistics (``batch_stats`` ``mean`` and ``var`` at the same path:
    BatchNorm and its relatives, IBN's batch part, FrozenBatchNorm).

    For an optimizer that must leave frozen normalizers alone, weight decay included, e.g.
    ``optax.chain(optax.masked(optax.set_to_zero(), mask), ...)`` or
    ``optax.multi_transform({"frozen": optax.set_to_zero(), "train": tx}, labels)`` with
    ``labels = jax.tree.map(lambda m: "frozen" if m else "train", mask)``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import normzoo
      >>> model = nn.Sequential([nn.Dense(4), normzoo.BatchNorm(use_running_average=True)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> normzoo.batch_norm_mask(variables)
      {'layers_0': {'kernel': False, 'bias': False}, 'layers_1': {'scale': True, 'bias': True}}
    """
    if "params" not in variables:
        raise ValueError(f"batch_norm_mask: variables has no 'params' (got the collections {sorted(variables)}).")
    stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    owners = {k[:-1] for k in stats if k[-1] == "mean"} & {k[:-1] for k in stats if k[-1] == "var"}
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    return traverse_util.unflatten_dict({k: k[:-1] in owners for k in flat})
