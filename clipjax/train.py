"""Training: the CLIP task's two halves, the train state, the jitted step, and the loop.

    clipjax.train.train_and_evaluate(config, workdir)

The step is one pure `train_step(state, batch) -> (state, metrics)` over the global batch
(gradient caching in clipjax.gradcache). The loop feeds it, logs, evaluates with an
eval-mode copy of the model, checkpoints, stops at the same step on every host after
SIGTERM, never keeps a checkpoint whose parameters are not finite or whose loss turned out
not to be, and writes model.safetensors when the run is done.
"""

import functools
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from clipjax import checkpoint, evals, heads, losses, optim, runlog, sharding, weights
from clipjax.data import synthetic, transforms
from clipjax.gradcache import (Encode, LossOnEmbeddings, loss_and_grads,  # noqa: F401 (API)
                               loss_and_grads_with_aux)
from clipjax.models import clip

# Rank of each batch entry the CLIP task can use (rows first, split over data x fsdp).
BATCH_NDIM = {"image": 4, "text": 2, "label": 1}


def device_images(img_BHWC: jax.Array) -> jax.Array:
    """uint8 pixels (4x less to transfer and keep) -> float32 normalised with CLIP mean/std."""
    if img_BHWC.dtype != jnp.uint8:
        return img_BHWC
    mean_C = jnp.asarray(transforms.CLIP_MEAN, jnp.float32)
    std_C = jnp.asarray(transforms.CLIP_STD, jnp.float32)
    return (img_BHWC.astype(jnp.float32) / 255.0 - mean_C) / std_C


def clip_encode(model) -> Encode:
    """Normalised image and text embeddings of a CLIP batch {"image", "text"}.

    Images may be float32 (already normalised) or uint8 pixels, normalised here.
    """

    def encode(params, batch):
        img_BE = model.apply({"params": params}, device_images(batch["image"]), normalize=True,
                             method="encode_image")
        txt_BE = model.apply({"params": params}, batch["text"], normalize=True,
                             method="encode_text")
        return img_BE, txt_BE

    return encode


def clip_loss(name: str = "softmax", mesh: Mesh | None = None, **options) -> LossOnEmbeddings:
    """A loss from losses.LOSSES applied with the model's logit scale (and bias)."""
    loss_fn = losses.get_loss(name)

    def loss_on_embeddings(params, embeddings, batch):
        img_BE, txt_BE = embeddings
        scale = jnp.exp(params["logit_scale"])
        bias = params.get("logit_bias")
        extra = dict(options)
        if name in ("multi_positive", "kl_multi_positive"):
            extra["img_labels_B"] = batch["label"]
        return loss_fn(img_BE, txt_BE, scale, bias, mesh=mesh, **extra)

    return loss_on_embeddings


def batch_keys(loss: str) -> tuple[str, ...]:
    """The batch entries a CLIP step with `loss` reads: labels only for the multi-positive loss."""
    labelled = loss in ("multi_positive", "kl_multi_positive")
    return ("image", "text", "label") if labelled else ("image", "text")


# --- State and step -------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def state_shardings(model, optimizer, mesh: Mesh):
    """Shardings of every TrainState leaf, from the model's logical axes; allocates nothing."""
    params_sh = sharding.param_shardings(model, mesh)
    abstract = clip.abstract_params(model)
    return TrainState(step=sharding.replicated(mesh), params=params_sh,
                      opt_state=sharding.optimizer_shardings(optimizer, abstract, params_sh, mesh))


def create_train_state(model, optimizer, rng: jax.Array, mesh: Mesh) -> TrainState:
    """A fresh TrainState created directly in its shardings (FSDP), never whole on a device."""

    def init(key):
        params = flax.linen.meta.unbox(model.init(key, *clip.dummy_inputs(model))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))

    return sharding.init_sharded(init, rng, state_shardings(model, optimizer, mesh))


def fold_batch_stats(params, stats, momentum: float = 0.1):
    """Running BatchNorm averages updated from sown batch statistics (torch's momentum)."""
    if not stats:
        return params
    flat = dict(flax.traverse_util.flatten_dict(params))
    for path, value in flax.traverse_util.flatten_dict(stats).items():
        path = tuple(path)
        if isinstance(value, tuple):  # sow keeps a tuple of calls
            value = value[0]
        flat[path] = (1 - momentum) * flat[path] + momentum * value
    return flax.traverse_util.unflatten_dict(flat)


