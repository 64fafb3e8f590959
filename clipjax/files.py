"""Parameter and state-dict files: safetensors (bf16 included, no torch needed), PyTorch
pickles and TorchScript archives (read with torch's restricted unpickler), Hugging Face and
OpenCLIP folders; every file written whole or not at all."""

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from clipjax.convert import ConversionError, _flatten, _unflatten, _contiguous

FORMAT = "clipjax"  # the `format` metadata of clipjax parameter files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _folder_activation(path: Path) -> str | None:
    """The activation named by the config next to `path`: OpenCLIP's open_clip_config.json
    for its open_clip_* files, Hugging Face's config.json for the others."""
    openclip = path.name.startswith("open_clip_")
    try:
        cfg = json.loads((path.parent / ("open_clip_config.json" if openclip else "config.json"))
                         .read_text())
        if openclip:
            return "quick_gelu" if cfg["model_cfg"].get("quick_gelu") else "gelu"
        act = cfg.get("text_config", {}).get("hidden_act") or cfg.get("hidden_act")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return None if act is None else ("quick_gelu" if act == "quick_gelu" else "gelu")


# safetensors dtype names -> numpy; bfloat16 comes from ml_dtypes (a JAX dependency), which
# the safetensors package's own numpy reader does not use, so bf16 files would not load.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the JSON header, byte offset of the data) of a .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        try:
            if not 0 < size <= min(path.stat().st_size - 8, 100 << 20):
                raise ValueError(f"header size {size} does not fit the file")
            return json.loads(f.read(size)), 8 + size
        except ValueError as e:
            raise ConversionError(f"{path} is not a readable .safetensors file ({e}); is it "
                                  "truncated, or another format with the wrong suffix?") from e


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The free-form metadata of a .safetensors file, without reading its tensors."""
    return _safetensors_header(Path(path))[0].get("__metadata__") or {}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as memory-mapped numpy arrays, metadata) of a .safetensors file, bf16 included."""
    path = Path(path)
    header, start = _safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    data = np.memmap(path, np.uint8, "r")
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _SAFETENSORS_DTYPES or start + end > data.size:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {info['dtype']} or bytes "
                                  f"{begin}..{end} that this reader cannot use; is the file truncated?")
        out[name] = (data[start + begin:start + end].view(_SAFETENSORS_DTYPES[info["dtype"]])
                     .reshape(info["shape"]))
    return out, meta


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, metadata) from a .pt/.pth/.bin (pickle or TorchScript), a .safetensors
    file, or a Hugging Face model folder. Metadata holds "activation" when the file says."""
    path = Path(path)
    meta: dict[str, Any] = {}
    if path.is_dir():
        for name in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                     "open_clip_pytorch_model.bin"):
            if (path / name).exists():
                sd, meta = read_state_dict(path / name)
                break
        else:
            raise FileNotFoundError(f"No checkpoint file in folder {path}: expected "
                                    "model.safetensors, open_clip_model.safetensors or "
                                    "pytorch_model.bin.")
        return sd, meta
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; give the path of a .pt, "
                                ".bin or .safetensors file, or a Hugging Face model folder.")
    if activation := _folder_activation(path):
        meta["activation"] = activation
    if path.suffix == ".safetensors":
        sd, file_meta = read_safetensors(path)
        return sd, {**meta, **file_meta}
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"Reading {path.name} needs PyTorch: `pip install 'clipjax[torch]'`, or "
                          "give a .safetensors file instead.") from e
    if _is_torchscript(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        meta["activation"] = "quick_gelu"  # only OpenAI published TorchScript CLIP archives
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return dict(sd), meta


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, renamed on success only.

    The file gets the permissions any new file gets (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _metadata(arch: str | None, metadata: Mapping[str, Any] | None) -> dict[str, str]:
    meta = {} if arch is None else {"format": FORMAT, "arch": arch}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def save_params(path: str | os.PathLike, params: Mapping, arch: str,
                metadata: Mapping[str, Any] | None = None) -> None:
    """clipjax params -> a .safetensors file whose metadata records the architecture (and
    `metadata`: strings as they are, anything else as JSON)."""
    from safetensors.numpy import save_file
    flat = {k: _contiguous(v) for k, v in _flatten(params).items()}
    meta = _metadata(arch, metadata)
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_params(path: str | os.PathLike) -> tuple[str, dict]:
    """(architecture name, params) from a file written by save_params."""
    sd, meta = read_state_dict(path)
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path} is not a clipjax parameter file; convert it first with "
                              f"`clipjax convert {path} OUT.safetensors`.")
    return meta["arch"], _unflatten(sd)


def save_torch(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
               metadata: Mapping[str, Any] | None = None) -> None:
    """A state dict -> .safetensors (no torch needed; with `metadata`) or .pt (torch tensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        meta = _metadata(None, metadata) or None
        atomic_write(path, lambda tmp: save_file(dict(state_dict), tmp, metadata=meta))
        return
    import torch
    # A copy: arrays read from a .safetensors are read-only memory maps.
    tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))
