"""Train one CIFAR-10 model with one normalizer.

    python -m examples.cifar.main --config=examples/cifar/configs/default.py:smoke --config.norm=group

Every config field can be overridden as ``--config.FIELD=VALUE``; the run is written to
``config.workdir/config.norm`` and resumes from its checkpoint when restarted.
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from examples.cifar import train

_DEFAULT = str(Path(__file__).parent / "configs" / "default.py")


def _main(argv):
    del argv
    config = flags.FLAGS.config
    result = train.train_and_evaluate(config, Path(config.workdir) / config.norm)
    s = result["summary"]
    print(f"{config.model}/{config.norm}: test accuracy {s['test_accuracy']:.4f}, "
          f"final train loss {s['final_train_loss']:.3f}, {s['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    # Defined here, not at import: the examples' tests import several mains in one process.
    config_flags.DEFINE_config_file("config", _DEFAULT, "Config file (':preset' picks smoke, full or tiny).")
    app.run(_main)
