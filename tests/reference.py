"""Imports of the PyTorch references (OpenCLIP, Hugging Face) for parity tests.

The torchvision wheel that matches the CPU build of torch ships CUDA-linked operators
that fail to load on a CPU-only machine, and `import torchvision` then raises. OpenCLIP
only needs torchvision's pure-Python parts (transforms, FrozenBatchNorm2d), so when the
package cannot initialise we register it without running its `__init__`: the submodules
still import from the real package directory.
"""

import importlib.util
import sys
import types


def _torchvision_without_ops():
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    module = types.ModuleType("torchvision")
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    sys.modules["torchvision"] = module


def open_clip():
    """OpenCLIP; the `test` extra installs it, and a missing reference is a failure."""
    _torchvision_without_ops()
    import open_clip as oc
    return oc


def torchvision_transforms():
    _torchvision_without_ops()
    import torchvision.transforms as T
    return T


def hf_clip():
    """Hugging Face's (CLIPModel, CLIPConfig); transformers also imports torchvision."""
    _torchvision_without_ops()
    from transformers import CLIPConfig, CLIPModel
    return CLIPModel, CLIPConfig
