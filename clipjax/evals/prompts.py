"""Class names and prompt templates, as data: OpenAI's ImageNet lists and CLIP's per-dataset ones.

`prompts.json` holds, for each dataset the CLIP paper evaluated zero-shot, its class names
and templates as OpenAI published them (data/prompts.md and the ImageNet prompt-engineering
notebook of github.com/openai/CLIP; ImageNet's names are the cleaned list that notebook
introduced, checked identical to OpenCLIP's `IMAGENET_CLASSNAMES`). A class is a name or,
for FER2013, a list of synonyms whose prompts are all averaged into one class embedding.
"""

import functools
import importlib.resources
import json
import re
from collections.abc import Sequence
from pathlib import Path

ClassName = str | list[str]

# tfds dataset names -> the entry of prompts.json that holds their classes.
# ActionCLIP's 16 action templates (its utils/Text_Prompt.py), one drawn per training clip.
ACTION_TEMPLATES = (
    "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
    "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
    "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
    "Can you recognize the action of {}?", "Video classification of {}", "A video of {}",
    "The man is {}", "The woman is {}")

TFDS_DATASETS = {"imagenet2012": "imagenet1k", "imagenet_v2": "imagenet1k",
                 "imagenet2012_real": "imagenet1k", "imagenet_sketch": "imagenet1k",
                 "cifar10": "cifar10", "cifar100": "cifar100", "food101": "food101",
                 "sun397": "sun397", "stl10": "stl10", "mnist": "mnist", "dtd": "dtd",
                 "eurosat": "eurosat", "oxford_iiit_pet": "oxford_pets",
                 "oxford_flowers102": "flowers102", "cars196": "stanford_cars",
                 "caltech101": "caltech101", "resisc45": "resisc45", "patch_camelyon": "pcam",
                 "voc": "voc2007", "ucf101": "ucf101"}
_WNID = re.compile(r"^n\d{8}$")


@functools.cache
def _table() -> dict:
    text = importlib.resources.files("clipjax.evals").joinpath("prompts.json").read_text("utf-8")
    return json.loads(text)


def datasets() -> list[str]:
    """Names of the datasets whose class names and templates ship with clipjax."""
    return sorted(_table())


def _entry(name: str) -> dict:
    if name not in _table():
        raise ValueError(f"No class names are known for dataset {name!r}; use one of "
                         f"{', '.join(datasets())}, or give a file with one class per line.")
    return _table()[name]


def classnames(name: str) -> list[ClassName]:
    """The class names of a shipped dataset, in its label order."""
    return list(_entry(name)["classes"])


def templates(name: str) -> list[str]:
    """The prompt templates of a shipped dataset; "{}" marks where the class name goes."""
    return list(_entry(name)["templates"])


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates."""
    return templates("imagenet1k")


def short_imagenet_templates() -> list[str]:
    """The 7 templates OpenAI's notebook selected from the 80 (nearly all of the gain)."""
    return list(_entry("imagenet1k")["short_templates"])


def _lines(path: Path) -> list:
    if path.suffix == ".json":
        data = json.loads(path.read_text("utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list; write [\"name\", ...].")
        return data
    return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]


def load_classnames(spec: str) -> list[ClassName]:
    """Class names from a shipped dataset's name or a file (.txt one per line, .json list)."""
    if spec in _table():
        return classnames(spec)
    path = Path(spec)
    if path.is_file():
        return _lines(path)
    raise ValueError(f"--classes {spec!r} is neither a file nor a known dataset; give a file "
                     f"with one class name per line or one of {', '.join(datasets())}.")


def load_templates(spec: str) -> list[str]:
    """Templates from "openai" (80), "short" (7), a shipped dataset's name, a file, or one
    literal template containing "{}"."""
    if spec == "openai":
        out = openai_imagenet_templates()
    elif spec == "short":
        out = short_imagenet_templates()
    elif spec in _table():
        out = templates(spec)
    elif Path(spec).is_file():
        out = _lines(Path(spec))
    elif "{}" in spec:
        out = [spec]
    else:
        raise ValueError(f"--templates {spec!r} is not openai, short, a known dataset, a file or "
                         "a template containing {}; e.g. --templates 'a photo of a {}.'.")
    if bad := [t for t in out if "{}" not in t]:
        raise ValueError(f"Template {bad[0]!r} has no {{}} for the class name; add one.")
    return out


def prompts_for(name: ClassName, templates_: Sequence[str]) -> list[str]:
    """Every prompt of one class: each template filled with each of its names."""
    names = [name] if isinstance(name, str) else list(name)
    return [t.format(n) for n in names for t in templates_]


def display_name(name: ClassName) -> str:
    return name if isinstance(name, str) else name[0]


def align(label_names: Sequence[str], names: Sequence[ClassName]) -> list[ClassName] | None:
    """`names` reordered to match `label_names` by spelling (case, "_", " " and "-" ignored;
    for tfds SUN397 paths only the part after the letter folder counts), or None when some
    label has no unique match."""
    def key(n: str) -> str:
        if n.startswith("/") and n[2:3] == "/":  # SUN397: "/a/apartment_building/outdoor"
            n = n[3:]
        return re.sub(r"[^a-z0-9]", "", n.lower())

    by_key: dict[str, list[ClassName]] = {}
    for n in names:
        by_key.setdefault(key(display_name(n)), []).append(n)
    out = []
    for label in label_names:
        match = by_key.get(key(label), [])
        if len(match) != 1:
            return None
        out.append(match[0])
    return out


def resolve_classnames(label_names: Sequence[str] | None, num_labels: int,
                       classes: str | None, dataset: str | None, source: str) -> list[ClassName]:
    """The class names for a labelled dataset, in its label order, or one clear error.

    `label_names` are the dataset's own names (folder names, tfds ClassLabel names);
    `classes` is the user's --classes; `dataset` the shipped list the source implies.
    """
    spec = classes or dataset
    if spec is None:
        if label_names is None:
            raise ValueError(f"{source} has no class names; pass --classes with a dataset name "
                             "or a file of class names in label order.")
        return [n.replace("_", " ") for n in label_names]
    names = load_classnames(spec)
    if len(names) != num_labels:
        raise ValueError(f"The class list {spec!r} has {len(names)} classes but {source} has "
                         f"{num_labels} labels; pass --classes with a list of exactly "
                         f"{num_labels} names in label order.")
    if label_names is None or all(_WNID.match(n) for n in label_names):
        return names  # ImageNet's label order is its sorted WordNet ids, the list's order
    if (aligned := align(label_names, names)) is not None:
        return aligned
    if classes is None:
        raise ValueError(f"The label names of {source} do not match the class list "
                         f"{dataset!r} by spelling, so their order cannot be checked; pass "
                         "--classes with the names in the dataset's label order.")
    return names  # the user vouched for the order
