"""One training run in its own process, for the comparison runner's parallel mode.

    python -m examples.cifar.worker CONFIG_JSON WORKDIR PROGRESS POSITION

The parent sets ``XLA_FLAGS`` (one intra-op thread) before this process imports JAX. On a machine
with few cores, several single-threaded runs side by side do more work than one run using every
core (XLA's CPU kernels do not scale perfectly with threads).
"""

import json
import sys
from pathlib import Path

import ml_collections

from examples.cifar import train


def main(argv) -> None:
    config_path, workdir, progress, position = argv[1], argv[2], argv[3] == "1", int(argv[4])
    config = ml_collections.ConfigDict(json.loads(Path(config_path).read_text()))
    train.train_and_evaluate(config, workdir, progress=progress, position=position)


if __name__ == "__main__":
    main(sys.argv)
