"""Loss and gradients of a contrastive model, with exact gradient caching for huge batches.

A model enters training as two functions:
  encode(params, batch) -> embeddings (any pytree of [B, ...] arrays, e.g. (img_BE, txt_BE))
  loss_on_embeddings(params, embeddings, batch) -> (loss, metrics)
The loss sees the embeddings of the whole global batch, so contrastive losses stay exact.
"""

import json
import logging
import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import checkpoint, evals, losses, optim, sharding, summary
from clipjax.data import synthetic, transforms
from clipjax.models import clip

Encode = Callable[[Any, dict], Any]
LossOnEmbeddings = Callable[[Any, Any, dict], tuple[jax.Array, dict]]


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
        if name == "multi_positive":
            extra["img_labels_B"] = batch["label"]
        return loss_fn(img_BE, txt_BE, scale, bias, mesh=mesh, **extra)

    return loss_on_embeddings


def _split(x, k: int, mesh: Mesh | None):
    """[B, ...] -> [k, B/k, ...], micro-batch m = rows m, m+k, m+2k, ...

    Strided rather than contiguous so that every micro-batch has rows on every device.
    """
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
        spec = P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x


def _merge(x):
    """Inverse of _split."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def loss_and_grads(params, batch: dict, encode: Encode, loss_on_embeddings: LossOnEmbeddings,
                   accum_steps: int = 1, mesh: Mesh | None = None):
    """((loss, metrics), grads) of the loss over the whole global batch.

    With accum_steps = k > 1 (gradient caching): embed the k micro-batches without keeping
    activations, differentiate the loss once w.r.t. all embeddings, then re-run each
    micro-batch under its VJP with its slice of that gradient. The result is the exact
    full-batch gradient, with one micro-batch of activations alive at a time and the loss
    computed once (not k times).
    """
    out, grads, _ = loss_and_grads_with_aux(params, batch, encode, loss_on_embeddings,
                                            accum_steps, mesh)
    return out, grads


def loss_and_grads_with_aux(params, batch, encode, loss_on_embeddings, accum_steps=1,
                            mesh=None, has_aux: bool = False):
    """`loss_and_grads` for an `encode` that may also return (embeddings, aux).

    aux (e.g. BatchNorm batch statistics) is averaged over micro-batches. A tower that
    couples rows (BatchNorm in training mode) sees micro-batch statistics, so its
    gradient is exact per micro-batch, not for the full batch.
    """
    enc = encode if has_aux else (lambda p, b: (encode(p, b), {}))

    if accum_steps == 1:
        def full_loss(p):
            embeddings, aux = enc(p, batch)
            (value, metrics) = loss_on_embeddings(p, embeddings, batch)
            return value, (metrics, aux)

        (value, (metrics, aux)), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
        return (value, metrics), grads, aux

    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % accum_steps:
        raise ValueError(f"global batch {rows} does not split into accum_steps={accum_steps} "
                         "equal micro-batches; make the batch a multiple of accum_steps.")
    if mesh is not None and (rows // accum_steps) % sharding.batch_size(mesh):
        raise ValueError(f"micro-batches of {rows // accum_steps} rows do not divide over the "
                         f"{sharding.batch_size(mesh)} batch shards of the mesh; make the global "
                         f"batch a multiple of accum_steps x {sharding.batch_size(mesh)}.")
    micro = jax.tree.map(lambda x: _split(x, accum_steps, mesh), batch)

    frozen = jax.lax.stop_gradient(params)
    emb_micro, aux = jax.lax.map(lambda mb: enc(frozen, mb), micro)
    aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
    embeddings = jax.tree.map(_merge, emb_micro)
    (value, metrics), (grads, emb_grads) = jax.value_and_grad(
        loss_on_embeddings, argnums=(0, 1), has_aux=True)(params, embeddings, batch)
    emb_grads = jax.tree.map(lambda g: _split(g, accum_steps, mesh), emb_grads)

    def accumulate(grads, xs):
        mb, g_emb = xs
        _, vjp = jax.vjp(lambda p: enc(p, mb)[0], params)
        return jax.tree.map(jnp.add, grads, vjp(g_emb)[0]), None

    grads, _ = jax.lax.scan(accumulate, grads, (micro, emb_grads))
    return (value, metrics), grads, aux


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
                    accum_steps: int = 1, batch_keys: tuple[str, ...] = ("image", "text")):
    """The jitted `train_step(state, batch) -> (state, metrics)` with donated state."""
    bn_train = model.config.vision.is_resnet and model.train
    loss_fn = clip_loss(loss, mesh, **(loss_options or {}))

    def encode(params, batch):
        if not bn_train:
            return clip_encode(model)(params, batch)
        img_BE, stats = model.apply({"params": params}, device_images(batch["image"]),
                                    normalize=True,
                                    method="encode_image", mutable=["batch_stats"])
        txt_BE = model.apply({"params": params}, batch["text"], normalize=True,
                             method="encode_text")
        return (img_BE, txt_BE), stats["batch_stats"]

    def step(state: TrainState, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see layers.shard_rows
            return _step(state, batch)

    def _step(state: TrainState, batch):
        (value, metrics), grads, stats = loss_and_grads_with_aux(
            state.params, batch, encode, loss_fn, accum_steps, mesh, has_aux=bn_train)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates)
        params = fold_batch_stats(params, stats)
        metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads),
                       logit_scale=jnp.exp(params["logit_scale"]))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = {k: sharding.batch_sharding(mesh, 2 if k != "image" else 4) for k in batch_keys}
    return jax.jit(step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


# --- The loop -------------------------------------------------------------------------

PEAK_TFLOPS = {  # dense bf16 per chip, for the MFU estimate
    "TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
    "TPU v6 lite": 918, "TPU v6e": 918, "NVIDIA H100": 989, "NVIDIA H200": 989,
    "NVIDIA A100": 312,
}


def peak_flops_per_device() -> float:
    """This device's peak FLOP/s: a table for accelerators, a timed matmul on CPU."""
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12
    x = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        y = mm(x)
    y.block_until_ready()
    return 10 * 2 * 1024**3 / (time.perf_counter() - t) / jax.local_device_count()


