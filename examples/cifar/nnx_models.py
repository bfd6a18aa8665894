"""The CIFAR ResNet-20 and VGG of ``models.py`` as Flax NNX models (``--config.api=nnx``).

The same architectures, the same registry switch (``normzoo.nnx.make(norm)``: one string picks the
normalizer, or the linear layers for ``weight`` and ``cosine``), the same IBN placement. The
training loop is shared with the linen models: :class:`Functional` gives an NNX model the
``init``/``apply`` of a linen one (parameters and running statistics as plain pytrees,
``train`` selecting ``model.train()`` or ``model.eval()``), so ``train.py`` jits one pure step for
both APIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from examples.cifar.models import _head_kwargs
from normzoo import nnx as nznnx


class _Block(nnx.Module):
    """Basic residual block with the option-A shortcut (``models._Block``)."""

    def __init__(self, in_features: int, features: int, strides: int, spec, early: bool, dtype, rngs: nnx.Rngs,
                 post_add: bool = False):
        conv = dict(use_bias=spec.is_identity, dtype=dtype, rngs=rngs)
        self.conv1 = spec.conv(in_features, features, (3, 3), strides=strides, **conv)
        self.norm1 = (spec.norm if early else spec.late_norm)(features, train=True, dtype=dtype, rngs=rngs)
        self.conv2 = spec.conv(features, features, (3, 3), **conv)
        self.norm2 = spec.late_norm(features, train=True, dtype=dtype, rngs=rngs)
        self.post_add = nnx.data(spec.residual_norm(features, train=True, dtype=dtype, rngs=rngs) if post_add else None)
        self.strides, self.in_features, self.features = strides, in_features, features

    def __call__(self, x):
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x
        if self.strides != 1 or self.in_features != self.features:
            shortcut = x[:, :: self.strides, :: self.strides]
            extra = self.features - self.in_features
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        y = y + shortcut
        return nnx.relu(y if self.post_add is None else self.post_add(y))


class ResNet20(nnx.Module):
    """CIFAR ResNet-20 (He et al. 2016) in NNX; arguments as ``models.ResNet20``'s fields.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from examples.cifar.nnx_models import ResNet20
      >>> model = ResNet20(norm="group", width=4, blocks_per_stage=1, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    def __init__(self, norm: str = "batch", num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3,
                 norm_overrides: Sequence[tuple[str, Any]] = (), dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        spec = nznnx.make(norm, **dict(norm_overrides))
        self.stem = spec.conv(3, width, (3, 3), use_bias=spec.is_identity, dtype=dtype, rngs=rngs)
        self.stem_norm = spec.late_norm(width, train=True, dtype=dtype, rngs=rngs)
        blocks, features = [], width
        for stage in range(3):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                post_add = spec.residual_norm is not None and stage < 2 and block == blocks_per_stage - 1
                blocks.append(_Block(features, width * 2**stage, strides, spec, stage < 2, dtype, rngs, post_add))
                features = width * 2**stage
        self.blocks = nnx.List(blocks)
        self.head = spec.dense(features, num_classes, dtype=dtype, rngs=rngs, **_head_kwargs(spec))
        self.dtype = dtype

    def __call__(self, x):
        x = nnx.relu(self.stem_norm(self.stem(jnp.asarray(x, self.dtype))))
        for block in self.blocks:
            x = block(x)
        return jnp.asarray(self.head(jnp.mean(x, axis=(1, 2))), jnp.float32)


class _ConvNorm(nnx.Module):
    def __init__(self, in_features: int, features: int, spec, make_norm, dtype, rngs: nnx.Rngs):
        self.conv = spec.conv(in_features, features, (3, 3), use_bias=spec.is_identity, dtype=dtype, rngs=rngs)
        self.norm = make_norm(features, train=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x)))


class VGG(nnx.Module):
    """The small VGG of ``models.VGG`` in NNX."""

    def __init__(self, norm: str = "batch", stages: Sequence[Sequence[int]] = ((64,), (128,), (256, 256), (512, 512), (512, 512)),
                 num_classes: int = 10, norm_overrides: Sequence[tuple[str, Any]] = (), dtype: Any = jnp.float32,
                 *, rngs: nnx.Rngs):
        spec = nznnx.make(norm, **dict(norm_overrides))
        stage_layers, features = [], 3
        for s, widths in enumerate(stages):
            layers = []
            for w in widths:
                layers.append(_ConvNorm(features, w, spec, spec.norm if s < 2 else spec.late_norm, dtype, rngs))
                features = w
            stage_layers.append(nnx.List(layers))
        self.stages = nnx.List(stage_layers)
        self.head = spec.dense(features, num_classes, dtype=dtype, rngs=rngs, **_head_kwargs(spec))
        self.dtype = dtype

    def __call__(self, x):
        x = jnp.asarray(x, self.dtype)
        for layers in self.stages:
            for layer in layers:
                x = layer(x)
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return jnp.asarray(self.head(jnp.mean(x, axis=(1, 2))), jnp.float32)


MODELS = {"resnet20": ResNet20, "vgg": VGG}


class Functional:
    """An NNX model with the ``init`` / ``apply`` of a linen one, for the shared training loop.

    ``init(key, x, train)`` builds the model with ``nnx.Rngs(key)`` and returns
    ``{"params": ..., "batch_stats": ...}`` (plain nested dicts); ``apply(variables, x, train,
    mutable=["batch_stats"])`` merges them into the model, runs it in ``model.train()`` or
    ``model.eval()`` mode and returns the output (and, if mutable, the updated statistics).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from examples.cifar.nnx_models import Functional
      >>> model = Functional("resnet20", norm="batch", width=4, blocks_per_stage=1)
      >>> v = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=True)
      >>> y, upd = model.apply(v, jnp.ones((2, 32, 32, 3)), train=True, mutable=["batch_stats"])
      >>> y.shape, sorted(upd)
      ((2, 10), ['batch_stats'])
    """

    def __init__(self, name: str, **kwargs):
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}.")
        self.name, self.kwargs = name, kwargs
        abstract = nnx.eval_shape(lambda: MODELS[name](**kwargs, rngs=nnx.Rngs(0)))
        # Parameters and running statistics, and the rng streams of noisy_batch's layers
        # (reseeded from the ``rngs`` of every call).
        self.graphdef, self._params, self._stats, self._rest = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)

    def init(self, key, x, train: bool = True) -> dict:
        model = MODELS[self.name](**self.kwargs, rngs=nnx.Rngs(key))
        _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}

    def apply(self, variables, x, train: bool, mutable=(), rngs=None):
        states = []
        for template, collection in ((self._params, "params"), (self._stats, "batch_stats")):
            state = jax.tree.map(lambda a: a, template)
            nnx.replace_by_pure_dict(state, variables.get(collection, {}))
            states.append(state)
        model = nnx.merge(self.graphdef, *states, jax.tree.map(lambda a: a, self._rest))
        if rngs is not None and jax.tree.leaves(self._rest):
            # noisy_batch's streams (forked from the model's default stream at construction).
            nnx.reseed(model, default=rngs["noise"])
        model.train() if train else model.eval()
        y = model(x)
        if not mutable:
            return y
        return y, {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
