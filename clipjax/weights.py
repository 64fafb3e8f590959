"""What a checkpoint path means, and a run's parameters written out for other tools.

Every `--checkpoint` (and a config's `init_checkpoint`) is one of:

    a training workdir           its latest step; run.json says which model it trains
    a step folder                WORKDIR/checkpoints/<step>
    a clipjax .safetensors       from `clipjax export`, `clipjax convert` or training's
                                 model.safetensors; the file records its architecture
    a PyTorch checkpoint         OpenAI (TorchScript), OpenCLIP or Hugging Face, a file or a
                                 folder, converted on the fly (torch's restricted unpickler)

Parameters come back as NumPy arrays in the unscanned layout (`resblocks_0`, ...) whatever
layout they were trained in; `fit_layout` stacks them for a scanned model.
"""

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from clipjax import convert, files
from clipjax.checkpoint import RUN_FILE
from clipjax.models import variants
from clipjax.models.clip import CLIP, abstract_params, create_model
from clipjax.optim import param_paths

CONFIG_FILE = "config.json"  # the training config, written when a run starts
FINAL_FILE = "model.safetensors"  # written when a run finishes
LAYOUTS = ("clipjax", "openclip", "hf")


@dataclasses.dataclass
class Weights:
    """Parameters and what they belong to."""

    params: dict  # NumPy, unscanned layout
    arch: str  # the architecture's name, e.g. "ViT-B-32-quickgelu"
    # The name's config with any overrides applied; None for a head with its own image
    # tower (GroupViT), whose training config (`config`) describes it.
    model_config: variants.ClipConfig | None
    source: str  # where they came from, for reports
    config: dict | None = None  # the training config, when a clipjax run made them

    @property
    def description(self) -> str:
        """The name, plus the fields where the model differs from it."""
        if self.model_config is None:
            return self.arch
        return variants.describe(self.arch, self.model_config)

    def model(self, **kwargs) -> CLIP:
        if self.model_config is None:
            raise ValueError(f"{self.source} holds a {self.arch} model, not CLIP; use it with "
                             "the commands of its task (clipjax segment, eval segmentation).")
        return create_model(self.model_config, **kwargs)


def own_architecture(name: str) -> bool:
    """Whether `name` is a head's own architecture rather than a CLIP variant (GroupViT)."""
    return name.startswith("GroupViT-")


def _arch_config(name: str, overrides: dict | None = None) -> variants.ClipConfig | None:
    if own_architecture(name):
        return None
    config = variants.get_config(name)
    return variants.with_overrides(config, overrides) if overrides else config


# ---------------------------------------------------------------------------------------
# Training workdirs.


def is_workdir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and path.parent.name == "checkpoints" and (path / "state").is_dir()


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished checkpoints of a workdir (orbax writes each under a temporary name first)."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if _is_step_dir(p))


def run_identity(workdir: str | os.PathLike) -> dict:
    """run.json: the model a workdir trains ({"model", "model_overrides", "scan", ...})."""
    return json.loads((Path(workdir) / RUN_FILE).read_text())


def _step_dir(path: Path, step: int | None) -> tuple[Path, Path]:
    """(workdir, step folder) for a workdir (latest or `step`) or a step folder."""
    if _is_step_dir(path):
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, not {step}; give the "
                             "workdir with --step, or the step folder alone.")
        return path.parent.parent, path
    steps = saved_steps(path)
    if not steps:
        raise FileNotFoundError(f"Training workdir {path} holds no finished checkpoint yet; train "
                                "until the first save (checkpoint.every_steps) or give another "
                                "checkpoint.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"Training workdir {path} has no checkpoint of step {step}; it has "
                         f"steps {', '.join(map(str, steps))}.")
    return path, path / "checkpoints" / str(step)


def _restore_params(step_dir: Path) -> dict:
    """The parameters of an orbax TrainState checkpoint as NumPy, without the optimizer state."""
    import orbax.checkpoint as ocp

    state_dir = step_dir / "state"
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(state_dir).tree
    if "params" not in tree:
        raise ValueError(f"{step_dir} holds no parameters (keys: {', '.join(tree)}); is it a "
                         "clipjax training checkpoint?")
    target = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])}
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = ocp.Checkpointer(handler).restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore, partial_restore=True))
    return out["params"]