class Preemption:
    """Turns SIGTERM (preemption notices, scheduler kills) into a flag the loop checks."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping.")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def build_model(config):
    model = clip.create_model(config.model, dtype=jnp.dtype(config.dtype), scan=config.scan,
                              remat=config.remat, **dict(config.model_overrides))
    if model.config.vision.is_resnet:
        model = model.clone(train=True)  # BatchNorm normalises with batch statistics
    return model


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


def build_evaluators(config):
    if config.eval.zeroshot == "synthetic":
        return evals.synthetic_evaluators(config.eval.num_examples, seed=config.seed)
    if not config.eval.zeroshot:
        return {}
    from clipjax.evals import data as eval_data, zeroshot

    source = eval_data.labelled(config.eval.zeroshot)
    return {"zeroshot": zeroshot.evaluator(eval_data.batch_fn(source), source.classnames,
                                           zeroshot.default_templates(source))}


def _jsonl_upto(path: Path, step: int) -> None:
    """Drops logged steps after `step`, so a resumed run's log continues without repeats."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns last metrics."""
    if "://" in str(workdir):
        raise ValueError(f"workdir {workdir}: URLs are not supported yet; mount the bucket "
                         "(e.g. gcsfuse) and give the mounted path.")
    workdir = Path(workdir)
    steps = total_steps(config)
    losses.get_loss(config.loss)
    model = build_model(config)
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_global_batch(config.global_batch, mesh)
    if config.global_batch % (config.accum_steps * sharding.batch_size(mesh)):
        raise ValueError(f"global_batch {config.global_batch} must be a multiple of accum_steps "
                         f"x batch shards = {config.accum_steps * sharding.batch_size(mesh)}.")
    checkpoint.check_workdir(workdir, {"model": config.model, "model_overrides": dict(
        config.model_overrides), "scan": bool(config.scan)})

    optimizer = optim.create_optimizer(dict(config.optimizer, total_steps=steps),
                                       clip.abstract_params(model), arch=config.model)
    shardings = state_shardings(model, optimizer, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep)
    data_state = None
    if ckpt.latest_step() is not None:
        abstract = jax.eval_shape(lambda: create_train_state(model, optimizer,
                                                             jax.random.key(0), mesh))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract, shardings)
        state, data_state = ckpt.restore(abstract)
        logging.info("resumed from step %d", int(state.step))
    else:
        state = create_train_state(model, optimizer, jax.random.key(config.seed), mesh)
        if config.init_checkpoint:
            state = _load_init(state, config, model)
    start = int(state.step)
    data = build_data(config, data_state)
    step_fn = make_train_step(model, optimizer, mesh, shardings, loss=config.loss,
                              loss_options={"tile": config.loss_tile} if config.loss in (
                                  "tiled", "sigmoid_ring") else {},
                              accum_steps=config.accum_steps)
    evaluators = build_evaluators(config)
    encoders = evals.make_encoders(model, mesh) if evaluators else None

    log_path = workdir / "metrics.jsonl"
    is_main = jax.process_index() == 0
    if is_main:
        _jsonl_upto(log_path, start)
    writer = summary.Writer(workdir / "tensorboard") if is_main else None
    peak = peak_flops_per_device() * jax.device_count()
    flops_per_step = clip.train_flops(model, config.global_batch)
    preempt = Preemption()
    progress = tqdm.tqdm(total=steps, initial=start, disable=not is_main, dynamic_ncols=True)
    last: dict = {}
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start + 1, steps + 1):
            batch = next(data)
            batch = sharding.shard_batch({k: batch[k] for k in ("image", "text")}, mesh)
            state, metrics = step_fn(state, batch)
            stop = preempt.requested  # read once: a signal arriving later waits a step
            log_now = step % config.log_every_steps == 0 or step == steps
            save_now = (config.checkpoint.every_steps and step % config.checkpoint.every_steps
                        == 0) or step == steps or stop
            eval_now = evaluators and ((config.eval.every_steps and step %
                                        config.eval.every_steps == 0) or step == steps)
            if log_now or save_now or eval_now:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(
                        f"loss is {metrics['loss']} at step {step}; stopping without saving. "
                        f"The last good checkpoint (step {ckpt.latest_step()}) is intact: lower "
                        "optimizer.lr or raise warmup, then rerun to resume from it.")
                now = time.perf_counter()
                rate = (step - step_last) * config.global_batch / (now - t_last)
                t_last, step_last = now, step
                metrics.update(step=step, samples_per_second=rate,
                               lr=float(optim.lr_schedule(dict(
                                   config.optimizer, total_steps=steps))(step - 1)))
                if flops_per_step:
                    metrics["mfu"] = flops_per_step * rate / config.global_batch / peak
                if hasattr(data, "stats"):
                    metrics.update({f"data/{k}": v for k, v in data.stats().items()})
                if eval_now:
                    metrics.update(evals.run_all(evaluators, encoders, state.params))
                last = metrics
                t_last = time.perf_counter()  # evaluation time is not training throughput
                if is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    writer.scalars(step, metrics)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                         samples_s=f"{rate:.0f}",
                                         **({"mfu": f"{metrics['mfu']:.0%}"}
                                            if "mfu" in metrics else {}))
            progress.update(1)
            if save_now:
                ckpt.save(step, state, data.get_state())
            if stop:
                logging.warning("stopped at step %d after SIGTERM; rerun to resume.", step)
                break
    finally:
        progress.close()
        ckpt.close()
        preempt.restore()
        if writer:
            writer.close()
    if is_main and log_path.exists():
        plot_losses(log_path, workdir / "loss.png")
    if hasattr(data, "stats") and data.stats():
        logging.warning("skipped samples: %s", data.stats())
    return last


