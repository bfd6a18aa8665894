"""Flax (linen) twins of torchvision's ResNet-18, MobileNet-V2 and ConvNeXt-Tiny, written the way a
Flax user writes them (compact modules, auto-named layers, NHWC), with PyTorch's padding, epsilons
and momentum, so that ``normzoo.deploy.port_torch`` maps torchvision's state dicts onto them.

What a port has to get right, and where each model shows it:

* ResNet-18: explicit padding (PyTorch pads ``k // 2``; Flax's ``'SAME'`` pads stride-2 layers
  asymmetrically), max pooling padded with -inf, BatchNorm with PyTorch's ``epsilon=1e-5`` and
  ``momentum=0.9`` (PyTorch's 0.1), the projection shortcut called after the block's second
  convolution (PyTorch's registration order).
* MobileNet-V2: depthwise convolutions (``feature_group_count`` = channels), ReLU6.
* ConvNeXt-Tiny: PyTorch's ``LayerNorm2d`` over channels of an NCHW tensor is Flax's
  ``LayerNorm`` over the last axis of NHWC (``epsilon=1e-6`` as torchvision), exact GELU, a bare
  parameter (``layer_scale``, PyTorch ``(C, 1, 1)``, here ``(C,)``), stochastic depth (identity
  at inference, not modelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

import normzoo

# PyTorch's BatchNorm: epsilon 1e-5, running averages updated with weight 0.1 (Flax's momentum 0.9).
TorchBatchNorm = partial(normzoo.BatchNorm, momentum=0.9, epsilon=1e-5)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2),) * 2


class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = partial(TorchBatchNorm, use_running_average=not train)
        y = nn.Conv(self.features, (3, 3), self.strides, padding=_pad(3), use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding=_pad(3), use_bias=False)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.strides, padding="VALID", use_bias=False)(x)
            x = norm()(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (7, 7), 2, padding=_pad(7), use_bias=False)(x)
        x = nn.relu(TorchBatchNorm(use_running_average=not train)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
        for i, features in enumerate((64, 128, 256, 512)):
            for j in range(2):
                x = BasicBlock(features, 2 if i > 0 and j == 0 else 1)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class ConvBNReLU6(nn.Module):
    features: int
    kernel: int = 3
    strides: int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (self.kernel, self.kernel), self.strides, padding=_pad(self.kernel),
                    feature_group_count=self.groups, use_bias=False)(x)
        return nn.relu6(TorchBatchNorm(use_running_average=not train)(x))


class InvertedResidual(nn.Module):
    features: int
    strides: int
    expand: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = round(x.shape[-1] * self.expand)
        y = x
        if self.expand != 1:
            y = ConvBNReLU6(hidden, 1)(y, train)
        y = ConvBNReLU6(hidden, 3, self.strides, groups=hidden)(y, train)
        y = nn.Conv(self.features, (1, 1), use_bias=False)(y)
        y = TorchBatchNorm(use_running_average=not train)(y)
        return x + y if self.strides == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
    num_classes: int = 1000
    # (expansion t, channels c, repeats n, stride s), torchvision's table at width 1.0
    settings: Sequence[tuple[int, int, int, int]] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBNReLU6(32, 3, 2)(x, train)
        for t, c, n, s in self.settings:
            for i in range(n):
                x = InvertedResidual(c, s if i == 0 else 1, t)(x, train)
        x = ConvBNReLU6(1280, 1)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))  # dropout: identity at inference


class CNBlock(nn.Module):
    dim: int
    layer_scale: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("layer_scale", nn.initializers.constant(self.layer_scale), (self.dim,))
        y = nn.Conv(self.dim, (7, 7), padding=_pad(7), feature_group_count=self.dim)(x)
        y = nn.LayerNorm(epsilon=1e-6)(y)
        y = nn.Dense(4 * self.dim)(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.dim)(y)
        return x + scale * y


class ConvNeXtTiny(nn.Module):
    num_classes: int = 1000
    dims: Sequence[int] = (96, 192, 384, 768)
    depths: Sequence[int] = (3, 3, 9, 3)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dims[0], (4, 4), 4, padding="VALID")(x)
        x = nn.LayerNorm(epsilon=1e-6)(x)  # PyTorch's LayerNorm2d: over channels, at every pixel
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            for _ in range(depth):
                x = CNBlock(dim)(x)
            if i + 1 < len(self.dims):
                x = nn.LayerNorm(epsilon=1e-6)(x)
                x = nn.Conv(self.dims[i + 1], (2, 2), 2, padding="VALID")(x)
        x = nn.LayerNorm(epsilon=1e-6)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes)(x)
