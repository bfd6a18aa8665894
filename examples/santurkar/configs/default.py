"""Configs of the reproduction of Santurkar et al. 2018: ``get_config(preset)``, presets ``smoke``, ``full``, ``tiny``.

``--config=examples/santurkar/configs/default.py:smoke``; ``--config.runs=none@0.1,batch@0.1``
picks the runs (``norm@learning_rate``, ``norm`` any name of ``normzoo.available()``).
"""

import ml_collections

# The paper's comparisons (Fig. 1-4: standard vs BatchNorm at learning rates 0.1 and 0.5; noisy
# BatchNorm; L1 / L-infinity normalization, L2 being BatchNorm) and the zoo's other normalizers.
RUNS = ("none@0.1", "batch@0.1", "none@0.5", "batch@0.5", "noisy_batch@0.1", "l1_batch@0.1",
        "linf_batch@0.1", "layer@0.1", "group@0.1", "weight@0.1")
VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def get_config(preset: str = "smoke") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.runs = ",".join(RUNS)
    c.stages = VGG11                # VGG-11's convolutions, 2x2 max pooling after each stage
    c.width_divisor = 1             # every width divided by this (smoke: a narrow VGG)
    c.batch_size = 128              # the paper: plain SGD, batch 128, constant learning rate
    c.steps = 15000                 # the paper's VGG runs
    c.measure_every = 500           # steps between measurements (ICS, landscape, activations)
    c.step_multipliers = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # landscape: eta = lr * these
    c.eval_every = 1000             # steps between test-accuracy evaluations (on test_subset)
    c.eval_subset = 2000            # test images of those evaluations (the final one uses all)
    c.probe_examples = 32           # examples whose activations enter the percentiles
    c.log_every = 10
    c.seed = 0
    c.data_dir = ""                 # '' -> $NORMZOO_DATA -> ~/.cache/normzoo (downloaded)
    c.expected_per_file = 10000
    c.train_subset = 0
    c.workdir = "runs/santurkar_" + preset
    c.workers = 1                   # runs at a time (single-threaded processes when > 1)
    c.resume = True                 # skip runs whose results are in the workdir
    if preset == "smoke":           # 2 CPU cores, about 15 minutes for the ten runs
        c.width_divisor = 8
        c.steps = 400
        c.measure_every = 50
        c.eval_every = 100
        c.eval_subset = 1000
        c.workers = 2
    elif preset == "full":          # the paper's scale, for a GPU
        pass
    elif preset == "tiny":          # tests: a few steps on the fake fixture
        c.runs = "none@0.1,batch@0.1"
        c.stages = ((4,), (4,))
        c.batch_size = 8
        c.steps = 4
        c.measure_every = 2
        c.eval_every = 2
        c.eval_subset = 16
        c.log_every = 1
        c.step_multipliers = (0.5, 2.0)
        c.expected_per_file = 16
    else:
        raise ValueError(f"unknown preset {preset!r}; use smoke, full or tiny.")
    return c