def _load_init(state: TrainState, config, model) -> TrainState:
    """Parameters from config.init_checkpoint (optionally only paths matching a regex)."""
    from clipjax.evals import loading

    _, params, arch = loading.load_model(config.init_checkpoint)
    keep = [re.compile(p) for p in config.get("init_checkpoint_keep", ())]
    new = optim.param_paths(params)
    flat_new = {p: v for p, v in zip(jax.tree.leaves(new), jax.tree.leaves(params))}
    paths = optim.param_paths(state.params)

    def pick(path, old):
        if keep and not any(k.search(path) for k in keep):
            return old
        if path not in flat_new or flat_new[path].shape != old.shape:
            raise ValueError(f"init_checkpoint {config.init_checkpoint} ({arch}) has no "
                             f"parameter {path} of shape {old.shape}; use a checkpoint of "
                             f"{config.model}.")
        return jax.device_put(flat_new[path], old.sharding)

    params = jax.tree.map(pick, paths, state.params)
    return state.replace(params=params)


def plot_losses(jsonl: Path, png: Path) -> None:
    """The loss curve (and zero-shot accuracy, when logged) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals_ = [r for r in rows if "zeroshot/top1" in r]
    if evals_:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals_], [r["zeroshot/top1"] for r in evals_], "o-",
                 color="tab:orange", label="zero-shot top-1")
        ax2.set_ylabel("zero-shot top-1")
        ax2.set_ylim(0, 1)
    ax.set_title(jsonl.parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
