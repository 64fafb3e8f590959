"""Models for evaluation from checkpoint paths, and a fingerprint that identifies the weights."""

import hashlib
import os
from pathlib import Path

import jax
import numpy as np

from clipjax import convert
from clipjax.models.clip import CLIP, create_model


def load_model(path: str | os.PathLike, arch: str | None = None) -> tuple[CLIP, dict, str]:
    """(model, params as NumPy, architecture) from a clipjax .safetensors parameter file or a
    PyTorch OpenAI / OpenCLIP / Hugging Face checkpoint (architecture inferred when None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; give a clipjax .safetensors "
                                "file, a PyTorch CLIP checkpoint or a Hugging Face model folder.")
    if path.suffix == ".safetensors" and convert.safetensors_metadata(path).get("format") == "clipjax":
        file_arch, params = convert.load_params(path)
        if arch is not None and arch != file_arch:
            raise ValueError(f"{path} holds {file_arch} parameters but --arch says {arch}; drop "
                             "--arch (clipjax files record their architecture).")
        arch = file_arch
    else:
        arch, params = convert.load_torch_checkpoint(path, arch)
    return create_model(arch), params, arch


def fingerprint(params) -> str:
    """A short hash of the weights: every leaf's path, shape and a strided sample of its values.

    Cheap on the largest models (at most 4096 values a leaf), yet two different trainings
    or conversions practically never agree; the same weights loaded from a .pt or a
    converted .safetensors agree exactly.
    """
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.asarray(leaf)
        flat = x.reshape(-1)
        sample = flat[::max(1, flat.size // 4096)].astype(np.float32)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(x.shape).encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]
