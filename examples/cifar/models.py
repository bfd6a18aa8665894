"""CIFAR models whose normalizer is one config field (``norm``), switched through the registry.

``norm`` is any name of :func:`normzoo.available`. For ``weight`` and ``cosine`` the convolutions
and the classifier change (and the activation normalizer is the identity); for every other name
the activation normalizer changes. Layers that are not followed by a normalizer get a bias.

IBN placement follows IBN-Net. IBN-a (``ibn``): IBN replaces the first normalizer of every residual
block in the early stages (here stages 1 and 2 of 3); the stem, the second normalizer of each block
and the last stage keep plain BatchNorm (``Normalizer.late_norm``). IBN-b (``ibn_b``): BatchNorm
everywhere, and an affine InstanceNorm after the residual addition (before the ReLU) of the last
block of stages 1 and 2 (``Normalizer.residual_norm``); IBN-Net's IBN-b also puts one on the stem,
which this ResNet keeps as BatchNorm.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import normzoo


def _head_kwargs(spec: normzoo.Normalizer) -> dict[str, Any]:
    # A cosine classifier outputs values in [-1, 1]; softmax needs a learnable temperature
    # (Luo et al. 2017 sec. 3.3), started at 10 so that the logits can separate classes.
    if spec.name == "cosine":
        return {"use_scale": True, "scale_init": nn.initializers.constant(10.0), "use_bias": True}
    return {}


class _Block(nn.Module):
    """Basic residual block (two 3x3 convolutions) with the "option A" identity shortcut."""

    features: int
    strides: int
    conv: Any
    norm1: Any
    norm2: Any
    post_add: Any = None  # IBN-b: a normalizer after the addition

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.features, (3, 3), strides=self.strides)(x)
        y = nn.relu(self.norm1()(y))
        y = self.conv(self.features, (3, 3))(y)
        y = self.norm2()(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            # He et al. 2016 sec. 4.2, option A: subsample and zero-pad the channels (no parameters).
            shortcut = x[:, :: self.strides, :: self.strides]
            extra = self.features - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        y = y + shortcut
        return nn.relu(y if self.post_add is None else self.post_add()(y))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3 stages of 3 blocks, 16/32/64 channels x width/16.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from examples.cifar.models import ResNet20
      >>> model = ResNet20(norm="group", width=8)
      >>> v = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
      >>> model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False).shape
      (2, 10)

    Attributes:
      norm: registry name of the normalizer.
      num_classes: classifier outputs.
      width: channels of the first stage (16 in the paper).
      blocks_per_stage: 3 for ResNet-20 (6n+2 layers with n=3).
      norm_overrides: (field, value) pairs passed to ``normzoo.make``.
      dtype: compute dtype (e.g. bfloat16); parameters and statistics stay float32.
    """

    norm: str = "batch"
    num_classes: int = 10
    width: int = 16
    blocks_per_stage: int = 3
    norm_overrides: Sequence[tuple[str, Any]] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        spec = normzoo.make(self.norm, **dict(self.norm_overrides))
        conv = functools.partial(spec.conv, use_bias=spec.is_identity, dtype=self.dtype)
        early = functools.partial(spec.norm, train=train, dtype=self.dtype)
        late = functools.partial(spec.late_norm, train=train, dtype=self.dtype)
        x = nn.relu(late()(conv(self.width, (3, 3))(jnp.asarray(x, self.dtype))))
        for stage in range(3):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                norm1 = early if stage < 2 else late
                post_add = None
                if spec.residual_norm is not None and stage < 2 and block == self.blocks_per_stage - 1:
                    post_add = functools.partial(spec.residual_norm, train=train, dtype=self.dtype)
                x = _Block(self.width * 2**stage, strides, conv, norm1, late, post_add)(x)
        x = jnp.mean(x, axis=(1, 2))
        logits = spec.dense(self.num_classes, dtype=self.dtype, **_head_kwargs(spec))(x)
        return jnp.asarray(logits, jnp.float32)


class VGG(nn.Module):
    """A small VGG for CIFAR (the setting of Santurkar et al. 2018): 3x3 conv + norm + ReLU stacks.

    Attributes:
      norm: registry name of the normalizer.
      stages: channels of the convolutions of each stage; each stage ends with 2x2 max pooling.
      num_classes, norm_overrides, dtype: as :class:`ResNet20`.
    """

    norm: str = "batch"
    stages: Sequence[Sequence[int]] = ((64,), (128,), (256, 256), (512, 512), (512, 512))
    num_classes: int = 10
    norm_overrides: Sequence[tuple[str, Any]] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        spec = normzoo.make(self.norm, **dict(self.norm_overrides))
        x = jnp.asarray(x, self.dtype)
        for s, widths in enumerate(self.stages):
            norm = spec.norm if s < 2 else spec.late_norm
            for w in widths:
                x = spec.conv(w, (3, 3), use_bias=spec.is_identity, dtype=self.dtype)(x)
                x = nn.relu(norm(train=train, dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        logits = spec.dense(self.num_classes, dtype=self.dtype, **_head_kwargs(spec))(x)
        return jnp.asarray(logits, jnp.float32)


MODELS = {"resnet20": ResNet20, "vgg": VGG}


def create(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}.")
    return MODELS[name](**kwargs)


def param_count(params) -> int:
    return int(sum(p.size for p in jax.tree.leaves(params)))