def _from_workdir(path: Path, step: int | None, arch: str | None) -> Weights:
    workdir, step_dir = _step_dir(path, step)
    if not is_workdir(workdir):
        raise FileNotFoundError(f"{workdir} has no {RUN_FILE}, so the model it trains is "
                                "unknown; give the training workdir that holds it.")
    identity = run_identity(workdir)
    name = identity["model"]
    if arch is not None and arch != name:
        raise ValueError(f"{workdir} trains {name} but --arch says {arch}; drop --arch (a "
                         "workdir records its architecture).")
    model_config = _arch_config(name, identity.get("model_overrides"))
    params = _canonical(_restore_params(step_dir))
    config_file = workdir / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    return Weights(params, name, model_config, f"{workdir} step {step_dir.name}", config)


# ---------------------------------------------------------------------------------------
# Files.


def _canonical(params) -> dict:
    """NumPy arrays in the unscanned layout."""
    flat = convert.unstack_layers({k: np.asarray(v) for k, v in convert._flatten(params).items()})
    return convert._unflatten(flat)


def fit_layout(params, scan: bool) -> dict:
    """`params` in the layout of a model built with `scan` (blocks stacked on a layers axis)."""
    flat = convert.unstack_layers(convert._flatten(params))
    return convert._unflatten(convert.stack_layers(flat) if scan else flat)


def _recorded_config(meta: dict, arch: str) -> variants.ClipConfig:
    recorded = meta.get("model_config")
    if recorded:
        return variants.from_dict(json.loads(recorded) if isinstance(recorded, str) else recorded)
    return _arch_config(arch)


def _from_clipjax_file(path: Path, arch: str | None) -> Weights:
    file_arch, params = files.load_params(path)
    if arch is not None and arch != file_arch:
        raise ValueError(f"{path} holds {file_arch} parameters but --arch says {arch}; drop "
                         "--arch (clipjax files record their architecture).")
    meta = files.safetensors_metadata(path)
    config = json.loads(meta["config"]) if "config" in meta else None
    return Weights(_canonical(params), file_arch, _recorded_config(meta, file_arch), str(path),
                   config)


def _from_torch(path: Path, arch: str | None) -> Weights:
    """A PyTorch CLIP checkpoint; the architecture is inferred from the shapes when None.

    OpenAI archives and Hugging Face / OpenCLIP configs that name QuickGELU yield the
    "-quickgelu" name, so the model built from it matches. A file written by `clipjax
    export --to openclip|hf` records its architecture and any overrides.
    """
    sd, meta = files.read_state_dict(path)
    # Before cleaning, which drops the marker with the other non-parameter keys.
    quick = meta.get("activation") == "quick_gelu" or convert._OPENAI_MARKER in sd
    sd = convert.clean_state_dict(sd)
    if arch is None and "arch" in meta:  # exported by clipjax
        arch = meta["arch"]
        model_config = _recorded_config(meta, arch)
    else:
        if arch is None:
            arch = convert.infer_arch(sd).removesuffix(variants.QUICKGELU_SUFFIX)
        model_config = variants.get_config(arch)  # an unknown name lists the valid ones
        if quick and not arch.endswith(variants.QUICKGELU_SUFFIX):
            arch += variants.QUICKGELU_SUFFIX
            model_config = variants.get_config(arch)
    config = json.loads(meta["config"]) if "config" in meta else None
    return Weights(convert.from_torch(sd, model_config), arch, model_config, str(path), config)


def clipjax_file(path: Path) -> Path | None:
    """`path` itself, or the model.safetensors inside a folder, when it is a clipjax file."""
    candidate = path / FINAL_FILE if path.is_dir() else path
    if candidate.suffix == ".safetensors" and candidate.is_file() and \
            files.safetensors_metadata(candidate).get("format") == files.FORMAT:
        return candidate
    return None


