"""normzoo.deploy.port_torch: the PyTorch -> Flax mapping derived from the two models, checked.

The first half needs no torch: PyTorch-style state dicts are written by hand-mapped `to_torch`
and the reference activations come from flax's own `capture_intermediates`. The second half runs
torch (and torchvision's models) side by side and is skipped, saying why, without them."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from normzoo import deploy

BN = dict(momentum=0.9, epsilon=1e-5)


class Gate(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("layer_scale", nn.initializers.ones, (x.shape[-1],))


class TinyNet(nn.Module):
    """PyTorch twin, in registration order: stem.0 Conv2d(3, 8, 3, padding=1, bias=False), stem.1
    BatchNorm2d(8), block.conv Conv2d(8, 8, 3, 2, 1, groups=2), block.bn BatchNorm2d(8), up
    ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1), norm LayerNorm2d(4), gate (layer_scale
    (4, 1, 1)), head weight_norm(Linear(4, 5))."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = nn.relu(normzoo.BatchNorm(use_running_average=not train, **BN)(x))
        y = nn.Conv(8, (3, 3), 2, padding=((1, 1), (1, 1)), feature_group_count=2)(x)
        y = nn.relu(normzoo.BatchNorm(use_running_average=not train, **BN)(y))
        y = nn.ConvTranspose(4, (3, 3), (2, 2), padding=((1, 2), (1, 2)))(y)
        y = Gate()(nn.LayerNorm(epsilon=1e-5)(y))
        return normzoo.WeightNormDense(5)(jnp.mean(y, axis=(1, 2)))


HAND = {"stem.0": "Conv_0", "stem.1": "BatchNorm_0", "block.conv": "Conv_1", "block.bn": "BatchNorm_1",
        "up": "ConvTranspose_0", "norm": "LayerNorm_0", "gate": "Gate_0", "head": "WeightNormDense_0"}
X = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)


def _randomized(variables, seed=1):
    """Every variable random, running variances positive: a port that drops or swaps one shows."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    out = [jax.random.uniform(k, a.shape, a.dtype, 0.5, 1.5) if p[-1].key == "var"
           else jax.random.normal(k, a.shape, a.dtype) * 0.5 for k, a, p in zip(keys, leaves, paths)]
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    variables = _randomized(model.init(jax.random.key(0), X))
    state = deploy.to_torch(variables, HAND, conv_transpose={"up": False}, num_batches_tracked=5)
    return model, variables, state


def _activations(model, variables, names, *args, **kwargs):
    """Reference per-module outputs keyed by PyTorch prefix, from flax's own capture_intermediates."""
    y, state = model.apply(variables, *args, capture_intermediates=True, mutable=["intermediates"], **kwargs)
    acts = {"": np.asarray(y)}
    for prefix, path in names.items():
        node = state["intermediates"]
        for part in path.split("/"):
            node = node[part]
        acts[prefix] = np.asarray(node["__call__"][0])
    return acts


def test_the_mapping_is_derived_from_kinds_order_and_shapes(tiny):
    model, variables, state = tiny
    assert list(state)[:3] == ["stem.0.weight", "stem.1.weight", "stem.1.bias"]
    port = deploy.port_torch(model, state, X, train=False, outputs=model.apply(variables, X))
    assert port.names == HAND  # grouped conv, ConvTranspose, LayerNorm, a bare parameter, weight norm
    assert port.kinds == {"stem.0": "conv", "stem.1": "batch", "block.conv": "conv", "block.bn": "batch",
                          "up": "conv", "norm": "affine", "gate": "params", "head": "weight_norm"}
    assert port.conv_transpose == {"up": False}
    jax.tree.map(np.testing.assert_array_equal, port.variables, variables)
    assert port.output_error == 0.0
    back = port.to_torch()
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    table = str(port)
    assert re.search(r"^up +ConvTranspose_0 +conv", table, flags=re.M)
    assert "outputs: relative error 0.0e+00 against PyTorch's" in table


