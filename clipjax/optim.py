"""The optimizer: AdamW with warmup + cosine, a weight-decay mask, global-norm clipping,
freezing and learning-rate multipliers by parameter-path regex, and the logit-scale clamp.

Parameters are addressed by their path in the params tree, written with slashes:
"visual/transformer/resblocks_0/attn/in_proj_kernel", "text/token_embedding",
"logit_scale". `freeze` and `lr_multipliers` patterns are matched with `re.search`, so
anchor them: LiT (a locked image tower) is `freeze=["^visual/"]`.

    opt = create_optimizer(config.optim, clipjax.abstract_params(model), arch="ViT-B-32")
    updates, opt_state = opt.update(grads, opt_state, params)
    params = apply_updates(params, updates)  # optax.apply_updates + the logit-scale clamp

Frozen parameters and BatchNorm statistics get zero updates and hold no optimizer state:
the Adam moments have an `optax.MaskedNode` in their place, so a tree map over the state
beside a parameter-shaped tree needs `is_leaf=lambda x: isinstance(x, optax.MaskedNode)`.
"""

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Every config field and its default. The numbers are CLIP's and OpenCLIP's: peak lr 5e-4,
# weight decay 0.2, 10k warmup steps. b1, b2 and eps left at None follow the architecture
# (defaults_for); grad_clip_norm None or 0 turns clipping off.
DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "warmup_steps": 10_000,
    "warmup_fraction": 0.0,  # > 0: warmup_steps = this fraction of total_steps (CLIP4Clip's 0.1)
    "total_steps": None,  # required
    "end_lr_ratio": 0.0,  # the cosine ends at lr * end_lr_ratio
    "weight_decay": 0.2,
    "b1": None,
    "b2": None,
    "eps": None,
    "grad_clip_norm": 1.0,
    "freeze": (),  # regexes; matching parameters get no update and no optimizer state
    "lr_multipliers": (),  # {regex: multiplier} or [(regex, multiplier), ...]; first match wins
    "name": "adamw",  # adamw | sgd (momentum, torch's coupled weight decay: LSeg)
    "momentum": 0.9,  # sgd only
    "schedule": "cosine",  # cosine | poly (lr * (1 - step / total_steps) ** power: LSeg) | steps
    "power": 0.9,  # poly only
    # steps only (GLIP's WarmupMultiStepLR): lr times gamma at each of these fractions of
    # total_steps, e.g. (0.67, 0.89).
    "steps_at": (),
    "gamma": 0.1,
}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "steps")

# (b1, b2, eps): OpenCLIP's recommendation for ViTs; ResNets keep Adam's usual values.
VIT_ADAM = (0.9, 0.98, 1e-6)
RESNET_ADAM = (0.9, 0.999, 1e-8)