def load(path: str | os.PathLike, arch: str | None = None, step: int | None = None) -> Weights:
    """Parameters from any checkpoint a command accepts (see the module docstring)."""
    if not str(path):
        raise ValueError("No checkpoint given: name a training workdir, a clipjax .safetensors "
                         "file or a PyTorch CLIP checkpoint.")
    path = Path(path).expanduser().absolute()  # orbax reads absolute paths only
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; give a training workdir, a "
                                "clipjax .safetensors file, or a PyTorch CLIP checkpoint (file or "
                                "Hugging Face folder).")
    if is_workdir(path) or _is_step_dir(path):
        return _from_workdir(path, step, arch)
    if step is not None:
        raise ValueError(f"--step applies to training workdirs; {path} is not one.")
    if found := clipjax_file(path):
        return _from_clipjax_file(found, arch)
    return _from_torch(path, arch)


def load_model(path: str | os.PathLike, arch: str | None = None) -> tuple[CLIP, dict, str]:
    """(float32 model, NumPy params, architecture description) for evaluation."""
    w = load(path, arch)
    return w.model(), w.params, w.description


def fingerprint(params) -> str:
    """A short hash of the weights: every leaf's path, shape and a strided sample of its values.

    Cheap on the largest models (at most 4096 values a leaf), yet two different trainings
    or conversions practically never agree; the same weights loaded from a .pt, a
    converted .safetensors or a training workdir agree exactly.
    """
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(_canonical(params)),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.asarray(leaf)
        flat = x.reshape(-1)
        sample = flat[::max(1, flat.size // 4096)].astype(np.float32)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(x.shape).encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Writing parameters out.


def from_params(params, config, source: str) -> Weights:
    """The Weights of a training config's model (`config`: the run's ConfigDict)."""
    model_config = _arch_config(config.model, config.model_overrides.to_dict())
    return Weights(_canonical(params), config.model, model_config, source,
                   json.loads(config.to_json_best_effort()))


def _hf_config(c: variants.ClipConfig) -> dict:
    """A Hugging Face CLIPConfig (config.json) for `c`, so CLIPModel.from_pretrained loads it."""
    v, t = c.vision, c.text
    act = "quick_gelu" if c.activation == "quick_gelu" else "gelu"
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
        "logit_scale_init_value": c.init_logit_scale,
        "text_config": {"hidden_size": t.width, "intermediate_size": 4 * t.width,
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "vocab_size": t.vocab_size,
                        "hidden_act": act, "projection_dim": c.embed_dim,
                        "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
                        "pad_token_id": 0},
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_dim,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": act, "projection_dim": c.embed_dim,
                          "layer_norm_eps": 1e-5},
    }


def write(weights: Weights, out: str | os.PathLike, to: str = "clipjax") -> list[Path]:
    """Writes `weights` in a layout; returns the files written.

    clipjax: a .safetensors parameter file. openclip: OpenCLIP's state dict (.safetensors
    or .pt), which `open_clip.create_model(name, pretrained=OUT)` loads. hf: a Hugging Face
    model folder (model.safetensors + config.json) for `CLIPModel.from_pretrained(OUT)`, or
    its state dict alone when OUT ends in .safetensors.
    The .safetensors files record the architecture, its fields and the training config.
    """
    if to not in LAYOUTS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(LAYOUTS)}.")
    out = Path(out)
    meta: dict[str, Any] = {"arch": weights.arch, "source": weights.source}
    if weights.model_config is not None:
        meta["model_config"] = variants.to_dict(weights.model_config)
    if weights.config is not None:
        meta["config"] = weights.config
    if to == "clipjax":
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: clipjax parameter files are .safetensors; name it "
                             f"{out.with_suffix('.safetensors').name}.")
        files.save_params(out, weights.params, weights.arch, meta)
        return [out]
    task = (weights.config or {}).get("task", "clip")
    if task != "clip":
        raise ValueError(f"{weights.source} is a {task} run, whose own modules have no place in "
                         f"a CLIP checkpoint; export it --to clipjax (every clipjax command "
                         "reads that file), or train CLIP to share its towers.")
    if to == "openclip":
        if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise ValueError(f"{out}: an OpenCLIP checkpoint is a .safetensors or .pt file.")
        files.save_torch(out, convert.to_torch(weights.params, weights.model_config), meta)
        return [out]
    if weights.model_config.vision.is_resnet:
        raise ValueError(f"{weights.description} has a ResNet image tower, which Hugging Face's "
                         "CLIPModel does not have; write it --to openclip or --to clipjax.")
    state_dict = convert.to_torch(weights.params, weights.model_config, layout="hf")
    if out.suffix == ".safetensors":  # the state dict alone
        files.save_torch(out, state_dict, meta)
        return [out]
    if out.suffix:
        raise ValueError(f"{out}: --to hf writes a Hugging Face model folder (give a name "
                         "without a suffix) or a .safetensors state dict.")
    out.mkdir(parents=True, exist_ok=True)
    files.save_torch(out / "model.safetensors", state_dict, {**meta, "format": "pt"})
    config = out / "config.json"
    files.atomic_write(config, lambda tmp: Path(tmp).write_text(
        json.dumps(_hf_config(weights.model_config), indent=2)))
    return [out / "model.safetensors", config]


