"""Run from a clean directory with the wheel installed: the wheel holds the package and nothing
else, and it works without the repository (no examples, no tests)."""

import importlib.metadata
import importlib.util
import sys
import zipfile

wheel = sys.argv[1]
names = zipfile.ZipFile(wheel).namelist()
outside = [n for n in names if not (n.startswith("normzoo/") or ".dist-info/" in n)]
assert not outside, f"the wheel holds files outside the package: {outside}"
assert "normzoo/py.typed" in names, "the wheel lacks normzoo/py.typed"

for absent in ("examples", "tests", "benchmarks"):
    assert importlib.util.find_spec(absent) is None, f"'{absent}' is importable from the installed wheel"

import jax.numpy as jnp  # noqa: E402

import normzoo  # noqa: E402
from normzoo import analysis, deploy, functional, nnx, sbx  # noqa: E402, F401

assert normzoo.__version__ == importlib.metadata.version("normzoo"), (normzoo.__version__,)
x = jnp.arange(24.0).reshape(6, 4) + 1e4
y, _ = normzoo.BatchNorm(use_running_average=False).init_with_output({"params": __import__("jax").random.key(0)}, x)
assert abs(float(y.mean())) < 1e-3 and abs(float(y.std()) - 1) < 1e-2, (float(y.mean()), float(y.std()))
print(f"ci: the wheel ({len(names)} files) installs and imports; normzoo {normzoo.__version__}")
