"""PyTorch CLIP checkpoints (OpenAI, OpenCLIP, Hugging Face) <-> clipjax parameters.

Conversion is a table: for each torch key, the clipjax parameter path and one of a few
layout changes (transpose a Linear, HWIO a convolution, split attention into heads).
The table is built from the architecture's config, so every key and every shape is
checked, and the reverse direction is the same table read backwards.
"""

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from clipjax.models import variants
from clipjax.models.clip import abstract_params, create_model

# Keys that carry no parameters: OpenAI's scalar metadata, registered buffers, BN counters.
_IGNORED = re.compile(r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask|"
                      r"position_ids|num_batches_tracked)$")
_OPENAI_MARKER = "input_resolution"  # only OpenAI's own archives carry it


class ConversionError(ValueError):
    """A checkpoint that does not match the architecture it is converted to."""


# Layout changes, written with array methods only so they run on numpy arrays and on
# jax.eval_shape tracers (how the expected torch shapes are derived without allocating).
def _copy(x, _):
    return x


def _linear(x, _):  # torch Linear [out, in] <-> kernel [in, out]
    return x.T


def _conv(x, _):  # torch OIHW <-> HWIO
    return x.transpose(2, 3, 1, 0)


def _conv_back(x, _):
    return x.transpose(3, 2, 0, 1)