def make_train_step(model, optimizer, mesh: Mesh, shardings: TrainState, *,
                    loss: str = "softmax", loss_options: dict | None = None,
                    accum_steps: int = 1, batch_keys: tuple[str, ...] = ("image", "text"),
                    task=None, config=None):
    """The jitted `train_step(state, batch) -> (state, metrics)` with donated state.

    A ResNet `model` built with train=True normalises with batch statistics and folds them
    into the running averages; metrics["state_finite"] says whether the new parameters and
    the update that made them are all finite. A head's `task` (clipjax.heads) brings its
    own encode and loss (built from `config`); CLIP's are the default.
    """
    bn_train = model.config.vision.is_resnet and model.train
    if model.scan and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        model = model.clone(unroll=True)  # see layers.Transformer: an XLA:CPU deadlock
    if task is not None and task.name != "clip":
        encode, loss_fn, ndim = task.encode(model), task.loss(model, config, mesh), task.batch_ndim
        bn_train = task.batch_stats(model)
    else:
        loss_fn, ndim = clip_loss(loss, mesh, **(loss_options or {})), BATCH_NDIM
        encode = _clip_encode_with_stats(model, bn_train)

    def step(state: TrainState, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see layers.shard_rows
            return _step(state, batch)

    def _step(state: TrainState, batch):
        (value, metrics), grads, stats = loss_and_grads_with_aux(
            state.params, batch, encode, loss_fn, accum_steps, mesh, has_aux=bn_train)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates)
        params = fold_batch_stats(params, stats)
        # Checked before any checkpoint of this state is kept (an exact test, not a norm,
        # which overflows long before the parameters do).
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                    for x in jax.tree.leaves((updates, params))]))
        metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads),
                       logit_scale=jnp.exp(params["logit_scale"]), state_finite=finite)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = {k: sharding.batch_sharding(mesh, ndim[k]) for k in batch_keys}
    return jax.jit(step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def _clip_encode_with_stats(model, bn_train: bool):
    """CLIP's encode; a ResNet in training mode also returns its sown batch statistics."""

    def encode(params, batch):
        if not bn_train:
            return clip_encode(model)(params, batch)
        img_BE, stats = model.apply({"params": params}, device_images(batch["image"]),
                                    normalize=True,
                                    method="encode_image", mutable=["batch_stats"])
        txt_BE = model.apply({"params": params}, batch["text"], normalize=True,
                             method="encode_text")
        return (img_BE, txt_BE), stats["batch_stats"]

    return encode


# --- The loop -------------------------------------------------------------------------

PEAK_TFLOPS = {  # dense bf16 per chip, for the MFU estimate
    "TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
    "TPU v6 lite": 918, "TPU v6e": 918, "NVIDIA H100": 989, "NVIDIA H200": 989,
    "NVIDIA A100": 312,
}


@functools.cache
def peak_flops_per_device(dtype: str = "float32") -> float:
    """This device's peak FLOP/s: a table for accelerators; on a CPU, the best of 5 timed
    2048x2048 matmuls in `dtype` (float32 accumulation), measured once per process."""
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12
    n = 2048
    x = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), jax.local_devices()[0])
    mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    mm(x).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        mm(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    # Simulated devices share the host's cores: the host's peak is split between them.
    return 2 * n**3 / best / jax.local_device_count()


class Preemption:
    """SIGTERM (a preemption notice, a scheduler's kill) -> stop at a step all hosts agree on.

    One process: a signal handler sets a flag. Several: JAX's preemption service (started
    by jax.distributed.initialize, which catches SIGTERM itself) tells every process the
    same step, however far apart their loops are.
    """

    def __init__(self):
        self.requested = False
        self.multihost = jax.process_count() > 1
        self._previous = None
        if not self.multihost:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping.")
        self.requested = True

    def stop_at(self, step: int) -> bool:
        """Whether to save and stop after `step`; call it at every step on every process."""
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def build_models(config):
    """(model for the train step, model for evaluation): ResNet towers normalise with batch
    statistics in training and with their running averages everywhere else."""
    model = clip.create_model(config.model, dtype=jnp.dtype(config.dtype), scan=config.scan,
                              remat=config.remat, **config.model_overrides.to_dict())
    return (model.clone(train=True) if model.config.vision.is_resnet else model), model


def total_steps(config) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    epochs, examples = config.get("epochs", 0), config.data.num_examples
    if not epochs or not examples:
        raise ValueError("total_steps=0 needs epochs and data.num_examples (examples in one "
                         "epoch) to derive the step count; set them or set total_steps.")
    return int(epochs * examples // config.global_batch)


def build_data(config, start_state: dict | None):
    if config.data.source == "synthetic":
        it = synthetic.SyntheticIterator(
            config.global_batch, image_size=config.data.image_size,
            context_length=config.data.context_length, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
    elif not config.data.source:
        raise ValueError("data.source is empty; give one, e.g. "
                         "data.source='wds:/data/shards/{00000..00099}.tar'.")
    else:
        from clipjax.data import pipeline

        it = pipeline.make_iterator(
            config.data.source, global_batch_size=config.global_batch,
            image_size=config.data.image_size, train=True, seed=config.seed,
            context_length=config.data.context_length,
            num_workers=config.data.num_workers or None,
            image_dtype="uint8")  # a quarter of the bytes; normalised on the device
    if start_state:
        it.set_state(start_state)
    return it


def _check_batch(batch: dict, keys: tuple[str, ...], config) -> None:
    if missing := [k for k in keys if k not in batch]:
        raise ValueError(f"loss={config.loss} needs {', '.join(missing)} in every batch, but "
                         f"data.source={config.data.source!r} gives {', '.join(sorted(batch))}; "
                         "use a source with class labels and captions (the synthetic data, or "
                         "imagefolder:DIR?template=a photo of a {}.) or another loss.")


def _host_params(params) -> dict:
    """The whole parameter tree as NumPy on every process (sharded over several hosts too)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, params)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        params)


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns last metrics."""
    if "://" in str(workdir):
        raise ValueError(f"workdir {workdir}: URLs are not supported yet; mount the bucket "
                         "(e.g. gcsfuse) and give the mounted path.")
    workdir = Path(workdir)
    steps = total_steps(config)
    losses.get_loss(config.loss)
    task = heads.get_task(config)
    train_model, eval_model = task.build_models(config)
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_global_batch(config.global_batch, mesh)
    if config.global_batch % (config.accum_steps * sharding.batch_size(mesh)):
        raise ValueError(f"global_batch {config.global_batch} must be a multiple of accum_steps "
                         f"x batch shards = {config.accum_steps * sharding.batch_size(mesh)}.")
    evaluators = task.build_evaluators(config)  # a bad evaluation spec fails before training
    checkpoint.check_workdir(workdir, {"model": config.model, "model_overrides":
                                       config.model_overrides.to_dict(), "scan": bool(config.scan),
                                       **task.identity(config)})
    main = jax.process_index() == 0
    if main:
        runlog.write_config(workdir, config.to_json_best_effort(indent=2, sort_keys=True))

    optimizer = optim.create_optimizer(optimizer_config(config, task, steps),
                                       clip.abstract_params(train_model), arch=config.model)
    shardings = state_shardings(train_model, optimizer, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep)
    data_state = None
    resumed = ckpt.latest_step()
    if resumed is not None:
        abstract = jax.eval_shape(lambda: create_train_state(train_model, optimizer,
                                                             jax.random.key(0), mesh))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract, shardings)
        state, data_state = ckpt.restore(abstract)
    else:
        state = create_train_state(train_model, optimizer, jax.random.key(config.seed), mesh)
        loaded: set[str] = set()
        if config.init_checkpoint:
            state, loaded = weights.load_init(state, config, train_model)
        if task.name != "clip":  # a head's new modules start from CLIP's weights
            state = state.replace(params=jax.jit(
                functools.partial(task.derive, train_model, loaded=frozenset(loaded)),
                out_shardings=shardings.params)(state.params))
    start = int(state.step)
    data = task.build_data(config, data_state)
    keys = task.batch_keys(config)
    step_fn = make_train_step(train_model, optimizer, mesh, shardings, loss=config.loss,
                              loss_options={"tile": config.loss_tile} if config.loss in (
                                  "tiled", "sigmoid_ring") else {},
                              accum_steps=config.accum_steps, batch_keys=keys, task=task,
                              config=config)
    encoders = task.make_encoders(eval_model, mesh) if evaluators else None
    flops_per_example = clip.train_flops(train_model, config.global_batch) / config.global_batch
    peak = peak_flops_per_device(config.dtype) * jax.device_count()
    schedule = optim.lr_schedule(optimizer_config(config, task, steps))

    log = runlog.RunLog(workdir, start=start, steps=steps, main=main)
    if resumed is not None:
        log.say(f"Resumed from step {resumed} of {steps} in {workdir}.")
    preempt = Preemption()
    last: dict = {}
    unconfirmed = None  # a saved step whose own loss is not known yet
    stopped = finished = False
    t_window, step_window = time.perf_counter(), start
    try:
        for step in range(start + 1, steps + 1):
            batch = next(data)
            if step == start + 1:
                _check_batch(batch, keys, config)
            batch = sharding.shard_batch({k: batch[k] for k in keys}, mesh)
            state, metrics = step_fn(state, batch)
            stop = preempt.stop_at(step)
            log_now = step % config.log_every_steps == 0 or step == steps
            save_now = (config.checkpoint.every_steps and step % config.checkpoint.every_steps
                        == 0) or step == steps or stop
            eval_now = bool(evaluators) and ((config.eval.every_steps and step %
                                              config.eval.every_steps == 0) or step == steps)
            if step == start + 1:  # compilation is not throughput: time from the first step on
                jax.block_until_ready(metrics)
                log.first_step_seconds = time.perf_counter() - t_window
                t_window, step_window = time.perf_counter(), step
            if log_now or save_now or eval_now or unconfirmed is not None:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                good = metrics.pop("state_finite") == 1.0
                if not math.isfinite(metrics["loss"]) or not good:
                    _stop_on_nan(ckpt, unconfirmed, metrics["loss"], step)
                unconfirmed = None  # this step's loss was computed from the saved state
                now = time.perf_counter()
                rate = ((step - step_window) * config.global_batch / (now - t_window)
                        if step > step_window else 0.0)
                t_window, step_window = now, step
                metrics.update(step=step, samples_per_second=rate, lr=float(schedule(step - 1)))
                if rate:
                    metrics["mfu"] = flops_per_example * rate / peak
                if hasattr(data, "stats"):
                    metrics.update({f"data/{k}": v for k, v in data.stats().items()})
                if eval_now:
                    t_eval = time.perf_counter()
                    metrics.update(evals.run_all(evaluators, encoders, state.params))
                    log.evaluated(step, metrics, time.perf_counter() - t_eval)
                    t_window = time.perf_counter()  # evaluation is not training throughput
                if log_now or eval_now or save_now:
                    log.write(step, metrics)
                last = metrics
            log.advance()
            if save_now:
                ckpt.save(step, state, data.get_state())
                unconfirmed = step
            if stop:
                stopped = True
                logging.warning("stopped at step %d after SIGTERM; rerun to resume.", step)
                break
        else:
            finished = True
    finally:
        ckpt.close()
        preempt.restore()
        log.close()
    if finished and (start < steps or not (workdir / weights.FINAL_FILE).exists()):
        final = weights.from_params(_host_params(state.params), config,
                                    source=f"{workdir} step {steps}")
        if main:
            weights.write(final, workdir / weights.FINAL_FILE)
    if hasattr(data, "stats") and data.stats():
        logging.warning("skipped samples: %s", data.stats())
    if main and start == steps:
        print(f"Nothing to do: the run in {workdir} already finished step {steps}; "
              "raise total_steps to train further.", flush=True)
    elif main:
        command = task.next_command(config, str(workdir))
        print(log.summary(step=int(state.step), stopped=stopped, last=last,
                          files=runlog.listing(workdir, weights.saved_steps(workdir)),
                          next_command=command), flush=True)
    return last


def optimizer_config(config, task, steps: int) -> dict:
    """config.optimizer with the run's length and the task's frozen parameters added."""
    c = dict(config.optimizer, total_steps=steps)
    if task.frozen:
        c["freeze"] = tuple(c.get("freeze") or ()) + tuple(
            p for p in task.frozen if p not in (c.get("freeze") or ()))
    return c


def _stop_on_nan(ckpt: checkpoint.Checkpointer, unconfirmed: int | None, loss: float,
                 step: int) -> None:
    """Drops a checkpoint whose loss came out non-finite, then stops the run."""
    if unconfirmed is not None:
        # The state saved at `unconfirmed` produced this step's loss: it is not good.
        ckpt.delete(unconfirmed)
    good = ckpt.latest_step()
    kept = (f"The last good checkpoint (step {good}) is intact" if good is not None
            else "No checkpoint was good enough to keep")
    raise FloatingPointError(
        f"loss is {loss} (or the update made non-finite parameters) at step {step}; stopping. "
        f"{kept}: lower optimizer.lr or raise warmup, then rerun to resume from it.")


def build_evaluators(config):
    """Evaluation during training, from config.eval.zeroshot (any labelled source spec)."""
    return evals.config_evaluators(config.eval.zeroshot, num_examples=config.eval.num_examples,
                                   seed=config.seed)


def _clip_next_command(config, workdir: str) -> str:
    if config.data.source == "synthetic":
        return f"clipjax eval zeroshot --checkpoint {workdir} --dataset synthetic"
    return f"clipjax export {workdir} {Path(workdir).name}.safetensors"


# Looked up when called, so a test (or a user) that replaces one of these functions in its
# module replaces it for the task too.
CLIP_TASK = heads.Task(
    name="clip", batch_ndim=BATCH_NDIM,
    build_models=lambda config: build_models(config),
    encode=lambda model: clip_encode(model),
    loss=lambda model, config, mesh: clip_loss(config.loss, mesh),
    batch_keys=lambda config: batch_keys(config.loss),
    build_data=lambda config, state: build_data(config, state),
    build_evaluators=lambda config: build_evaluators(config),
    make_encoders=lambda model, mesh: evals.make_encoders(model, mesh),
    derive=lambda model, params, loaded: params, identity=lambda config: {},
    next_command=lambda config, workdir: _clip_next_command(config, workdir))
