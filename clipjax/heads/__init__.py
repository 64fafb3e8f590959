"""Tasks: what `clipjax train` trains, picked by `config.task`.

A task brings what differs from CLIP pre-training; the loop (sharding, gradient caching,
the optimizer, checkpoints, preemption, logging, evaluation hooks) stays the same:

    task = clipjax.heads.get_task(config)
    train_model, eval_model = task.build_models(config)
    encode = task.encode(train_model)              # (params, batch) -> embeddings
    loss_on_embeddings = task.loss(train_model, config, mesh)
    data = task.build_data(config, state_or_None)  # resumable host-local batches
    evaluators = task.build_evaluators(config)     # evaluator(encoders, params) -> metrics
    encoders = task.make_encoders(eval_model, mesh)
    params = task.derive(model, params, loaded)    # new modules started from CLIP's weights

`encode` and `loss_on_embeddings` are the two halves clipjax.gradcache takes, so a head's
contrastive loss sees the whole global batch and gradient caching stays exact.
"""

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

TASKS = ("clip", "clip4clip", "actionclip", "lseg", "groupvit", "glip")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    batch_ndim: dict[str, int]  # rank of every batch entry (rows first)
    build_models: Callable[[Any], tuple[Any, Any]]
    encode: Callable[[Any], Callable]
    loss: Callable[[Any, Any, Any], Callable]
    batch_keys: Callable[[Any], tuple[str, ...]]
    build_data: Callable[[Any, dict | None], Any]
    build_evaluators: Callable[[Any], dict]
    make_encoders: Callable[[Any, Any], Any]
    derive: Callable[[Any, Any, set], Any]
    identity: Callable[[Any], dict]  # recorded in a workdir; a resume must match it
    next_command: Callable[[Any, str], str]  # printed after a finished run
    frozen: tuple[str, ...] = ()  # parameter regexes the optimizer never updates (LSeg's text)
    # (model) -> whether encode also returns BatchNorm batch statistics to fold in
    batch_stats: Callable[[Any], bool] = lambda model: False


def get_task(config_or_name) -> Task:
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.get(
        "task", "clip")
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a task; choose one of {', '.join(TASKS)}.")
    if name == "clip":
        from clipjax import train

        return train.CLIP_TASK
    if name in ("lseg", "groupvit"):
        from clipjax.heads import dense

        return dense.task(importlib.import_module(f"clipjax.heads.{name}"), name)
    if name == "glip":
        from clipjax.heads import detection, glip

        return detection.task(glip, name)
    from clipjax.heads import video

    return video.task(importlib.import_module(f"clipjax.heads.{name}"), name)