def _in_proj(x, heads):  # [3D, D] <-> [D, 3, H, K]
    d = x.shape[-1]
    return x.reshape(3, heads, d // heads, d).transpose(3, 0, 1, 2)


def _in_proj_back(x, _):
    d = x.shape[0]
    return x.transpose(1, 2, 3, 0).reshape(3 * d, d)


def _in_bias(x, heads):  # [3D] <-> [3, H, K]
    return x.reshape(3, heads, -1)


def _flat(x, _):
    return x.reshape(-1)


def _out_proj(x, heads):  # [D, D] (out, in) <-> [H, K, D]
    return x.T.reshape(heads, -1, x.shape[0])


def _out_proj_back(x, _):
    h, k, d = x.shape
    return x.reshape(h * k, d).T


_INVERSE: dict[Callable, Callable] = {_copy: _copy, _linear: _linear, _conv: _conv_back,
                                      _in_proj: _in_proj_back, _in_bias: _flat,
                                      _out_proj: _out_proj_back}

# (torch key, clipjax path, layout change, attention heads)
Rule = tuple[str, str, Callable, int]


def _block_rules(torch_prefix: str, path: str, heads: int, hf: bool) -> list[Rule]:
    """The rules of one pre-LN residual block in OpenAI/OpenCLIP or Hugging Face naming."""
    t, p = torch_prefix, path
    if hf:
        rules = [(f"{t}layer_norm1.weight", f"{p}/ln_1/scale", _copy, 0),
                 (f"{t}layer_norm1.bias", f"{p}/ln_1/bias", _copy, 0),
                 (f"{t}self_attn.out_proj.weight", f"{p}/attn/out_proj_kernel", _out_proj, heads),
                 (f"{t}self_attn.out_proj.bias", f"{p}/attn/out_proj_bias", _copy, 0),
                 (f"{t}layer_norm2.weight", f"{p}/ln_2/scale", _copy, 0),
                 (f"{t}layer_norm2.bias", f"{p}/ln_2/bias", _copy, 0),
                 (f"{t}mlp.fc1.weight", f"{p}/mlp/c_fc/kernel", _linear, 0),
                 (f"{t}mlp.fc1.bias", f"{p}/mlp/c_fc/bias", _copy, 0),
                 (f"{t}mlp.fc2.weight", f"{p}/mlp/c_proj/kernel", _linear, 0),
                 (f"{t}mlp.fc2.bias", f"{p}/mlp/c_proj/bias", _copy, 0)]
        # q, k and v are separate Linears there; _hf_fuse_qkv joins them first.
        return rules + [(f"{t}self_attn.in_proj_weight", f"{p}/attn/in_proj_kernel", _in_proj, heads),
                        (f"{t}self_attn.in_proj_bias", f"{p}/attn/in_proj_bias", _in_bias, heads)]
    rules = []
    for i in (1, 2):
        rules += [(f"{t}ln_{i}.weight", f"{p}/ln_{i}/scale", _copy, 0),
                  (f"{t}ln_{i}.bias", f"{p}/ln_{i}/bias", _copy, 0)]
    return rules + [
        (f"{t}attn.in_proj_weight", f"{p}/attn/in_proj_kernel", _in_proj, heads),
        (f"{t}attn.in_proj_bias", f"{p}/attn/in_proj_bias", _in_bias, heads),
        (f"{t}attn.out_proj.weight", f"{p}/attn/out_proj_kernel", _out_proj, heads),
        (f"{t}attn.out_proj.bias", f"{p}/attn/out_proj_bias", _copy, 0),
        (f"{t}mlp.c_fc.weight", f"{p}/mlp/c_fc/kernel", _linear, 0),
        (f"{t}mlp.c_fc.bias", f"{p}/mlp/c_fc/bias", _copy, 0),
        (f"{t}mlp.c_proj.weight", f"{p}/mlp/c_proj/kernel", _linear, 0),
        (f"{t}mlp.c_proj.bias", f"{p}/mlp/c_proj/bias", _copy, 0)]


def _conv_bn_rules(t: str, p: str, conv: str, bn: str, jconv: str, jbn: str) -> list[Rule]:
    return [(f"{t}{conv}.weight", f"{p}/{jconv}/kernel", _conv, 0),
            (f"{t}{bn}.weight", f"{p}/{jbn}/scale", _copy, 0),
            (f"{t}{bn}.bias", f"{p}/{jbn}/bias", _copy, 0),
            (f"{t}{bn}.running_mean", f"{p}/{jbn}/mean", _copy, 0),
            (f"{t}{bn}.running_var", f"{p}/{jbn}/var", _copy, 0)]


def _resnet_rules(v: variants.VisionConfig) -> list[Rule]:
    rules = []
    for i in (1, 2, 3):
        rules += _conv_bn_rules("visual.", "visual", f"conv{i}", f"bn{i}", f"conv{i}", f"bn{i}")
    inplanes = v.width
    for stage, (blocks, planes) in enumerate(zip(v.layers, [v.width * 2**s for s in range(4)]), 1):
        for j in range(blocks):
            t, p = f"visual.layer{stage}.{j}.", f"visual/layer{stage}_{j}"
            for i in (1, 2, 3):
                rules += _conv_bn_rules(t, p, f"conv{i}", f"bn{i}", f"conv{i}", f"bn{i}")
            if (stage > 1 and j == 0) or inplanes != planes * 4:
                rules += _conv_bn_rules(t, p, "downsample.0", "downsample.1", "downsample_0",
                                        "downsample_1")
            inplanes = planes * 4
    rules.append(("visual.attnpool.positional_embedding", "visual/attnpool/positional_embedding",
                  _copy, 0))
    for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
        rules += [(f"visual.attnpool.{proj}.weight", f"visual/attnpool/{proj}/kernel", _linear, 0),
                  (f"visual.attnpool.{proj}.bias", f"visual/attnpool/{proj}/bias", _copy, 0)]
    return rules


def rules(config: variants.ClipConfig, layout: str = "openclip") -> list[Rule]:
    """The full key table of `config` in the "openclip" (also OpenAI's) or "hf" layout."""
    v, t = config.vision, config.text
    hf = layout == "hf"
    if layout not in ("openclip", "hf"):
        raise ValueError(f"Unknown layout {layout!r}; choose 'openclip' or 'hf'.")
    if hf and v.is_resnet:
        raise ConversionError("Hugging Face's CLIPModel has no ResNet image tower; convert RN "
                              "checkpoints from OpenAI or OpenCLIP files instead.")
    out: list[Rule] = [("logit_scale", "logit_scale", _copy, 0)]
    if config.init_logit_bias is not None:
        out.append(("logit_bias", "logit_bias", _copy, 0))
    if hf:
        ve, te = "vision_model.", "text_model."
        out += [(f"{ve}embeddings.patch_embedding.weight", "visual/conv1_kernel", _conv, 0),
                (f"{ve}embeddings.class_embedding", "visual/class_embedding", _copy, 0),
                (f"{ve}embeddings.position_embedding.weight", "visual/positional_embedding", _copy, 0),
                (f"{ve}pre_layrnorm.weight", "visual/ln_pre/scale", _copy, 0),  # sic, HF's name
                (f"{ve}pre_layrnorm.bias", "visual/ln_pre/bias", _copy, 0),
                (f"{ve}post_layernorm.weight", "visual/ln_post/scale", _copy, 0),
                (f"{ve}post_layernorm.bias", "visual/ln_post/bias", _copy, 0),
                ("visual_projection.weight", "visual/proj", _linear, 0),
                (f"{te}embeddings.token_embedding.weight", "text/token_embedding", _copy, 0),
                (f"{te}embeddings.position_embedding.weight", "text/positional_embedding", _copy, 0),
                (f"{te}final_layer_norm.weight", "text/ln_final/scale", _copy, 0),
                (f"{te}final_layer_norm.bias", "text/ln_final/bias", _copy, 0),
                ("text_projection.weight", "text/text_projection", _linear, 0)]
        for i in range(v.layers):
            out += _block_rules(f"{ve}encoder.layers.{i}.", f"visual/transformer/resblocks_{i}",
                                v.heads, hf=True)
        for i in range(t.layers):
            out += _block_rules(f"{te}encoder.layers.{i}.", f"text/transformer/resblocks_{i}",
                                t.heads, hf=True)
        return out
    out += [("token_embedding.weight", "text/token_embedding", _copy, 0),
            ("positional_embedding", "text/positional_embedding", _copy, 0),
            ("ln_final.weight", "text/ln_final/scale", _copy, 0),
            ("ln_final.bias", "text/ln_final/bias", _copy, 0),
            ("text_projection", "text/text_projection", _copy, 0)]
    for i in range(t.layers):
        out += _block_rules(f"transformer.resblocks.{i}.", f"text/transformer/resblocks_{i}",
                            t.heads, hf=False)
    if v.is_resnet:
        return out + _resnet_rules(v)
    out += [("visual.conv1.weight", "visual/conv1_kernel", _conv, 0),
            ("visual.class_embedding", "visual/class_embedding", _copy, 0),
            ("visual.positional_embedding", "visual/positional_embedding", _copy, 0),
            ("visual.ln_pre.weight", "visual/ln_pre/scale", _copy, 0),
            ("visual.ln_pre.bias", "visual/ln_pre/bias", _copy, 0),
            ("visual.ln_post.weight", "visual/ln_post/scale", _copy, 0),
            ("visual.ln_post.bias", "visual/ln_post/bias", _copy, 0),
            ("visual.proj", "visual/proj", _copy, 0)]
    for i in range(v.layers):
        out += _block_rules(f"visual.transformer.resblocks.{i}.",
                            f"visual/transformer/resblocks_{i}", v.heads, hf=False)
    return out


# ---------------------------------------------------------------------------------------
# Nested-dict helpers and the scanned (layer-stacked) form.

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


_BLOCK = re.compile(r"^(.*/transformer)/resblocks_(\d+)/(.*)$")


def stack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Per-block paths `.../resblocks_i/x` -> one stacked `.../resblocks/x` (scan layout)."""
    groups: dict[str, dict[int, Any]] = {}
    out = {}
    for key, v in flat.items():
        m = _BLOCK.match(key)
        if m:
            groups.setdefault(f"{m[1]}/resblocks/{m[3]}", {})[int(m[2])] = v
        else:
            out[key] = v
    for key, by_layer in groups.items():
        out[key] = np.stack([np.asarray(by_layer[i]) for i in range(len(by_layer))])
    return out


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of stack_layers."""
    out = {}
    for key, v in flat.items():
        if "/transformer/resblocks/" in key:
            head, tail = key.split("/resblocks/")
            for i in range(v.shape[0]):
                out[f"{head}/resblocks_{i}/{tail}"] = v[i]
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------
# State dicts.

def _contiguous(x) -> np.ndarray:
    # Not np.ascontiguousarray: it returns at least 1-d, and logit_scale must stay 0-d.
    return np.asarray(x, order="C")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bf16/fp16 go through float32
        x = x.detach().cpu()
        if not x.is_floating_point():
            return x.numpy()
        return x.float().numpy()
    return np.asarray(x)


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """"hf" for Hugging Face CLIPModel keys, else "openclip" (OpenAI's layout too)."""
    return "hf" if any(k.startswith(("vision_model.", "text_model.")) for k in state_dict) else "openclip"


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DDP's `module.` prefix and the keys that hold no parameters."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # OpenCLIP training checkpoints
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if not _IGNORED.search(k):
            out[k] = v
    return out


def _hf_fuse_qkv(sd: dict[str, Any]) -> dict[str, Any]:
    """Join Hugging Face's separate q/k/v projections into torch MHA's in_proj."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith("self_attn.q_proj.weight")]:
        base = key[: -len("q_proj.weight")]
        for kind in ("weight", "bias"):
            parts = [f"{base}{n}_proj.{kind}" for n in "qkv"]
            if all(p in sd for p in parts):
                out[f"{base}in_proj_{kind}"] = np.concatenate([_to_numpy(sd[p]) for p in parts])
                for p in parts:
                    del out[p]
    return out


def _hf_split_qkv(sd: dict[str, Any]) -> dict[str, Any]:
    """The inverse of _hf_fuse_qkv, with array methods only (see the layout changes)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*self_attn\.)in_proj_(weight|bias)$", k)
        if m:
            parts = v.reshape(3, v.shape[0] // 3, *v.shape[1:])
            for i, name in enumerate("qkv"):
                out[f"{m[1]}{name}_proj.{m[2]}"] = parts[i]
        else:
            out[k] = v
    return out


def _check_keys(sd: Mapping[str, Any], expected: Mapping[str, tuple], arch: str) -> None:
    want = expected.keys()
    missing = sorted(want - sd.keys())
    unexpected = sorted(sd.keys() - want)
    misshaped = [f"{k} {tuple(np.shape(sd[k]))} (expected {expected[k]})" for k in sorted(want & sd.keys())
                 if tuple(np.shape(sd[k])) != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:  # all of them: a user fixing a checkpoint needs the whole list
            problems.append(f"{len(items)} {label}: {', '.join(items)}")
    if problems:
        raise ConversionError(f"This state dict does not match {arch}: " + "; ".join(problems)
                              + ". Check the --arch name (or let it be inferred) and that the file "
                              "is a CLIP checkpoint.")


def _to_layout(flat: Mapping[str, Any], table: list[Rule], layout: str) -> dict[str, Any]:
    sd = {key: _INVERSE[fn](flat[path], heads) for key, path, fn, heads in table}
    return _hf_split_qkv(sd) if layout == "hf" else sd


def _config(arch: "str | variants.ClipConfig") -> variants.ClipConfig:
    return arch if isinstance(arch, variants.ClipConfig) else variants.get_config(arch)


def _name(arch: "str | variants.ClipConfig") -> str:
    return arch if isinstance(arch, str) else "the architecture given"


@functools.cache
def _torch_shapes(config: variants.ClipConfig, layout: str) -> dict[str, tuple[int, ...]]:
    table = rules(config, layout)
    # The scanned model traces one block per tower instead of all of them (ViT-bigG: 5x).
    flat = _flatten(abstract_params(create_model(config, scan=True)))
    out = jax.eval_shape(lambda f: _to_layout(unstack_layers(f), table, layout), flat)
    return {k: tuple(v.shape) for k, v in out.items()}


def torch_shapes(arch: "str | variants.ClipConfig",
                 layout: str = "openclip") -> dict[str, tuple[int, ...]]:
    """The reference key -> shape map of `arch`, derived without allocating anything."""
    return dict(_torch_shapes(_config(arch), layout))


def from_torch(state_dict: Mapping[str, Any], arch: "str | variants.ClipConfig",
               scan: bool = False) -> dict:
    """An OpenAI / OpenCLIP / Hugging Face state dict -> clipjax params (float32).

    Every key is accounted for and every shape checked; problems are reported together.
    `scan=True` stacks the transformer blocks for `create_model(arch, scan=True)`.
    """
    config = _config(arch)
    sd = clean_state_dict(state_dict)
    layout = detect_layout(sd)
    table = rules(config, layout)
    _check_keys(sd, torch_shapes(config, layout), _name(arch))  # HF's separate q/k/v checked as they are
    if layout == "hf":
        sd = _hf_fuse_qkv(sd)
    flat = {path: np.asarray(fn(_to_numpy(sd[key]), heads), np.float32)
            for key, path, fn, heads in table}
    if scan:
        flat = stack_layers(flat)
    return _unflatten(flat)


def to_torch(params: Mapping, arch: "str | variants.ClipConfig",
             layout: str = "openclip") -> dict[str, np.ndarray]:
    """clipjax params -> a state dict of numpy arrays in OpenCLIP's (or HF's) layout."""
    config = _config(arch)
    flat = unstack_layers({k: np.asarray(v) for k, v in _flatten(params).items()})
    table = rules(config, layout)
    paths = {r[1] for r in table}
    extra = sorted(set(flat) - paths)
    missing = sorted(paths - set(flat))
    if extra or missing:
        raise ConversionError(f"These params do not match {_name(arch)}: missing "
                              f"{', '.join(missing) or 'none'}; unexpected "
                              f"{', '.join(extra) or 'none'}. Convert with the arch the params "
                              "were made for.")
    return {k: _contiguous(v) for k, v in _to_layout(flat, table, layout).items()}


# ---------------------------------------------------------------------------------------
# Architecture inference and files.

def infer_arch(state_dict: Mapping[str, Any]) -> str:
    """The table's architecture whose every key and shape matches (tiny sizes included).

    OpenAI's own archives get "-quickgelu", the activation their weights were trained with.
    """
    sd = clean_state_dict(state_dict)
    layout = detect_layout(sd)
    shapes = {k: tuple(np.shape(v)) for k, v in sd.items()}
    for name, config in variants.VARIANTS.items():
        if layout == "hf" and config.vision.is_resnet:
            continue
        if _quick_match(sd, config, layout) and torch_shapes(name, layout) == shapes:
            return name + (variants.QUICKGELU_SUFFIX if _OPENAI_MARKER in state_dict else "")
    raise ConversionError("The checkpoint matches no known architecture; pass --arch with one of "
                          f"{', '.join(variants.names())}.")


def _quick_match(sd: Mapping[str, Any], config: variants.ClipConfig, layout: str) -> bool:
    """A cheap filter on two shapes before the full comparison."""
    key = "text_model.embeddings.position_embedding.weight" if layout == "hf" else "positional_embedding"
    proj = "text_projection.weight" if layout == "hf" else "text_projection"
    if key not in sd or proj not in sd:
        return False
    embed = np.shape(sd[proj])[0 if layout == "hf" else 1]
    return (np.shape(sd[key])[0] == config.text.context_length and embed == config.embed_dim)
