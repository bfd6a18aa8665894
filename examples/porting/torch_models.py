"""torchvision's models, for the porting example and its tests."""

from __future__ import annotations

import importlib
import sys
import types


def torchvision_models():
    """``torchvision.models``. Where torchvision's compiled operators do not load beside the
    installed torch (a torchvision wheel built for another torch build: "operator torchvision::nms
    does not exist"), only the pure-Python model definitions are loaded, which is all a port
    needs. ModuleNotFoundError where torchvision is absent."""
    try:
        return importlib.import_module("torchvision.models")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    spec = importlib.util.find_spec("torchvision")
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")