def test_explicit_names_are_kept_and_the_rest_paired():
    model, variables = TinyNet(), _randomized(TinyNet().init(jax.random.key(0), X))
    state = deploy.to_torch(variables, HAND, conv_transpose={"up": False})
    ref = model.apply(variables, X)
    port = deploy.port_torch(model, state, X, names={"head": "WeightNormDense_0", "stem.1": "BatchNorm_0"},
                             outputs=ref)
    assert port.names == HAND
    # The hand-written mapping alone, with the previous API: identical variables.
    template = model.init(jax.random.key(9), X)
    by_hand = deploy.from_torch(state, template, HAND, conv_transpose={"up": False})
    jax.tree.map(np.testing.assert_array_equal, by_hand, port.variables)
    # A PyTorch module the Flax model lacks is left out with None.
    extra = {**state, "aux.weight": np.ones((3, 4), np.float32)}
    with pytest.raises(ValueError, match=r"PyTorch state dict has 1 module\(s\) of kind 'linear' and the Flax model 0, "
                                         r"so they cannot be paired in order. PyTorch's: \['aux'\]; Flax's: \[\]"):
        deploy.port_torch(model, extra, X, outputs=ref)
    assert deploy.port_torch(model, extra, X, names={"aux": None}, outputs=ref).names["aux"] is None


