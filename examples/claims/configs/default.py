"""Configs of the claims experiments: ``get_config(preset)``, presets ``smoke``, ``full``, ``tiny``.

``--config=examples/claims/configs/default.py:smoke``; ``--config.experiments=activations,invariance``
picks experiments (default: all of ``EXPERIMENTS``).
"""

import ml_collections

EXPERIMENTS = ("activations", "learning_rates", "regularization", "deep_linear", "normalizers",
               "super_resolution", "invariance")


def get_config(preset: str = "smoke") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.experiments = ",".join(EXPERIMENTS)
    # The classifier (examples.claims.models.Net) and its SGD.
    c.stages = ((64,), (128,), (256, 256), (512, 512))
    c.batch_size = 128
    c.steps = 6000
    c.momentum = 0.9
    c.log_every = 10
    c.measure_every = 500            # probe statistics (and ICS / Jacobians where a run asks)
    c.probe_examples = 256           # the fixed probe batch: the last training images
    c.jacobian_examples = 8          # Jacobians over this many probe images (batch statistics of them)
    c.jacobian_iterations = 24       # Lanczos steps per spectrum
    c.eval_train = 5000              # training images evaluated at the end (train-test gap)
    # activations (claims 1-3)
    c.activation_lr = 0.05
    # learning_rates (claim 4): the sweep, the target training accuracy and the init scales
    c.sweep_lrs = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    c.target_accuracy = 0.4
    c.init_scales = (0.25, 4.0)
    c.no_affine_lrs = (0.3, 1.0)       # BatchNorm without gamma/beta at the largest learning rates
    # regularization (claim 5): a small training set so that there is something to overfit
    c.reg_subset = 5000
    c.reg_steps = 6000
    c.reg_dropout = 0.3
    c.reg_weight_decay = 5e-4
    # normalizers (claims 7, 10): their Jacobian spectra and accuracy
    c.normalizers = ("none", "batch", "iter", "layer", "group")
    c.normalizer_lr = 0.05
    # deep_linear (claim 6): full-batch gradient descent
    c.linear_depth = 25
    c.linear_width = 64
    c.linear_examples = 2048
    c.linear_steps = 300
    c.linear_lr = 0.01               # the largest of 0.01, 0.02, 0.05 at which the network without BN trains
    c.linear_measure_every = 20
    # super_resolution (claim 9)
    c.sr_features = 64
    c.sr_blocks = 16
    c.sr_steps = 20000
    c.sr_batch = 16
    c.sr_lr = 1e-4
    c.sr_test = 10000
    # invariance (claim 11)
    c.invariance_factors = (0.1, 0.5, 2.0, 10.0)
    c.invariance_examples = 32
    c.seed = 0
    c.data_dir = ""                 # '' -> $NORMZOO_DATA -> ~/.cache/normzoo (downloaded)
    c.expected_per_file = 10000
    c.workdir = "runs/claims_" + preset
    c.resume = True                 # skip experiments whose record exists in the workdir
    if preset == "smoke":           # 2 CPU cores: each experiment under about 15 minutes
        c.stages = ((8,), (16,), (32, 32), (32, 32))
        c.steps = 400
        c.measure_every = 100
        c.reg_subset = 2560
        c.reg_steps = 800
        c.sr_features = 32
        c.sr_blocks = 4
        c.sr_steps = 600
        c.sr_batch = 32
        c.sr_lr = 1e-3
        c.sr_test = 1000
    elif preset == "full":          # the scale of the papers, for a GPU
        pass
    elif preset == "tiny":          # tests: a few steps on the fake fixture
        c.stages = ((4,), (4,))
        c.batch_size = 8
        c.steps = 4
        c.measure_every = 2
        c.log_every = 1
        c.probe_examples = 8
        c.jacobian_examples = 2
        c.jacobian_iterations = 4
        c.eval_train = 16
        c.sweep_lrs = (0.01, 0.1)
        c.init_scales = (4.0,)
        c.no_affine_lrs = (0.1,)
        c.reg_subset = 16
        c.reg_steps = 4
        c.normalizers = ("none", "batch", "iter")
        c.linear_depth = 3
        c.linear_width = 4
        c.linear_examples = 16
        c.linear_steps = 4
        c.linear_measure_every = 2
        c.sr_features = 4
        c.sr_blocks = 1
        c.sr_steps = 3
        c.sr_batch = 4
        c.sr_test = 8
        c.invariance_examples = 4
        c.invariance_factors = (0.5, 2.0)
        c.expected_per_file = 16
    else:
        raise ValueError(f"unknown preset {preset!r}; use smoke, full or tiny.")
    return c