def defaults_for(arch: str) -> tuple[float, float, float]:
    """(b1, b2, eps) that CLIP and OpenCLIP use for `arch` ("RN50", "ViT-B-32", ...)."""
    return RESNET_ADAM if arch.startswith("RN") else VIT_ADAM


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def param_paths(params):
    """A tree like `params` whose leaves are their paths, "visual/proj", "logit_scale", ..."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_str(path), params)


def _leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _is_bn_statistic(path: str) -> bool:
    # Only BatchNorm has leaves named mean/var (as in clip.count_params).
    return _leaf_name(path) in ("mean", "var")


def _decays(path: str, ndim: int) -> bool:
    # OpenCLIP excludes ndim < 2 and names containing "bn", "ln", "bias" or "logit_scale".
    # Here norm gains are `scale` leaves (LayerNorm and BatchNorm alike), `in_proj_bias` is
    # 3-D and scanned stacks add a layer axis, so names decide; the issue also excludes the
    # embeddings (token, positional, class, AttentionPool's positional), which OpenCLIP
    # decays when they are 2-D. Conv kernels are 4-D matrices and do decay.
    name = _leaf_name(path)
    return (ndim >= 2 and not name.endswith(("bias", "embedding"))
            and name not in ("scale", "mean", "var", "logit_scale"))


def weight_decay_mask(params):
    """True for the leaves that get weight decay: weight matrices and conv kernels only."""
    return jax.tree.map(lambda path, x: _decays(path, len(x.shape)), param_paths(params), params)


def _compile(kind: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{kind} pattern {pattern!r} is not a valid regular expression "
                         f"({e}); paths look like 'visual/transformer/resblocks_0/attn/"
                         "in_proj_kernel'.") from None


def _check_matches(kind: str, pattern: re.Pattern, paths: list[str]) -> None:
    if not any(pattern.search(p) for p in paths):
        sample = paths[::max(1, len(paths) // 6)][:6]
        raise ValueError(f"{kind} pattern {pattern.pattern!r} matches no parameter; paths "
                         f"look like {', '.join(map(repr, sample))} (matched with re.search).")


def trainable_mask(params, freeze=()):
    """True for the leaves the optimizer updates: not frozen and not BatchNorm statistics."""
    paths = param_paths(params)
    flat = jax.tree.leaves(paths)
    patterns = [_compile("freeze", p) for p in freeze]
    for pattern in patterns:
        _check_matches("freeze", pattern, flat)
    return jax.tree.map(
        lambda p: not _is_bn_statistic(p) and not any(r.search(p) for r in patterns), paths)


def _multiplier_rules(value) -> tuple[list[tuple[re.Pattern, float]], bool]:
    """(compiled rules, whether their order is the user's)."""
    # A ConfigDict hands its keys back sorted, so overlapping keys have no defined order.
    ordered = not isinstance(value, ml_collections.ConfigDict)
    pairs = list(value.items()) if hasattr(value, "items") else [tuple(p) for p in value]
    rules = []
    for pattern, multiplier in pairs:
        if not isinstance(multiplier, numbers.Real) or multiplier < 0:
            raise ValueError(f"lr_multipliers[{pattern!r}] = {multiplier!r}; give a number >= 0.")
        rules.append((_compile("lr_multipliers", pattern), float(multiplier)))
    return rules, ordered


def lr_multiplier_tree(params, lr_multipliers=()):
    """Each leaf's learning-rate multiplier: the first matching pattern's value, else 1."""
    rules, ordered = _multiplier_rules(lr_multipliers)
    paths = param_paths(params)
    for pattern, _ in rules:
        _check_matches("lr_multipliers", pattern, jax.tree.leaves(paths))

    def multiplier(path: str) -> float:
        hits = [(r.pattern, m) for r, m in rules if r.search(path)]
        if not ordered and len({m for _, m in hits}) > 1:
            raise ValueError(f"lr_multipliers patterns {hits[0][0]!r} and {hits[1][0]!r} both "
                             f"match {path!r} with different values, and a ConfigDict does not "
                             "keep key order; give lr_multipliers as a list of (pattern, "
                             "multiplier) pairs, where the first match wins.")
        return hits[0][1] if hits else 1.0

    return jax.tree.map(multiplier, paths)


def resolve_config(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """The optimizer config as a plain dict with defaults filled in and values checked."""
    given = dict(config.items())
    if unknown := sorted(set(given) - set(DEFAULTS)):
        raise ValueError(f"Unknown optimizer config field(s) {', '.join(unknown)}; the fields "
                         f"are {', '.join(DEFAULTS)}.")
    c = {**DEFAULTS, **given}
    c["freeze"] = c["freeze"] or ()
    c["lr_multipliers"] = c["lr_multipliers"] or ()
    if c["total_steps"] is None:
        raise ValueError("The optimizer config needs total_steps (the length of the cosine "
                         "schedule, warmup included).")
    if c["warmup_fraction"]:
        if not 0 < c["warmup_fraction"] < 1:
            raise ValueError(f"warmup_fraction={c['warmup_fraction']} must be in (0, 1); it is "
                             "the share of total_steps spent warming up.")
        c["warmup_steps"] = int(round(c["warmup_fraction"] * c["total_steps"]))
    if not 0 <= c["warmup_steps"] < c["total_steps"]:
        raise ValueError(f"warmup_steps={c['warmup_steps']} must be >= 0 and below "
                         f"total_steps={c['total_steps']}; lower warmup_steps.")
    if isinstance(c["freeze"], str):
        raise ValueError(f"freeze={c['freeze']!r} is a string; give a list of patterns, "
                         f"e.g. [{c['freeze']!r}].")
    if c["name"] not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={c['name']!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={c['schedule']!r}; choose one of "
                         f"{', '.join(SCHEDULES)}.")
    c["steps_at"] = tuple(float(f) for f in (c["steps_at"] or ()))
    if c["schedule"] == "steps" and not all(0 < f < 1 for f in c["steps_at"]):
        raise ValueError(f"optimizer.steps_at={c['steps_at']}: give fractions of total_steps "
                         "in (0, 1), e.g. (0.67, 0.89).")
    return c


def lr_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then a cosine to `lr * end_lr_ratio` at `total_steps`
    (or, with schedule="poly", PyTorch-Encoding's lr * (1 - step / total) ** power; with
    schedule="steps", lr * gamma ** (boundaries passed), boundaries at steps_at x total)."""
    c = resolve_config(config)
    if c["schedule"] == "steps":
        warm, lr = c["warmup_steps"], c["lr"]
        bounds = jnp.asarray([int(f * c["total_steps"]) for f in c["steps_at"]], jnp.float32)

        def steps(step):
            step = jnp.asarray(step, jnp.float32)
            decay = lr * jnp.power(c["gamma"], jnp.sum(step >= bounds))
            return jnp.where(step < warm, lr * step / max(warm, 1), decay)

        return steps
    if c["schedule"] == "poly":
        total, warm, power, lr = c["total_steps"], c["warmup_steps"], c["power"], c["lr"]

        def poly(step):
            step = jnp.asarray(step, jnp.float32)
            decay = lr * jnp.power(jnp.maximum(1.0 - step / total, 0.0), power)
            return jnp.where(step < warm, lr * step / max(warm, 1), decay)

        return poly
    # Step 0 has lr 0 (big_vision's convention); OpenCLIP's warmup runs one step ahead.
    return optax.warmup_cosine_decay_schedule(0.0, c["lr"], c["warmup_steps"], c["total_steps"],
                                              c["lr"] * c["end_lr_ratio"])


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by its leaf of `multipliers`.

    After AdamW this scales the weight decay too, as a torch param group's lr would.
    """
    return optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(jnp.multiply, updates, multipliers),
                                             state))