class ProjectionFirst(nn.Module):
    """A residual block whose Flax code runs the projection first: PyTorch registers conv1, bn1,
    conv2, bn2, down.0, down.1 in that order."""

    @nn.compact
    def __call__(self, x):
        norm = lambda: normzoo.BatchNorm(use_running_average=True, **BN)  # noqa: E731
        skip = norm()(nn.Conv(8, (1, 1), 2, use_bias=False)(x))
        y = nn.relu(norm()(nn.Conv(8, (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False)(x)))
        y = norm()(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(y))
        return nn.relu(y + skip)


def test_order_that_differs_is_named_and_the_output_check_catches_same_shape_swaps():
    model = ProjectionFirst()
    variables = _randomized(model.init(jax.random.key(0), X))
    hand = {"conv1": "Conv_1", "bn1": "BatchNorm_1", "conv2": "Conv_2", "bn2": "BatchNorm_2",
            "down.0": "Conv_0", "down.1": "BatchNorm_0"}
    state = deploy.to_torch(variables, hand)
    acts = _activations(model, variables, hand, X)
    # In order, PyTorch's 3x3 conv1 meets Flax's 1x1 projection: the shapes say the orders differ.
    with pytest.raises(ValueError, match=r"in order, PyTorch's 'conv1' \(conv: weight \(8, 3, 3, 3\)\) pairs with "
                                         r"Flax's 'Conv_0' \(Conv: kernel \(1, 1, 3, 8\)\), and 'conv1.weight' "
                                         r"\(8, 3, 3, 3\) does not fit \(1, 1, 3, 8\).*Map these keys explicitly, "
                                         r"names=\{'conv1': '<Flax path>'"):
        deploy.port_torch(model, state, X, activations=acts)
    # Mapping the convolutions alone leaves the (same-shape) BatchNorms paired in order: wrong, and
    # only the outputs can tell. The check names the first module off in Flax's call order (the
    # projection's BatchNorm, which got bn1's variables) and the last that agrees.
    convs = {k: v for k, v in hand.items() if k.startswith("conv") or k == "down.0"}
    with pytest.raises(ValueError) as err:
        deploy.port_torch(model, state, X, names=convs, activations=acts)
    msg = str(err.value)
    assert re.search(r"outputs differ from PyTorch's by [0-9.e-]+ \(relative\), more than tolerance=0.0001", msg)
    assert "The first module off, in call order: PyTorch 'bn1' -> Flax 'BatchNorm_0'" in msg
    assert "the last that agrees: 'down.0' -> 'Conv_0'" in msg
    assert re.search(r"^bn1 +BatchNorm_0 +batch +[0-9.e+-]+$", msg, flags=re.M)  # the mapping's table follows
    # Outputs alone say that something is off, and how to find it.
    with pytest.raises(ValueError, match=r"Pass activations=normzoo.deploy.torch_activations\(net, x\)"):
        deploy.port_torch(model, state, X, names=convs, outputs=acts[""])
    port = deploy.port_torch(model, state, X, names={**convs, "bn1": "BatchNorm_1", "bn2": "BatchNorm_2"},
                             activations=acts)
    assert port.names == hand and max(port.layer_errors.values()) == 0.0 and port.output_error == 0.0


def test_per_layer_batch_elements_come_from_the_sample(tiny):
    model, variables, state = tiny
    ref = model.apply(variables, X)
    port = deploy.port_torch(model, state, X, outputs=ref, batch_elements="sample")
    assert port.batch_elements == {"stem.1": 2 * 8 * 8, "block.bn": 2 * 4 * 4}
    big = deploy.port_torch(model, state, X, outputs=ref, batch_elements="sample", training_batch_size=64)
    assert big.batch_elements == {"stem.1": 64 * 8 * 8, "block.bn": 64 * 4 * 4}
    for prefix, path in (("stem.1", "BatchNorm_0"), ("block.bn", "BatchNorm_1")):
        n, t = port.batch_elements[prefix], 5
        m_t = 0.9 ** t  # PyTorch's EMA from 1, momentum 0.1, over t batches of n values: biased = (n-1)/n unbiased
        want = m_t + (n - 1) / n * (state[f"{prefix}.running_var"].astype(np.float64) - m_t)
        np.testing.assert_allclose(port.variables["batch_stats"][path]["var"], want, rtol=1e-6)
    # The check ran on PyTorch's inference (variances as stored), before the conversion.
    assert port.output_error == 0.0
    back = port.to_torch()  # the inverse conversion, layer by layer
    for k in ("stem.1.running_var", "block.bn.running_var"):
        np.testing.assert_allclose(back[k], state[k], rtol=1e-5)
    one = deploy.port_torch(model, state, X, outputs=ref, batch_elements={"block.bn": 32})
    assert one.batch_elements == {"block.bn": 32}
    np.testing.assert_array_equal(one.variables["batch_stats"]["BatchNorm_0"]["var"], state["stem.1.running_var"])


def test_port_errors_name_the_argument(tiny):
    model, variables, state = tiny
    ref = model.apply(variables, X)
    with pytest.raises(TypeError, match=r"model must be a flax.linen Module, got dict; the state dict comes second"):
        deploy.port_torch(state, model, X)
    with pytest.raises(TypeError, match=r"state_dict must be a mapping .* got ndarray"):
        deploy.port_torch(model, X, X)
    with pytest.raises(TypeError, match=r"pass a sample input after the state dict"):
        deploy.port_torch(model, state)
    with pytest.raises(ValueError, match=r"names has 'stem\.9', which is no module prefix of the state dict"):
        deploy.port_torch(model, state, X, names={"stem.9": "Conv_0"}, outputs=ref)
    with pytest.raises(ValueError, match=r"names\['stem\.0'\] = 'Conv_7', which is no Flax module with variables"):
        deploy.port_torch(model, state, X, names={"stem.0": "Conv_7"}, outputs=ref)
    with pytest.raises(ValueError, match=r"batch_elements='all'; use 'sample'"):
        deploy.port_torch(model, state, X, batch_elements="all", outputs=ref)
    with pytest.raises(ValueError, match=r"batch_elements has \['head'\], which are no mapped BatchNorm prefixes"):
        deploy.port_torch(model, state, X, batch_elements={"head": 4}, outputs=ref)
    with pytest.raises(ValueError, match=r"training_batch_size rescales batch_elements='sample'; pass both"):
        deploy.port_torch(model, state, X, training_batch_size=64, outputs=ref)
    with pytest.raises(ValueError, match=r"the Flax model returns 1 array\(s\), outputs= holds 2"):
        deploy.port_torch(model, state, X, outputs=(ref, ref))
    with pytest.raises(ValueError, match=r"outputs differ from PyTorch's by inf \(relative; shape \(2, 5\) \(Flax\) "
                                         r"vs \(2, 4\) \(PyTorch\)\)"):
        deploy.port_torch(model, state, X, outputs=ref[:, :4])
    with pytest.warns(UserWarning, match=r"not checked against PyTorch's outputs: pass outputs= or activations="):
        unchecked = deploy.port_torch(model, state, X)
    assert unchecked.output_error is None and "not checked" in str(unchecked)
    lost = {k: v for k, v in state.items() if not k.startswith("gate.")}
    with pytest.raises(ValueError, match=r"1 module\(s\) of kind 'params' and the Flax model 1|0 module\(s\) of kind "
                                         r"'params' and the Flax model 1"):
        deploy.port_torch(model, lost, X, outputs=ref)


class Unused(nn.Module):
    @nn.compact
    def __call__(self, x, head: bool = False):
        x = nn.Dense(4)(x)
        return nn.Dense(2, name="head")(x) if head else x


def test_modules_not_called_on_the_sample_are_named():
    model = Unused()
    template = model.init(jax.random.key(0), X[:, 0, 0], head=True)
    state = deploy.to_torch(template, {"0": "Dense_0", "1": "head"})
    with pytest.raises(ValueError, match=r"the Flax modules \['head'\] hold variables but were not called"):
        deploy.port_torch(model, state, X[:, 0, 0], template=template, outputs=np.zeros((2, 4)))


def test_from_torch_reads_weight_norm_parametrizations_and_bare_parameters(tiny):
    _, variables, state = tiny
    renamed = {k.replace("head.weight_g", "head.parametrizations.weight.original0")
                .replace("head.weight_v", "head.parametrizations.weight.original1"): v for k, v in state.items()}
    renamed["gate.layer_scale"] = renamed["gate.layer_scale"].reshape(4, 1, 1)  # PyTorch's (C, 1, 1)
    port = deploy.port_torch(TinyNet(), renamed, X, outputs=TinyNet().apply(variables, X))
    jax.tree.map(np.testing.assert_array_equal, port.variables, variables)
    assert port.parametrizations
    back = port.to_torch()
    assert back.keys() == renamed.keys() and back["gate.layer_scale"].shape == (4, 1, 1)
    assert back["head.parametrizations.weight.original0"].shape == (5, 1)  # torch keeps g as (out, 1)


class Mixed(nn.Module):
    """Embedding, a custom module with a parameter called `scale`, a LayerNorm over two axes, a
    BatchNorm called with a keyword input, an InstanceNorm with running statistics, and a module
    whose output is not comparable with PyTorch's (tokens flattened before the Dense)."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(7, 4)(tokens)                                        # emb: Embedding(7, 4)
        x = x * self.param("scale", nn.initializers.ones, (4,))           # root parameter 'scale'
        x = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1), epsilon=1e-5)(x)   # ln: LayerNorm([3, 4])
        x = normzoo.BatchNorm(use_running_average=True, axis=-1, **BN)(x=x)                 # bn: BatchNorm1d-like
        x = normzoo.InstanceNorm(track_running_stats=True, use_running_average=True)(x[:, :, None, :])
        return nn.Dense(2)(x.reshape(-1, 4))                              # fc


def test_embeddings_bare_parameters_keyword_inputs_instance_norm_and_left_out_modules():
    model = Mixed()
    tokens = np.array([[0, 3, 6], [1, 2, 5]])
    variables = _randomized(model.init(jax.random.key(0), tokens))
    names = {"": "", "emb": "Embed_0", "ln": "LayerNorm_0", "bn": "BatchNorm_0", "inorm": "InstanceNorm_0",
             "fc": "Dense_0"}
    state = deploy.to_torch(variables, names, num_batches_tracked=4, torch_keys={"": {"params/scale": "scale"}})
    state = {"scale": state.pop("scale"), **state, "aux.weight": np.ones((2, 2), np.float32)}  # root first
    state["inorm.num_batches_tracked"] = np.array(0)  # PyTorch's InstanceNorm never counts its updates
    ref = model.apply(variables, tokens)
    port = deploy.port_torch(model, state, tokens, names={"aux": None}, outputs=ref,
                             batch_elements="sample")
    assert {k: v for k, v in port.names.items() if v is not None} == names and port.names["aux"] is None
    assert port.kinds["emb"] == "linear" and port.kinds["ln"] == "affine" and port.kinds[""] == "params"
    assert port.batch_elements == {"bn": 2 * 3}  # the keyword input's N*L; the InstanceNorm is left as stored
    np.testing.assert_array_equal(port.variables["batch_stats"]["InstanceNorm_0"]["var"], state["inorm.running_var"])
    back = port.to_torch()
    assert list(back) == list(state)  # PyTorch's keys (a parameter called 'scale' stays 'scale'), its order
    np.testing.assert_array_equal(back["aux.weight"], state["aux.weight"])  # left out, given back
    np.testing.assert_allclose(back["bn.running_var"], state["bn.running_var"], rtol=1e-5)
    with pytest.raises(ValueError, match=r"'inorm\.running_var' has moved from its initial 1 but "
                                         r"'inorm\.num_batches_tracked' is 0, so the number of updates is unknown"):
        deploy.port_torch(model, state, tokens, names={"aux": None}, outputs=ref, batch_elements=6)
    # Per-module activations whose shapes cannot be matched are noted, not called wrong.
    acts = _activations(model, variables, {k: v for k, v in names.items() if k}, tokens)
    acts["fc"] = acts["fc"].reshape(2, 3, 2)[:, :2]  # a different shape: nothing to compare
    port = deploy.port_torch(model, state, tokens, names={"aux": None}, activations=acts)
    assert "fc" not in port.layer_errors and any("not compared: PyTorch 'fc' -> Flax 'Dense_0'" in n for n in port.notes)


# ----------------------------------------------------------------------------- side by side with PyTorch

def _torch():
    return pytest.importorskip("torch", reason="optional: pip install 'normzoo[torch]' (a CPU build) runs the "
                                               "side-by-side port tests")


def _tv():
    _torch()
    from examples.porting.torch_models import torchvision_models
    try:
        return torchvision_models()
    except ModuleNotFoundError:
        pytest.skip("optional: torchvision is not installed (pip install 'normzoo[torch]')")


def _state(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_torch_weight_norm_and_conv_transpose_both_ways():
    torch = _torch()
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((2, 5, 6, 3)).astype(np.float32)
    for transpose_kernel in (False, True):
        net = torch.nn.Sequential(
            parametrizations.weight_norm(torch.nn.Conv2d(3, 6, 3, padding=1)),
            torch.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1),
            torch.nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1))

        class Twin(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = normzoo.WeightNormConv(6, (3, 3), padding=((1, 1), (1, 1)))(x)
                x = nn.ConvTranspose(4, (3, 3), (2, 2), padding=((1, 2), (1, 2)), transpose_kernel=transpose_kernel)(x)
                return nn.ConvTranspose(2, (4, 4), (2, 2), padding=((2, 2), (2, 2)), transpose_kernel=transpose_kernel)(x)

        acts = deploy.torch_activations(net, _nchw(x))
        assert set(acts) == {"", "0", "1", "2"}  # the parametrized conv is hooked as itself
        port = deploy.port_torch(Twin(), _state(net), x, activations=acts, tolerance=1e-5)
        assert port.names == {"0": "WeightNormConv_0", "1": "ConvTranspose_0", "2": "ConvTranspose_1"}
        assert port.conv_transpose == {"1": transpose_kernel, "2": transpose_kernel}
        assert port.output_error < 1e-6 and port.parametrizations
        fresh = torch.nn.Sequential(parametrizations.weight_norm(torch.nn.Conv2d(3, 6, 3, padding=1)),
                                    torch.nn.ConvTranspose2d(6, 4, 3, 2, 1, 1), torch.nn.ConvTranspose2d(4, 2, 4, 2, 1))
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in port.to_torch().items()}, strict=True)
        for k, v in fresh.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), net.state_dict()[k].numpy(), err_msg=k)
    # The older torch.nn.utils.weight_norm (weight_g / weight_v) on a Linear.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of the parametrization
        linear = torch.nn.utils.weight_norm(torch.nn.Linear(3, 4))
    port = deploy.port_torch(normzoo.WeightNormDense(4), _state(linear), x[:, 0, 0],
                             outputs=linear(torch.from_numpy(x[:, 0, 0])).detach().numpy())
    assert port.output_error < 1e-6 and set(port.to_torch()) == {"weight_g", "weight_v", "bias"}
    assert port.to_torch()["weight_g"].shape == (4, 1)


def _randomized_net(torch, net):
    """examples/porting/main.py's randomization: BatchNorm statistics and affine, ConvNeXt's layer scale."""
    from examples.porting.main import randomize

    return randomize(torch, net)


def _resnet18_hand_names():
    """torchvision's names -> Flax's auto-names in examples/porting/models.ResNet18, by rule."""
    names = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "fc": "Dense_0"}
    inner = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "conv2": "Conv_1", "bn2": "BatchNorm_1",
             "downsample.0": "Conv_2", "downsample.1": "BatchNorm_2"}
    for stage in range(4):
        for block in range(2):
            for torch_name, flax_name in inner.items():
                if torch_name.startswith("downsample") and (stage == 0 or block == 1):
                    continue
                names[f"layer{stage + 1}.{block}.{torch_name}"] = f"BasicBlock_{2 * stage + block}/{flax_name}"
    return names


def test_resnet18_traps_are_caught_with_the_layer_named(monkeypatch):
    torch, tv = _torch(), _tv()
    from examples.porting import models

    net = _randomized_net(torch, tv.resnet18(num_classes=10))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    acts, state = deploy.torch_activations(net, _nchw(x)), _state(net)
    port = deploy.port_torch(models.ResNet18(10), state, x, train=False, activations=acts)
    assert port.names == _resnet18_hand_names() and len(port.names) == 41
    assert port.output_error < 1e-5 and max(port.layer_errors.values()) < 1e-5
    # Trap 1: two 128-channel BatchNorms swapped in a hand-written mapping load without error. The
    # first of the two that Flax calls is named (it holds the projection's statistics).
    swapped = {**port.names, "layer2.0.bn2": "BasicBlock_2/BatchNorm_2", "layer2.0.downsample.1": "BasicBlock_2/BatchNorm_1"}
    with pytest.raises(ValueError, match=r"first module off, in call order: PyTorch 'layer2\.0\.downsample\.1' -> "
                                         r"Flax 'BasicBlock_2/BatchNorm_1'.*the last that agrees: 'layer2\.0\.conv2'"):
        deploy.port_torch(models.ResNet18(10), state, x, train=False, names=swapped, activations=acts)
    # Trap 2: Flax's 'SAME' padding (asymmetric at stride 2) where PyTorch pads 3 on each side.
    monkeypatch.setattr(models, "_pad", lambda k: "SAME")
    with pytest.raises(ValueError, match=r"first module off, in call order: PyTorch 'conv1' -> Flax 'Conv_0'.*"
                                         r"it is the first module checked.*padding"):
        deploy.port_torch(models.ResNet18(10), state, x, train=False, activations=acts)


def test_per_layer_variance_conversion_is_exact_after_three_torch_training_steps():
    torch, tv = _torch(), _tv()
    from examples.porting import models

    torch.manual_seed(0)
    net = tv.resnet18(num_classes=10)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 32, 32, 3)).astype(np.float32) for _ in range(3)]
    model = models.ResNet18(10)
    start = deploy.port_torch(model, _state(net.eval()), batches[0], train=False,
                              outputs=net.eval()(_nchw(batches[0])).detach().numpy())
    variables = start.variables
    net.train()
    for b in batches:  # PyTorch trains three steps (momentum 0.1, unbiased batch variances) ...
        with torch.no_grad():
            net(_nchw(b))
        _, updates = model.apply(variables, b, train=True, mutable=["batch_stats"])  # ... and Flax (0.9, biased)
        variables = {**variables, **updates}
    port = deploy.port_torch(model, _state(net.eval()), batches[0], train=False, batch_elements="sample",
                             outputs=net(_nchw(batches[0])).detach().numpy())
    assert sorted(set(port.batch_elements.values())) == [4, 16, 64, 256, 1024]  # N*H*W per stage
    worst_single = 0.0
    for prefix in port.batch_elements:
        path = port.names[prefix].split("/")
        ours = port.variables["batch_stats"]
        flax_trained = variables["batch_stats"]
        for p in path:
            ours, flax_trained = ours[p], flax_trained[p]
        np.testing.assert_allclose(ours["var"], flax_trained["var"], rtol=2e-5, err_msg=prefix)
        np.testing.assert_allclose(ours["mean"], flax_trained["mean"], rtol=1e-5, atol=1e-6, err_msg=prefix)
        m_t, torch_var = 0.9 ** 3, _state(net)[f"{prefix}.running_var"].astype(np.float64)
        single = m_t + (1023 / 1024) * (torch_var - m_t)  # one number for the model: the stem's N*H*W
        worst_single = max(worst_single, float(np.max(np.abs(single / np.asarray(flax_trained["var"]) - 1))))
    assert worst_single > 1e-2  # one number for the model would be off by percents in the deepest stage


def _mobilenet_hand_names():
    names = {"features.0.0": "ConvBNReLU6_0/Conv_0", "features.0.1": "ConvBNReLU6_0/BatchNorm_0",
             "features.18.0": "ConvBNReLU6_1/Conv_0", "features.18.1": "ConvBNReLU6_1/BatchNorm_0",
             "classifier.1": "Dense_0"}
    for k in range(1, 18):
        block = f"InvertedResidual_{k - 1}"
        parts = 3 if k == 1 else 4  # the first block has no expansion
        for j in range(parts - 2):
            names[f"features.{k}.conv.{j}.0"] = f"{block}/ConvBNReLU6_{j}/Conv_0"
            names[f"features.{k}.conv.{j}.1"] = f"{block}/ConvBNReLU6_{j}/BatchNorm_0"
        names[f"features.{k}.conv.{parts - 2}"] = f"{block}/Conv_0"
        names[f"features.{k}.conv.{parts - 1}"] = f"{block}/BatchNorm_0"
    return names


def _convnext_hand_names():
    names = {"features.0.0": "Conv_0", "features.0.1": "LayerNorm_0", "classifier.0": "LayerNorm_4",
             "classifier.2": "Dense_0"}
    block = 0
    for stage, depth in enumerate((3, 3, 9, 3)):
        for b in range(depth):
            prefix, path = f"features.{2 * stage + 1}.{b}", f"CNBlock_{block}"
            names.update({prefix: path, f"{prefix}.block.0": f"{path}/Conv_0", f"{prefix}.block.2": f"{path}/LayerNorm_0",
                          f"{prefix}.block.3": f"{path}/Dense_0", f"{prefix}.block.5": f"{path}/Dense_1"})
            block += 1
        if stage < 3:
            names[f"features.{2 * stage + 2}.0"] = f"LayerNorm_{stage + 1}"
            names[f"features.{2 * stage + 2}.1"] = f"Conv_{stage + 1}"
    return names


@pytest.mark.slow  # three torchvision models, eval and training outputs, fold, export
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "convnext_tiny"])
def test_torchvision_zoo_ports_both_ways(name):
    torch, tv = _torch(), _tv()
    from examples.porting import models

    torch.manual_seed(0)
    net, model, hand, kw = {
        "resnet18": lambda: (tv.resnet18(num_classes=10), models.ResNet18(10), _resnet18_hand_names(), dict(train=False)),
        "mobilenet_v2": lambda: (tv.mobilenet_v2(num_classes=10), models.MobileNetV2(10), _mobilenet_hand_names(),
                                 dict(train=False)),
        "convnext_tiny": lambda: (tv.convnext_tiny(num_classes=10), models.ConvNeXtTiny(10), _convnext_hand_names(), {}),
    }[name]()
    net = _randomized_net(torch, net)  # ConvNeXt's layer scale too: it starts at 1e-6, hiding the blocks
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    acts = deploy.torch_activations(net, _nchw(x))
    state = _state(net)
    port = deploy.port_torch(model, state, x, activations=acts, **kw)
    assert port.names == hand
    assert port.output_error < 1e-5 and max(port.layer_errors.values()) < 1e-5, str(port)
    if kw:  # BatchNorm models: training mode too (batch statistics), and folding
        net.train()
        for m in net.modules():  # MobileNet's dropout: Flax's twin has none
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        with torch.no_grad():
            want = net(_nchw(x)).numpy()
        got, _ = model.apply(port.variables, x, train=True, mutable=["batch_stats"])
        # Batch statistics over 4-16 values per channel in the last stages amplify float32 rounding.
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        folded = deploy.fold(model, port.variables, x, train=False)
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert len(folded.folded) == n_bn and folded.max_error < 1e-4
        np.testing.assert_allclose(folded(x, train=False), acts[""], rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        net.eval()
    rebuilt = getattr(tv, name)(num_classes=10)
    rebuilt.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in port.to_torch().items()},
                            strict=True)
    for k, v in rebuilt.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)


def test_the_porting_guide_runs():
    _tv()  # torchvision's models importable (see examples/porting/torch_models.py)
    from tests.test_docs import DOCS
    from tests.test_readme import optional_package, python_blocks, run_blocks

    blocks = [b for b in python_blocks(DOCS / "guides" / "deployment.md") if optional_package(b) == "torch"]
    assert blocks, "the deployment guide shows how to port a torchvision model"
    namespace = run_blocks(blocks, "docs/guides/deployment.md torch")
    port = namespace["port"]
    assert port.names["layer2.0.downsample.1"] == "BasicBlock_2/BatchNorm_2" and port.output_error < 1e-5
    assert "layer4.1.bn2" in str(port)


@pytest.mark.slow  # the zoo example, small: ResNet-18 at 32 x 32 with the two traps
def test_the_zoo_example_reports_errors_folds_exports_and_traps(tmp_path):
    _tv()
    from examples.porting import main

    results = main.main(["--models", "resnet18", "--size", "32", "--batch", "4", "--out", str(tmp_path)])
    (row,) = results["models"]
    # Training mode: the last stage normalizes over 4 values per channel, which amplifies rounding.
    assert row["modules"] == 41 and row["eval_error"] < 1e-5 and row["train_error"] < 2e-3
    assert row["folded"] == row["batch_norms"] == 20 and row["export_bit_identical"]
    assert results["traps"]["swapped_batch_norms"]["named"] == \
        "PyTorch 'layer2.0.downsample.1' -> Flax 'BasicBlock_2/BatchNorm_1'"
    assert results["traps"]["same_padding"]["named"] == "PyTorch 'conv1' -> Flax 'Conv_0'"
    assert all(t["output_error"] > 1e-2 for t in results["traps"].values())
    assert "| resnet18 | 41 |" in (tmp_path / "zoo.md").read_text()
