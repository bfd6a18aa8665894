"""Configs for the CIFAR-10 examples: ``get_config(preset)``, presets ``smoke``, ``small_batch``, ``full``, ``tiny``.

Command-line use (ml_collections): ``--config=examples/cifar/configs/default.py:smoke`` picks the
preset, ``--config.norm=batch_renorm --config.batch_size=64`` overrides single fields.
"""

import ml_collections

import normzoo

# The comparison: every registry name except the analysis variants of Santurkar et al. (noisy and
# Lp BatchNorm), which examples/santurkar compares on its own terms, and frozen BatchNorm, a
# fine-tuning layer (trained from scratch its statistics stay at their initial values).
NORMS = tuple(n for n in normzoo.available()
              if n not in ("noisy_batch", "l1_batch", "l2_batch", "linf_batch", "frozen_batch"))
# Training speed of each name in the smoke preset (images/s, 2 CPU cores, examples/cifar/README.md):
# the comparison starts the slowest first, so that two parallel workers finish together.
_SMOKE_IMAGES_PER_S = {"layer": 186, "cosine": 219, "rms": 296, "ibn": 298, "instance": 314, "batch_renorm": 320,
                       "batch": 326, "group": 338, "weight": 362, "none": 407}


def get_config(preset: str = "smoke") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.model = "resnet20"
    c.blocks_per_stage = 3          # residual blocks per stage: 3 is ResNet-20 (6n+2 layers)
    c.norm = "batch"                # the one field that switches the normalizer
    c.api = "linen"                 # or "nnx" (the same models in flax.nnx, nnx_models.py); the
                                    # comparison runner also takes "linen,nnx": both, side by side
    c.width = 16
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 182.0            # He et al.: 64k iterations at batch 128
    c.warmup_epochs = 1.0
    c.learning_rate = 0.1           # at batch 128; scaled linearly with the batch size
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.bfloat16 = False
    c.augment = "crop_flip"         # or "flip" (short runs) or "none"
    c.seed = 0
    c.devices = 0                   # local devices to train on (data parallel); 0 = all
    c.data_dir = ""                 # '' -> $NORMZOO_DATA -> ~/.cache/normzoo (downloaded)
    c.expected_per_file = 10000     # images per batch file; the loader rejects partial data
    c.train_subset = 0              # 0 = all 50,000
    c.test_subset = 0               # 0 = all 10,000
    c.resume = True
    c.log_every = 50
    # The comparison runner.
    c.norms = ",".join(NORMS)
    c.small_batch = True            # also run the small-batch experiment
    c.small_batch_size = 4          # statistics batch of that experiment (ghost batches)
    c.small_batch_norms = "batch,batch_renorm,group"
    c.renorm_warmup_fraction = 0.2  # BatchRenorm relaxes r_max/d_max over this share of steps
    c.workdir = "runs/cifar_" + preset
    c.workers = 1                   # runs at a time (each in its own single-threaded process if > 1)
    c.norm_overrides = ""           # fields of the normalizer: "r_max=2.0,warmup_steps=100"
    if preset in ("smoke", "small_batch"):  # 2 CPU cores: all ten names in under 20 minutes
        c.width = 8
        # Small batches: more updates for the same images, and on a CPU core they run faster
        # per image (measured, BatchNorm, one thread: batch 16 0.647 at 309 img/s; batch 32
        # 0.638 at 290 img/s; batch 64 0.603 at 283 img/s).
        c.batch_size = 16 if preset == "smoke" else 64
        c.num_epochs = 1.0
        c.warmup_epochs = 0.05
        c.learning_rate = 0.2       # at batch 128: 0.025 at batch 16, 0.1 at batch 64
        c.weight_decay = 5e-4
        c.augment = "flip"          # crops slow learning down in a sub-epoch budget
        c.small_batch = False       # its own preset, below
        c.workers = 2               # two single-threaded runs beat one two-threaded run by ~40%
        # The slowest runs first, so that the two workers finish together.
        c.norms = ",".join(sorted(NORMS, key=lambda n: _SMOKE_IMAGES_PER_S.get(n, 0)))
        if preset == "small_batch":  # BatchNorm vs BatchRenorm vs GroupNorm with statistics over 4
            c.norms = "batch,batch_renorm,group"
            c.small_batch = True
    elif preset == "full":          # ResNet-20 with the paper's schedule, on a GPU
        c.bfloat16 = True
    elif preset == "tiny":          # tests: a few steps on the fake fixture
        c.width = 4
        c.blocks_per_stage = 1      # ResNet-8: the same code, a third of the compilation
        c.num_epochs = 1.0
        c.batch_size = 8
        c.eval_batch_size = 16
        c.warmup_epochs = 0.5
        c.log_every = 1
        c.small_batch_size = 2
    else:
        raise ValueError(f"unknown preset {preset!r}; use smoke, small_batch, full or tiny.")
    return c