def create_optimizer(config, params, arch: str | None = None) -> optax.GradientTransformation:
    """The CLIP optimizer for `params` (real or abstract) from an optimizer config.

    `arch` picks the Adam defaults when b1, b2 or eps is None; without it a tree with a
    ResNet image tower (`visual/attnpool`) gets ResNet's and any other ViT's.
    """
    c = resolve_config(config)
    if arch is None:
        visual = params.get("visual", {}) if isinstance(params, Mapping) else {}
        arch = "RN" if "attnpool" in visual else "ViT"
    b1, b2, eps = (d if c[k] is None else c[k] for k, d in zip(("b1", "b2", "eps"),
                                                               defaults_for(arch)))
    labels = jax.tree.map(lambda keep: "trainable" if keep else "frozen",
                          trainable_mask(params, c["freeze"]))
    clip = c["grad_clip_norm"]
    if c["name"] == "sgd":  # torch's SGD: the decay joins the gradient before the momentum
        adamw = optax.chain(optax.add_decayed_weights(c["weight_decay"], weight_decay_mask(params)),
                            optax.sgd(lr_schedule(c), momentum=c["momentum"] or None))
    else:
        adamw = optax.adamw(lr_schedule(c), b1, b2, eps, weight_decay=c["weight_decay"],
                            mask=weight_decay_mask(params))
    return optax.chain(
        # Clipping inside the partition sees only the trainable gradients, and frozen
        # leaves get no Adam moments (a MaskedNode in their place).
        optax.partition({
            "trainable": optax.chain(
                optax.clip_by_global_norm(clip) if clip else optax.identity(), adamw),
            "frozen": optax.set_to_zero()}, labels),
        _scale_by_tree(lr_multiplier_tree(params, c["lr_multipliers"])),
    )


def clamp_logit_scale(params, max_value: float = math.log(100), min_value: float = 0.0):
    """`params` with every `logit_scale` leaf clipped to [min_value, max_value], as OpenCLIP."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.clip(x, min_value, max_value)
        if _leaf_name(_path_str(path)) == "logit_scale" else x, params)


def apply_updates(params, updates):
    """optax.apply_updates followed by the logit-scale clamp; use after every step."""
    return clamp_logit_scale(optax.apply_updates(params, updates))
