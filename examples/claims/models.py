"""The networks of the claims experiments: a VGG whose activation, normalizer, affine parameters,
placement and dropout are config values; a deep linear network; an EDSR-style super-resolution net.

Every network is built from one registry name (``normzoo.make``), so any normalizer of
``normzoo.available()`` drops in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import normzoo

ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": jnp.tanh}


class Block(nn.Module):
    """3x3 convolution, normalizer and activation; ``placement="after"`` normalizes the
    activation's output instead of its input. Sows the activation's input (``pre``)."""

    features: int
    norm: str = "batch"
    activation: str = "relu"
    affine: bool = True
    placement: str = "before"
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool):
        spec = normzoo.make(self.norm)
        norm_kw = {} if spec.is_identity or self.affine else {"use_scale": False, "use_bias": False}
        init = nn.initializers.variance_scaling(self.init_scale**2, "fan_in", "truncated_normal")
        conv = spec.conv(self.features, (3, 3), use_bias=spec.is_identity or self.placement == "after",
                         kernel_init=init)
        act = ACTIVATIONS[self.activation]
        z = conv(x)
        if self.placement == "before":
            z = spec.norm(train=train, **norm_kw)(z)
            self.sow("intermediates", "pre", z)
            return act(z)
        self.sow("intermediates", "pre", z)
        return spec.norm(train=train, **norm_kw)(act(z))


class Net(nn.Module):
    """A VGG for CIFAR-10: ``stages`` of :class:`Block`, 2x2 max pooling after each stage,
    global average pooling, dropout, one dense layer. ``blocks`` and ``head`` are separate
    submodules so that one block can be applied alone (its Jacobian)."""

    stages: Sequence[Sequence[int]] = ((16,), (32,), (64, 64), (64, 64))
    norm: str = "batch"
    activation: str = "relu"
    affine: bool = True
    placement: str = "before"
    dropout: float = 0.0
    init_scale: float = 1.0
    num_classes: int = 10

    def setup(self):
        self.blocks = [Block(w, self.norm, self.activation, self.affine, self.placement, self.init_scale)
                       for stage in self.stages for w in stage]
        self.ends = [sum(len(s) for s in self.stages[: i + 1]) - 1 for i in range(len(self.stages))]
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.num_classes)

    def blocks_list(self) -> list[int]:
        """The widths of the blocks, in order."""
        return [w for stage in self.stages for w in stage]

    def block(self, x, i: int, train: bool):
        """Block ``i`` alone, with the pooling that follows it when it ends a stage."""
        x = self.blocks[i](x, train)
        return nn.max_pool(x, (2, 2), strides=(2, 2)) if i in self.ends else x

    def __call__(self, x, train: bool):
        for i in range(len(self.blocks)):
            self.sow("intermediates", "inputs", x)
            x = self.block(x, i, train)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(self.drop(x, deterministic=not train))


class DeepLinear(nn.Module):
    """``depth`` bias-free dense layers of ``width`` (optionally each followed by a normalizer),
    no activation, then a dense output layer: Santurkar et al.'s deep linear network."""

    depth: int = 25
    width: int = 64
    norm: str = "none"
    outputs: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        spec = normzoo.make(self.norm)
        for _ in range(self.depth):
            x = spec.norm(train=train)(nn.Dense(self.width, use_bias=False)(x))
        return nn.Dense(self.outputs, use_bias=False)(x)


class _ResBlock(nn.Module):
    features: int
    norm: str
    res_scale: float

    @nn.compact
    def __call__(self, x, train: bool):
        spec = normzoo.make(self.norm)
        y = nn.Conv(self.features, (3, 3), use_bias=spec.is_identity)(x)
        y = nn.relu(spec.norm(train=train)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=spec.is_identity)(y)
        return x + self.res_scale * spec.norm(train=train)(y)


class EDSR(nn.Module):
    """EDSR-style x2 super-resolution (Lim et al. 2017): a head convolution, ``blocks`` residual
    blocks (conv, [norm], ReLU, conv, [norm], scaled by ``res_scale``), a body convolution with
    the global skip, a sub-pixel (depth-to-space) upsampler. EDSR removed BatchNorm from these
    blocks (``norm="none"``); ``norm="batch"`` puts it back as SRResNet had it. Inputs and
    outputs in [0, 1]; ``bicubic_skip`` adds the bicubic upsampling to the output (the net
    learns the residual), which lets a small net on a CPU budget beat bicubic at all."""

    features: int = 32
    blocks: int = 4
    norm: str = "none"
    res_scale: float = 1.0
    bicubic_skip: bool = True

    @nn.compact
    def __call__(self, lr_images, train: bool):
        x = nn.Conv(self.features, (3, 3))(lr_images - 0.5)
        y = x
        for _ in range(self.blocks):
            y = _ResBlock(self.features, self.norm, self.res_scale)(y, train)
        y = nn.Conv(self.features, (3, 3))(y) + x
        y = nn.Conv(3 * 4, (3, 3))(y)
        n, h, w, _ = y.shape
        y = y.reshape(n, h, w, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, 3)
        if self.bicubic_skip:
            y = y + upsample_bicubic(lr_images)
        return y + 0.5 * (not self.bicubic_skip)


def upsample_bicubic(images: jax.Array) -> jax.Array:
    n, h, w, c = images.shape
    return jax.image.resize(images, (n, 2 * h, 2 * w, c), "bicubic")


def downsample(images: jax.Array) -> jax.Array:
    """x2 downsampling by 2x2 averaging (the low-resolution inputs)."""
    n, h, w, c = images.shape
    return images.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def param_kernels(params: Any) -> list[tuple[str, jax.Array]]:
    """Every convolution's kernel of a :class:`Net`, in depth order: ``(block name, kernel)``."""
    blocks = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
    out = []
    for b in blocks:
        conv = next(k for k in params[b] if "kernel" in params[b][k])
        out.append((b, params[b][conv]["kernel"]))
    return out
