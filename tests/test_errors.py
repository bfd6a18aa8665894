"""Every error message, matched by a regex: it names the argument, the value and the fix."""

from flax import errors as flax_errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo

X4 = jnp.ones((4, 6, 6, 8))
KEY = jax.random.key(0)


def init(layer, x=X4, **kw):
    return layer.init(KEY, x, **kw)


@pytest.mark.parametrize("layer,kw,exc,pattern", [
    (normzoo.BatchNorm(axis=4), {"use_running_average": False}, ValueError,
     r"BatchNorm: `axis`=\(4,\) is out of range for an input of rank 4; use axes in \[-4, 3\]"),
    (normzoo.BatchNorm(axis=(1, -3)), {"use_running_average": False}, ValueError,
     r"BatchNorm: `axis`=\(1, -3\) names the same axis twice"),
    (normzoo.BatchNorm(axis="C"), {"use_running_average": False}, TypeError,
     r"BatchNorm: `axis` must be an int or a sequence of ints, got 'C'"),
    (normzoo.BatchNorm(momentum=1.5), {"use_running_average": False}, ValueError,
     r"BatchNorm: momentum=1.5 must lie in \[0, 1\].*PyTorch's 0.1 is 0.9 here"),
    (normzoo.BatchNorm(virtual_batch_size=3), {"use_running_average": False}, ValueError,
     r"BatchNorm: virtual_batch_size=3 must divide the batch dimension \(axis 0\) .*\(4, 6, 6, 8\)"),
    (normzoo.BatchNorm(virtual_batch_size=0), {"use_running_average": False}, ValueError,
     r"BatchNorm: virtual_batch_size=0 must be a positive int or None"),
    (normzoo.BatchNorm(virtual_batch_size=2, axis=0), {"use_running_average": False}, ValueError,
     r"BatchNorm: virtual_batch_size needs axis 0 to be the batch axis"),
    (normzoo.BatchRenorm(r_max=0.5), {"use_running_average": False}, ValueError,
     r"BatchRenorm: r_max=0.5 must be >= 1 .*use r_max=1 for plain BatchNorm"),
    (normzoo.BatchRenorm(d_max=-1.0), {"use_running_average": False}, ValueError,
     r"BatchRenorm: d_max=-1.0 must be >= 0 .*use d_max=0 for plain BatchNorm"),
    (normzoo.BatchRenorm(warmup_steps=-2), {"use_running_average": False}, ValueError,
     r"BatchRenorm: warmup_steps=-2 must be an int >= 0"),
    (normzoo.BatchRenorm(warmup_schedule="cosine"), {"use_running_average": False}, ValueError,
     r"BatchRenorm: warmup_schedule='cosine' is not one of \['linear', 'step'\]; use 'linear' \(the paper\) or 'step' \(CrossQ / sbx\)"),
    (normzoo.sbx.BatchRenorm(warmup_steps=-1), {"use_running_average": False}, ValueError,
     r"BatchRenorm: warmup_steps=-1 must be a number >= 0"),
    (normzoo.sbx.BatchRenorm(warmup_steps=10, warm_up_steps=10), {"use_running_average": False}, ValueError,
     r"BatchRenorm: warmup_steps=10 and warm_up_steps=10 were both given; they are the same field .*: give one"),
    (normzoo.IBN(ratio=1.5), {"use_running_average": False}, ValueError,
     r"IBN: ratio=1.5 must lie in \[0, 1\]"),
    (normzoo.IBN(axis=(1, 2)), {"use_running_average": False}, ValueError,
     r"IBN: axis=\(1, 2\) must be a single int"),
    (normzoo.GroupNorm(num_groups=3), {}, ValueError,
     r"GroupNorm: num_groups=3 must be positive and divide the 8 channels of the input \(shape \(4, 6, 6, 8\)\); choose a divisor of 8"),
    (normzoo.GroupNorm(num_groups=None, group_size=3), {}, ValueError,
     r"GroupNorm: group_size=3 must be positive and divide the 8 channels"),
    (normzoo.GroupNorm(num_groups=2, group_size=4), {}, ValueError,
     r"GroupNorm: give exactly one of num_groups=2 and group_size=4; to use group_size pass num_groups=None"),
    (normzoo.GroupNorm(reduction_axes=(1, 2)), {}, ValueError,
     r"GroupNorm: reduction_axes=\(1, 2\) must include the last \(channel\) axis"),
    (normzoo.InstanceNorm(feature_axes=0), {}, ValueError,
     r"InstanceNorm: feature_axes=0 includes axis 0\. The channel axes cannot include the leading dimension as "
     r"this is assumed to be the batch axis; name the channel axes only \(e\.g\. -1\)"),
    (normzoo.LayerNorm(reduction_axes=7), {}, ValueError,
     r"LayerNorm: `reduction_axes`=\(7,\) is out of range for an input of rank 4"),
    (normzoo.RMSNorm(feature_axes=-9), {}, ValueError,
     r"RMSNorm: `feature_axes`=\(-9,\) is out of range"),
    (normzoo.CosineConv(4, (3, 3), padding="MIRROR"), {}, ValueError,
     r"CosineConv: padding='MIRROR' is not supported; use one of 'SAME', 'VALID', 'SAME_LOWER', 'CIRCULAR', "
     r"'REFLECT', 'CAUSAL', an int"),
    (normzoo.CosineConv(4, (3, 3), feature_group_count=3), {}, ValueError,
     r"CosineConv: feature_group_count=3 must divide the 8 input and 4 output features"),
    (normzoo.WeightNormConv(4, (3, 3), mask=jnp.ones((3, 3, 4, 4))), {}, ValueError,
     r"WeightNormConv: `mask` has shape \(3, 3, 4, 4\), but the kernel has shape \(3, 3, 8, 4\)"),
    (normzoo.WeightNormConv(4, (3, 3), padding=[(1, 1)]), {}, ValueError,
     r"WeightNormConv: padding=\(\(1, 1\),\) must give one int or \(low, high\) pair per spatial axis \(2\)"),
    (normzoo.WeightNormConv(4, (3, 3), strides=(1, 1, 1)), {}, ValueError,
     r"WeightNormConv: `strides`=\(1, 1, 1\) must be an int or 2 ints, one per spatial axis"),
])
def test_configuration_errors(layer, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        init(layer, **kw)


def test_rank_errors():
    # (BatchNorm, GroupNorm and InstanceNorm with nothing left to reduce work as in flax:
    # test_flax_conformance.py.)
    with pytest.raises(ValueError, match=(r"CosineConv: kernel_size=\(3, 3\) convolves 2 spatial axes, which needs an "
                                          r"input of rank >= 3 \(features last\), got shape \(4, 3\)")):
        init(normzoo.CosineConv(2, (3, 3)), jnp.ones((4, 3)))


@pytest.mark.parametrize("layer,kw", [
    (normzoo.BatchNorm(use_running_average=False), {}),
    (normzoo.LayerNorm(), {}),
    (normzoo.GroupNorm(num_groups=2), {}),
])
def test_mask_errors(layer, kw):
    with pytest.raises(TypeError, match=r"`mask` must be a boolean array, got dtype float32; pass `mask.astype\(bool\)`"):
        init(layer, mask=jnp.ones((4, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"`mask` of shape \(4, 6\) does not broadcast to the input of shape \(4, 6, 6, 8\)"):
        init(layer, mask=jnp.ones((4, 6), bool))


@pytest.mark.parametrize("layer,x2,exc,pattern", [
    # Running statistics: normzoo's check, in the function every front end calls.
    (normzoo.BatchNorm(use_running_average=False, use_scale=False, use_bias=False), jnp.ones((4, 6, 6, 16)),
     ValueError, r"BatchNorm: `mean` has shape \(8,\), but the input of shape \(4, 6, 6, 16\) has \(16,\) features "
     r"along `axis`=\(3,\); give it shape \(16,\) .*re-run `init`, for this input's features"),
    # Parameters: flax's own check, as for flax's layers (a drop-in raises what flax raises).
    (normzoo.LayerNorm(), jnp.ones((4, 6, 6, 16)), flax_errors.ScopeParamShapeError,
     r'For parameter "scale" in "/", the given initializer is expected to generate shape \(16,\), but the '
     r"existing parameter it received has shape \(8,\)"),
    (normzoo.WeightNormDense(3), jnp.ones((4, 6, 6, 16)), flax_errors.ScopeParamShapeError,
     r'For parameter "v" in "/", the given initializer is expected to generate shape \(16, 3\)'),
])
def test_feature_size_mismatch_with_existing_variables(layer, x2, exc, pattern):
    variables = init(layer)
    with pytest.raises(exc, match=pattern):
        layer.apply(variables, x2, mutable=["batch_stats"])


def test_axis_name_outside_a_mapped_context():
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="batch")
    variables = init(layer)  # init never syncs, as in flax
    with pytest.raises(NameError):  # what flax raises (JAX's unbound axis)
        layer.apply(variables, X4, mutable=["batch_stats"])
    with pytest.raises(ValueError, match=(
        r"BatchNorm: axis_name='batch' is not bound here\. .*jax\.pmap.*jax\.shard_map.*"
        r"Under plain `jax\.jit` with inputs sharded by `NamedSharding`, leave `axis_name=None`"
    )):
        layer.apply(variables, X4, mutable=["batch_stats"])


def test_axis_index_groups_must_partition_the_axis():
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="d", axis_index_groups=[[0, 1], [1, 2, 3]])
    v = init(layer, jnp.ones((2, 3)))
    f = jax.pmap(lambda x: layer.apply(v, x, mutable=["batch_stats"])[0], axis_name="d", devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=(
        r"BatchNorm: axis_index_groups=\[\[0, 1\], \[1, 2, 3\]\] must split the 4 indices of axis 'd' "
        r"into groups of equal size, each index in exactly one group \(e\.g\. \[\[0, 1\], \[2, 3\]\]\)"
    )):
        f(jnp.ones((4, 2, 3)))
    bad = normzoo.BatchNorm(use_running_average=False, axis_name="d", axis_index_groups=[0, 1, 2, 3])
    g = jax.pmap(lambda x: bad.apply(v, x, mutable=["batch_stats"])[0], axis_name="d", devices=jax.devices()[:4])
    with pytest.raises(TypeError, match=r"`axis_index_groups` must be a list of lists of device indices, got \(0, 1, 2, 3\)"):
        g(jnp.ones((4, 2, 3)))


def test_use_running_average_required_for_batch_layers():
    with pytest.raises(ValueError, match=r'"use_running_average" must be passed to the constructor or at call time'):
        init(normzoo.BatchNorm())
    assert np.isfinite(init(normzoo.InstanceNorm())["params"]["scale"]).all()
