"""What the package declares is what CI tests: the version floors, the version, the changelog."""

import re
import tomllib
from pathlib import Path

from packaging.version import Version

import normzoo

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_declared_floors_are_the_versions_ci_pins():
    floors = {}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        floors[name] = Version(floor)
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line.strip()).groups()
                for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert floors.keys() == {"jax", "flax", "numpy"}  # at runtime normzoo imports these, nothing else
    for name, floor in floors.items():
        assert Version(pins[name]) == floor, f"{name}: pyproject says >={floor}, CI pins {pins[name]}"
    assert pins["jaxlib"] == pins["jax"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"  # flax >= 0.12.5 needs Python 3.11


def test_the_version_is_one_and_the_changelog_has_it():
    version = PYPROJECT["project"]["version"]
    assert normzoo.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, flags=re.M)
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{version}]")


def test_the_package_says_it_is_typed():
    assert (ROOT / "normzoo" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["normzoo"]
