"""Loading `configs/*.py` files (`get_config(arg)`) with dotted command-line overrides.

    load_config("configs/clip_vit_b32.py:runlocal", ["optimizer.lr=1e-3", "loss=tiled"])

Every override must name an existing key and keep its type; anything else is one error
naming the key and the valid choices, before anything compiles.
"""

import ast
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections

# configs/ of a source checkout, or its copy inside an installed wheel.
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "configs",
                               Path(__file__).resolve().parent / "configs") if d.is_dir()),
                  Path(__file__).resolve().parent / "configs")


def config_path(name: str) -> Path:
    """A config file from a path or a bare name in configs/ ("default", "clip_vit_b32")."""
    path = Path(name)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{name}.py"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                       if not p.stem.startswith("_")) if CONFIG_DIR.exists() else []
        raise FileNotFoundError(f"config {name!r} not found; give a path to a .py file with "
                                f"get_config(arg) or one of: {', '.join(known)}.")
    return path


def _configs_package() -> None:
    """Makes configs/ importable as clipjax.configs, as it is in an installed wheel, so that
    config files share code through normal imports (`from clipjax.configs import _paper`).
    A source checkout on sys.path (python -m from its root) has no such package otherwise."""
    import importlib
    import sys
    import types

    try:
        importlib.import_module("clipjax.configs")
    except ModuleNotFoundError:
        package = types.ModuleType("clipjax.configs")
        package.__path__ = [str(CONFIG_DIR)]
        sys.modules["clipjax.configs"] = package


def _module(path: Path):
    _configs_package()
    spec = importlib.util.spec_from_file_location(f"clipjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg) function.")
    return module


def _parse(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _set_model_field(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """model_overrides.FIELD[.SUBFIELD]=value: any field of the architecture's config."""
    from clipjax.models import variants

    field = dotted.split(".", 1)[1]
    valid = variants.field_names()
    if field not in valid:
        raise ValueError(f"unknown config key {dotted!r}: the architecture has no field "
                         f"{field!r}; model_overrides takes {', '.join(valid)}.")
    node = config.model_overrides
    *parents, key = field.split(".")
    for name in parents:
        if name not in node:
            node[name] = ml_collections.ConfigDict()
        node = node[name]
    with node.ignore_type():
        node[key] = _parse(text)


def _check_model_overrides(config: ml_collections.ConfigDict) -> None:
    """Each override keeps its field's type (a list for a tuple); one error names a bad one."""
    from clipjax.models import variants

    base = variants.flat_fields(variants.to_dict(variants.get_config(config.model)))
    given = variants.flat_fields(config.model_overrides.to_dict())
    for key, value in given.items():
        old = base.get(key)
        if old is not None and not _same_kind(old, value):
            raise ValueError(f"config key 'model_overrides.{key}' takes a {type(old).__name__} "
                             f"({config.model} has {old!r}); got {value!r}.")
    variants.with_overrides(variants.get_config(config.model), given)  # unknown names


def _set(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    if dotted.startswith("model_overrides.") and "model_overrides" in config:
        return _set_model_field(config, dotted, text)
    *parents, key = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            where = ".".join(parents[:i]) or "the top level"
            raise ValueError(f"unknown config key {dotted!r}: {where} has no section {name!r}; "
                             f"valid keys there: {', '.join(sorted(node.keys()))}.")
        node = node[name]
    if key not in node:
        where = ".".join(parents) or "the top level"
        raise ValueError(f"unknown config key {dotted!r}; valid keys at {where}: "
                         f"{', '.join(sorted(node.keys()))}.")
    old, value = node[key], _parse(text)
    if isinstance(old, ml_collections.ConfigDict):
        raise ValueError(f"config key {dotted!r} is a section; set one of its keys: "
                         f"{', '.join(sorted(old.keys()))}.")
    if old is not None and not _same_kind(old, value):
        raise ValueError(f"config key {dotted!r} takes a {type(old).__name__} "
                         f"(now {old!r}); got {text!r}.")
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    with node.ignore_type():
        node[key] = value


def _same_kind(old, value) -> bool:
    if isinstance(old, bool) or isinstance(value, bool):
        return isinstance(old, bool) and isinstance(value, bool)
    if isinstance(old, (int, float)):
        return isinstance(value, (int, float)) and not (isinstance(old, int)
                                                        and isinstance(value, float))
    if isinstance(old, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(old))


def load_config(spec: str = "default", overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config(arg)` from "path.py[:arg]" (or a name in configs/), then `key=value`s."""
    name, _, arg = spec.partition(":")
    module = _module(config_path(name))
    config = module.get_config(arg or None)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optimizer.lr=1e-3).")
        key, text = item.split("=", 1)
        _set(config, key.strip(), text.strip())
    if "model_overrides" in config and "model" in config and not str(
            config.model).startswith("GroupViT-"):  # GroupViT's own variants (heads.groupvit)
        _check_model_overrides(config)
    config.lock()
    return config
