"""The registry: one string switches the normalizer."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import normzoo
from tests.conftest import some_slow

NAMES = ["batch", "batch_renorm", "instance", "layer", "group", "rms", "weight", "cosine", "ibn", "ibn_b", "none",
         "noisy_batch", "l1_batch", "l2_batch", "linf_batch", "frozen_batch", "frn", "grn", "group_ws", "evonorm_s0",
         "evonorm_b0", "iter"]


def test_available_lists_every_name():
    assert normzoo.available() == NAMES


@pytest.mark.parametrize("name,norm_cls,conv_cls", [
    ("batch", normzoo.BatchNorm, nn.Conv), ("batch_renorm", normzoo.BatchRenorm, nn.Conv),
    ("instance", normzoo.InstanceNorm, nn.Conv), ("layer", normzoo.LayerNorm, nn.Conv),
    ("group", normzoo.GroupNorm, nn.Conv), ("rms", normzoo.RMSNorm, nn.Conv),
    ("weight", normzoo.Identity, normzoo.WeightNormConv), ("cosine", normzoo.Identity, normzoo.CosineConv),
    ("ibn", normzoo.IBN, nn.Conv), ("none", normzoo.Identity, nn.Conv),
    ("frozen_batch", normzoo.FrozenBatchNorm, nn.Conv),
])
def test_make_returns_the_right_layers(name, norm_cls, conv_cls):
    spec = normzoo.make(name)
    assert spec.name == name
    assert type(spec.norm(train=True)) is norm_cls
    assert type(spec.conv(4, (3, 3))) is conv_cls
    assert spec.is_identity == (norm_cls is normzoo.Identity)


def test_train_flag_reaches_batch_layers():
    spec = normzoo.make("batch")
    assert spec.norm(train=True).use_running_average is False
    assert spec.norm(train=False).use_running_average is True


def test_overrides_reach_the_layer():
    spec = normzoo.make("batch_renorm", r_max=2.0, warmup_steps=10)
    layer = spec.norm(train=True)
    assert (layer.r_max, layer.warmup_steps) == (2.0, 10)
    assert normzoo.make("cosine", use_scale=True).dense(3).use_scale
    assert normzoo.make("group", num_groups=2).norm(train=True).num_groups == 2


def test_weight_mean_only_option_and_ibn_late_norm():
    spec = normzoo.make("weight", mean_only_bn=True)
    assert type(spec.norm(train=True)) is normzoo.MeanOnlyBatchNorm and not spec.is_identity
    ibn = normzoo.make("ibn", ratio=0.25, momentum=0.9)
    late = ibn.late_norm(train=True)
    assert type(late) is normzoo.BatchNorm and late.momentum == 0.9
    assert ibn.norm(train=True).ratio == 0.25


def test_identity_returns_input():
    x = np.arange(6.0).reshape(2, 3)
    y, v = normzoo.make("none").norm(train=True).init_with_output(jax.random.key(0), x, mask=None)
    np.testing.assert_array_equal(y, x)
    assert v == {}


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown normalizer 'batchnorm'; known names: batch, batch_renorm, .*none"):
        normzoo.make("batchnorm")


@pytest.mark.parametrize("name,bad", [("batch", "r_max"), ("cosine", "momentum"), ("none", "epsilon")])
def test_unknown_override_names_the_valid_fields(name, bad):
    with pytest.raises(TypeError, match=rf"make\('{name}'\): \['{bad}'\] are not fields of .*valid overrides"):
        normzoo.make(name, **{bad: 1})


def test_train_must_be_given():
    with pytest.raises(TypeError, match="train"):
        normzoo.make("batch").norm()


# The analysis variants share BatchNorm's registry row kind: they run with -m slow.
@pytest.mark.parametrize("name", some_slow(NAMES, fast=set(NAMES[:10])))
def test_batch_statistics_property_says_whether_other_examples_matter(name):
    """The property the examples derive from: output depends on the other examples."""
    spec = normzoo.make(name)
    x = np.random.default_rng(0).normal(size=(4, 3, 3, 4)).astype(np.float32)
    layer = spec.norm(train=True)
    v = layer.init(jax.random.key(0), x)
    rngs = {"noise": jax.random.key(1)}  # noisy_batch's noise (its shape differs too: it depends anyway)
    y_all, _ = layer.apply(v, x, mutable=["batch_stats"], rngs=rngs)
    y_one, _ = layer.apply(v, x[:2], mutable=["batch_stats"], rngs=rngs)
    depends = not np.allclose(y_all[:2], y_one, atol=1e-6)
    # frozen_batch keeps BatchNorm's variables, fixed: its output never depends on the batch.
    assert spec.batch_statistics == depends == ("batch_stats" in v and name != "frozen_batch")
    weight = normzoo.make("weight", mean_only_bn=True)
    assert weight.batch_statistics and not weight.is_identity


def test_ibn_b_places_instance_norm_after_the_addition_of_the_early_stages_last_blocks():
    from examples.cifar.models import ResNet20

    assert all(normzoo.make(n).residual_norm is None for n in normzoo.available() if n != "ibn_b")
    spec = normzoo.make("ibn_b")
    assert type(spec.norm(train=True)) is normzoo.BatchNorm and type(spec.residual_norm(train=True)) is normzoo.InstanceNorm
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    v = ResNet20(norm="ibn_b", width=4, blocks_per_stage=2).init(jax.random.key(0), x, train=False)
    with_in = sorted(k for k, p in v["params"].items() if k.startswith("_Block") and "InstanceNorm_0" in p)
    assert with_in == ["_Block_1", "_Block_3"]  # the last block of stages 1 and 2 (of 3), 2 blocks each
    # Without the InstanceNorms' parameters the rest is the BatchNorm model's, name for name.
    plain = ResNet20(norm="batch", width=4, blocks_per_stage=2).init(jax.random.key(0), x, train=False)
    strip = {k: {n: p for n, p in b.items() if n != "InstanceNorm_0"} if isinstance(b, dict) else b
             for k, b in v["params"].items()}
    assert jax.tree.structure(strip) == jax.tree.structure(plain["params"])