# --- init_checkpoint: a run started from other weights -----------------------------------


def load_init(state, config, model=None) -> tuple[Any, set[str]]:
    """Parameters from config.init_checkpoint (optionally only paths matching a regex), in
    the state's layout (scanned or not) and shardings, and the set of paths it gave.

    A head's own modules (paths a plain CLIP of the same architecture lacks) are taken when
    the checkpoint has them (a head's workdir) and otherwise keep their initialisation.
    """
    loaded = load(config.init_checkpoint)
    keep = [re.compile(p) for p in config.get("init_checkpoint_keep", ())]
    flat = dict(zip(jax.tree.leaves(param_paths(
        fit := fit_layout(loaded.params, config.scan))), jax.tree.leaves(fit)))
    paths = param_paths(state.params)
    clip_paths = None
    if model is not None and isinstance(model, CLIP) and type(model) is not CLIP:
        plain = CLIP(model.config, scan=model.scan)
        clip_paths = set(jax.tree.leaves(param_paths(abstract_params(plain))))
    wanted = [(p, x) for p, x in zip(jax.tree.leaves(paths), jax.tree.leaves(state.params))
              if (not keep or any(k.search(p) for k in keep))
              and (clip_paths is None or p in clip_paths or p in flat)]
    if not wanted:
        raise ValueError(f"init_checkpoint_keep {tuple(config.init_checkpoint_keep)} matches no "
                         "parameter; parameter paths look like visual/proj, text/ln_final/scale.")
    flat = _longer_text_context(flat, dict(wanted))
    bad = [f"{p} {tuple(x.shape)}" for p, x in wanted
           if p not in flat or flat[p].shape != x.shape]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"init_checkpoint {config.init_checkpoint} ({loaded.description}) lacks "
                         f"{len(bad)} parameter(s) of this model or has them in other shapes: "
                         f"{shown}; give a checkpoint of {config.model} with the same "
                         "model_overrides, or restrict init_checkpoint_keep.")
    take = {p for p, _ in wanted}

    def pick(path, old):
        return jax.device_put(flat[path], old.sharding) if path in take else old

    return state.replace(params=jax.tree.map(pick, paths, state.params)), take


def _longer_text_context(flat: dict, current: dict) -> dict:
    """A checkpoint's text positions fill the first rows of a longer table (GLIP's 256-token
    prompts from CLIP's 77); the rows past them keep their initialisation."""
    path = "text/positional_embedding"
    if path not in flat or path not in current:
        return flat
    old, new = flat[path], current[path]
    if old.ndim != 2 or old.shape[1] != new.shape[1] or old.shape[0] >= new.shape[0]:
        return flat
    filled = np.asarray(jax.device_get(new)).copy()
    filled[:old.shape[0]] = np.asarray(old)
    return {**flat, path: filled.astype(np.asarray(old).dtype)}
