"""Architectures by name, as OpenCLIP names them, decoded from one table."""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    layers: int | tuple[int, int, int, int]  # an int for a ViT, four stage depths for a ResNet
    width: int
    patch_size: int | None = None  # None selects the ModifiedResNet
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return self.patch_size is None

    @property
    def heads(self) -> int:
        # A ResNet's attention pool runs over 32 * width channels.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: str = "gelu"  # "quick_gelu" for OpenAI's released weights
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for the sigmoid (SigLIP) loss


_V, _T = VisionConfig, TextConfig
VARIANTS: dict[str, ClipConfig] = {
    "RN50": ClipConfig(1024, _V(224, (3, 4, 6, 3), 64), _T(512, 8, 12)),
    "RN101": ClipConfig(512, _V(224, (3, 4, 23, 3), 64), _T(512, 8, 12)),
    "RN50x4": ClipConfig(640, _V(288, (4, 6, 10, 6), 80), _T(640, 10, 12)),
    "RN50x16": ClipConfig(768, _V(384, (6, 8, 18, 8), 96), _T(768, 12, 12)),
    "RN50x64": ClipConfig(1024, _V(448, (3, 15, 36, 10), 128), _T(1024, 16, 12)),
    "ViT-B-32": ClipConfig(512, _V(224, 12, 768, 32), _T(512, 8, 12)),
    "ViT-B-16": ClipConfig(512, _V(224, 12, 768, 16), _T(512, 8, 12)),
    "ViT-L-14": ClipConfig(768, _V(224, 24, 1024, 14), _T(768, 12, 12)),
    "ViT-L-16": ClipConfig(768, _V(224, 24, 1024, 16), _T(768, 12, 12)),  # OpenCLIP's; LSeg's L/16
    "ViT-L-14-336": ClipConfig(768, _V(336, 24, 1024, 14), _T(768, 12, 12)),
    "ViT-H-14": ClipConfig(1024, _V(224, 32, 1280, 14, head_width=80), _T(1024, 16, 24)),
    "ViT-g-14": ClipConfig(1024, _V(224, 40, 1408, 14, head_width=88, mlp_ratio=4.3637),
                           _T(1024, 16, 24)),
    "ViT-bigG-14": ClipConfig(1280, _V(224, 48, 1664, 14, head_width=104, mlp_ratio=4.9231),
                              _T(1280, 20, 32)),
    # Tiny sizes for tests and the CPU default run.
    "ViT-tiny": ClipConfig(32, _V(32, 2, 64, 8, head_width=16), _T(32, 2, 2, context_length=16)),
    "RN-tiny": ClipConfig(32, _V(64, (1, 1, 1, 1), 16, head_width=32), _T(32, 2, 2,
                                                                         context_length=16)),
}
QUICKGELU_SUFFIX = "-quickgelu"


def names() -> list[str]:
    return list(VARIANTS) + [n + QUICKGELU_SUFFIX for n in VARIANTS]


def get_config(name: str) -> ClipConfig:
    """The config for `name`; a "-quickgelu" suffix selects QuickGELU."""
    base = name.removesuffix(QUICKGELU_SUFFIX)
    if base not in VARIANTS:
        raise ValueError(f"Unknown architecture {name!r}; choose one of {', '.join(VARIANTS)} "
                         f"(each also with the suffix {QUICKGELU_SUFFIX}).")
    config = VARIANTS[base]
    if name.endswith(QUICKGELU_SUFFIX):
        config = dataclasses.replace(config, activation="quick_gelu")
    return config


_SUB = {"vision": VisionConfig, "text": TextConfig}


def field_names() -> list[str]:
    """Every settable field, nested ones dotted: embed_dim, vision.width, text.layers, ..."""
    out = []
    for f in dataclasses.fields(ClipConfig):
        if f.name in _SUB:
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(_SUB[f.name])]
        else:
            out.append(f.name)
    return out


def with_overrides(config: ClipConfig, overrides) -> ClipConfig:
    """`config` with fields replaced, given nested ({"vision": {"width": 128}}) or dotted
    ({"vision.width": 128}); an unknown field is one error listing the valid ones."""
    flat = flat_fields({k: dict(v) if hasattr(v, "items") else v for k, v in dict(overrides).items()})
    valid = field_names()
    if unknown := sorted(set(flat) - set(valid)):
        raise ValueError(f"Unknown model option {unknown[0]!r}; the architecture's fields are "
                         f"{', '.join(valid)}.")
    changes: dict = {}
    for key, value in flat.items():
        value = tuple(value) if isinstance(value, list) else value
        head, _, field = key.partition(".")
        if field:
            changes[head] = dataclasses.replace(changes.get(head, getattr(config, head)),
                                                **{field: value})
        else:
            changes[head] = value
    return dataclasses.replace(config, **changes)


def to_dict(config: ClipConfig) -> dict:
    """A JSON-ready dict of every field (what parameter files record)."""
    return dataclasses.asdict(config)


def from_dict(d: dict) -> ClipConfig:
    """The inverse of to_dict."""
    vision = dict(d["vision"])
    if isinstance(vision["layers"], list):
        vision["layers"] = tuple(vision["layers"])
    return ClipConfig(**{**d, "vision": VisionConfig(**vision), "text": TextConfig(**d["text"])})


def describe(name: str, config: ClipConfig) -> str:
    """`name`, with the fields where `config` differs from the named architecture."""
    known = name.removesuffix(QUICKGELU_SUFFIX) in VARIANTS
    base = flat_fields(to_dict(get_config(name))) if known else {}
    diff = [f"{k}={v}" for k, v in flat_fields(to_dict(config)).items()
            if base.get(k, object()) != v]
    return f"{name} ({', '.join(diff)})" if base and diff else name


def flat_fields(d: dict, prefix: str = "") -> dict:
    """{"vision": {"width": 64}} -> {"vision.width": 64}: the dotted names overrides use."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
