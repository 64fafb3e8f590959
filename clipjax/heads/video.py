"""What the video heads share: frames through the CLIP image tower, temporal modules, and
the glue to the training loop (data, evaluators, encoders, initialisation from CLIP).

A clip is `video` uint8 [B, T, H, W, 3] with `frame_mask` bool [B, T]; its frames are
flattened into the image tower's rows (B x T, still split over data x fsdp, a clip's
frames on one device) and come back as frame embeddings [B, T, E].
"""

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipjax.models import layers
from clipjax.models.clip import CLIP, _normalize
from clipjax.models.layers import EMBED, MLP, POSITIONS

BATCH_NDIM = {"video": 5, "frame_mask": 2, "text": 2, "label": 1}


def frames_to_images(video_BTHWC: jax.Array) -> jax.Array:
    """uint8 (or normalised float) clips -> normalised float32 rows [B x T, H, W, 3]."""
    from clipjax.train import device_images

    b, t = video_BTHWC.shape[:2]
    return device_images(video_BTHWC.reshape(b * t, *video_BTHWC.shape[2:]))


def masked_mean(x_BTE: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean over the valid frames (a clip without any counts as one frame of zeros)."""
    m_BT1 = mask_BT.astype(jnp.float32)[..., None]
    return jnp.sum(x_BTE * m_BT1, axis=1) / jnp.maximum(jnp.sum(m_BT1, axis=1), 1.0)


def mean_pool(frames_BTE: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """CLIP4Clip's meanP: L2-normalise frames, masked mean, normalise again."""
    return _normalize(masked_mean(_normalize(frames_BTE), mask_BT))


class VideoCLIP(CLIP):
    """CLIP whose image tower also reads clips: the base of the video heads."""

    frames: int = 8

    def encode_frames(self, video_BTHWC: jax.Array) -> jax.Array:
        """Per-frame image embeddings [B, T, E] (unnormalised), or [B, 1, E] for a joint tower."""
        b = video_BTHWC.shape[0]
        if video_BTHWC.shape[1] != self.frames:
            raise ValueError(f"This model reads clips of {self.frames} frames but got "
                             f"{video_BTHWC.shape[1]}; set head.frames={video_BTHWC.shape[1]} "
                             f"or sample {self.frames} frames.")
        out = self.visual(frames_to_images(video_BTHWC))
        return out.reshape(b, -1, out.shape[-1]).astype(jnp.float32)

    def example_inputs(self, batch: int = 1) -> tuple:
        v, t = self.config.vision, self.config.text
        return (jnp.zeros((batch, self.frames, v.image_size, v.image_size, 3), jnp.uint8),
                jnp.ones((batch, self.frames), bool),
                jnp.zeros((batch, t.context_length), jnp.int32))


class FrameTransformer(nn.Module):
    """Frame positions + a stack of CLIP residual blocks over the frames of a clip.

    Named `<module>/frame_position_embeddings` and `<module>/transformer/resblocks_i`, so
    the blocks stack and unstack like the towers' and can be copied from the text tower.
    """

    layers: int
    heads: int
    positions: int
    activation: str = "gelu"
    dtype: layers.Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    unroll: bool = False
    ln_eps: float = 1e-5
    position_std: float = 0.01

    @nn.compact
    def __call__(self, x_BTE: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        t, e = x_BTE.shape[1:]
        if t > self.positions:
            raise ValueError(f"{t} frames but only {self.positions} frame positions; use at "
                             f"most {self.positions} frames.")
        pos_PE = layers.param_with_axes(self, "frame_position_embeddings",
                                        nn.initializers.normal(self.position_std),
                                        (self.positions, e), (POSITIONS, EMBED))
        x_BTE = (x_BTE + pos_PE[:t]).astype(self.dtype)
        out, _ = layers.Transformer(self.layers, self.heads, 4 * e, self.activation,
                                    dtype=self.dtype, scan=self.scan, remat=self.remat,
                                    unroll=self.unroll, ln_eps=self.ln_eps,
                                    name="transformer")(x_BTE, key_mask_BN=mask_BT)
        return out.astype(jnp.float32)


class LSTM(nn.Module):
    """One torch-style LSTM layer over time (gates i, f, g, o; both biases folded in one)."""

    features: int

    @nn.compact
    def __call__(self, x_BTE: jax.Array) -> jax.Array:
        e, h = x_BTE.shape[-1], self.features
        def init(key, shape, dtype=jnp.float32):  # torch's U(-1/sqrt(h), 1/sqrt(h))
            return jax.random.uniform(key, shape, dtype, -h**-0.5, h**-0.5)

        w_ih = layers.param_with_axes(self, "ih_kernel", init, (e, 4 * h), (EMBED, MLP))
        w_hh = layers.param_with_axes(self, "hh_kernel", init, (h, 4 * h), (EMBED, MLP))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (4 * h,), (MLP,))
        gates_TB4H = jnp.einsum("bte,ef->tbf", x_BTE.astype(jnp.float32), w_ih) + bias

        def step(carry, g_B4H):
            c_BH, h_BH = carry
            i, f, g, o = jnp.split(g_B4H + h_BH @ w_hh, 4, axis=-1)
            c_BH = jax.nn.sigmoid(f) * c_BH + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_BH = jax.nn.sigmoid(o) * jnp.tanh(c_BH)
            return (c_BH, h_BH), h_BH

        zeros = jnp.zeros((x_BTE.shape[0], h), jnp.float32)
        _, out_TBH = jax.lax.scan(step, (zeros, zeros), gates_TB4H)
        return out_TBH.swapaxes(0, 1)


def build_model(cls, config, name: str, **fields):
    """A head `cls` over config.model's towers (with model_overrides); ViT towers only."""
    from clipjax.models import clip

    base = clip.create_model(config.model, dtype=jnp.dtype(config.dtype), scan=config.scan,
                             remat=config.remat, **config.model_overrides.to_dict())
    if base.config.vision.is_resnet:
        raise ValueError(f"{name} reads frames with a ViT image tower; choose a ViT model.")
    return cls(base.config, dtype=base.dtype, scan=base.scan, remat=base.remat, **fields)


def head_settings(config, defaults: dict, task: str) -> dict:
    """config.head merged over a head's defaults; an unknown key is refused."""
    given = dict(config.get("head", ml_collections.ConfigDict()).to_dict())
    if unknown := sorted(set(given) - set(defaults)):
        raise ValueError(f"head.{unknown[0]} is not a {task} setting; the settings are "
                         f"{', '.join(f'head.{k}' for k in defaults)}.")
    return {**defaults, **given}


# --- Initialisation from CLIP --------------------------------------------------------


def _flat(params) -> dict:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def _unflat(flat: dict):
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def copy_text_blocks(flat: dict, target: str, count: int, scan: bool) -> dict:
    """{path: value} of `target`/transformer's `count` blocks taken from the text tower's
    first `count` blocks (scanned: a slice of the stacked layers axis)."""
    out = {}
    for path, value in flat.items():
        if scan and path.startswith("text/transformer/resblocks/"):
            out[path.replace("text/", f"{target}/", 1)] = value[:count]
        elif not scan and path.startswith("text/transformer/resblocks_"):
            if int(path.split("/")[2].split("_")[1]) < count:
                out[path.replace("text/", f"{target}/", 1)] = value
    return out


def centre_3d_kernel(conv1_PPCD: jax.Array) -> jax.Array:
    """CLIP4Clip's 3D patch kernel from the 2D one: zeros around it in time, so the 3D patch
    at initialisation gives the 2D patch's output frame by frame."""
    zero = jnp.zeros_like(conv1_PPCD)
    return jnp.stack([zero, conv1_PPCD, zero])


def apply_derived(params, derived: dict, skip: set[str]):
    """`params` with `derived` {path: value} written in, except the paths in `skip`
    (loaded from init_checkpoint: a trained head's own modules are kept)."""
    flat = _flat(params)
    for path, value in derived.items():
        if path in flat and path not in skip:
            old = flat[path]
            if "/resblocks/" in path and value.shape[0] < old.shape[0]:
                # A scanned stack deeper than the text tower: copies in its first layers.
                value = jnp.concatenate([value.astype(old.dtype), old[value.shape[0]:]])
            if flat[path].shape != value.shape:
                raise ValueError(f"{path}: cannot start it from CLIP's weights, {value.shape} "
                                 f"vs {flat[path].shape}; the text width must equal embed_dim.")
            flat[path] = value.astype(flat[path].dtype)
    return _unflat(flat)


# --- The task: data, evaluators and encoders shared by the video heads ------------------


def build_data(head, config, state: dict | None):
    """Resumable host-local training batches {"video", "frame_mask", "text", "label"?}."""
    s = head.settings(config)
    if config.data.source == "synthetic":
        from clipjax.data import synthetic_video

        it = synthetic_video.SyntheticVideoIterator(
            config.global_batch, num_frames=s["frames"], image_size=config.data.image_size,
            context_length=config.data.context_length, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            text=head.TEXT, templates=getattr(head, "TEMPLATES", synthetic_video.ACTION_TEMPLATES),
            mirror_pairs=bool(config.data.get("mirror_pairs", False)))
    elif not config.data.source:
        raise ValueError("data.source is empty; give a video dataset, e.g. "
                         f"data.source='{head.EXAMPLE_SOURCE}', or 'synthetic'.")
    else:
        from clipjax.data import video as video_data

        it = video_data.make_video_iterator(
            config.data.source, global_batch_size=config.global_batch, num_frames=s["frames"],
            image_size=config.data.image_size, train=True, seed=config.seed,
            sampling=head.SAMPLING, fps=s.get("fps", 1), slice_framepos=s.get("slice_framepos", 2),
            context_length=config.data.context_length,
            templates=getattr(head, "TEMPLATES", None) if head.TEXT == "template" else None,
            num_workers=config.data.num_workers)
    if state:
        it.set_state(state)
    return it


def parse_views(views: str) -> tuple[int, int]:
    """"10x3" -> (10 clips, 3 crops)."""
    try:
        clips, crops = (int(v) for v in str(views).lower().split("x"))
        if clips < 1 or crops < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"views={views!r}: give clips x crops like 1x1 or 10x3.") from None
    return clips, crops


def eval_set(head, spec: str, config, *, num_videos: int = 0, views: str = "1x1"):
    """A video evaluation set: the built-in held-out split or a dataset spec."""
    s = head.settings(config)
    spec = spec.strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from clipjax.data import synthetic_video

        n = int(spec.split(":", 1)[1]) if ":" in spec else (num_videos or 256)
        return synthetic_video.SyntheticVideos(n, seed=config.seed, num_frames=s["frames"],
                                               image_size=config.data.image_size)
    from clipjax.data import video as video_data

    return video_data.eval_set(spec, num_frames=s["frames"], image_size=config.data.image_size,
                               sampling=head.SAMPLING, views=parse_views(views),
                               fps=s.get("fps", 1), slice_framepos=s.get("slice_framepos", 2),
                               num_workers=config.data.num_workers)


def build_evaluators(head, config) -> dict:
    spec = config.eval.get("video", "")
    if not spec:
        return {}
    videos = eval_set(head, spec, config, num_videos=config.eval.num_examples,
                      views=config.eval.get("views", "1x1"))
    evaluators = head.evaluators(videos)
    if spec.startswith("synthetic"):  # what the temporal heads are for
        evaluators["direction"] = direction_evaluator(videos, getattr(head, "TEMPLATES", None))
    return evaluators


def make_encoders(head, model, mesh, batch_size: int = 64):
    from clipjax import sharding
    from clipjax.evals import video as video_evals

    shards = sharding.batch_size(mesh)
    batch_size = -(-batch_size // shards) * shards
    encode_video, encode_text, similarity = head.eval_functions(model)
    return video_evals.VideoEncoders(
        jax.jit(encode_video), jax.jit(encode_text), jax.jit(similarity), model.frames,
        model.config.vision.image_size, model.config.text.context_length, mesh, batch_size)


def derive(head, model, params, loaded: frozenset = frozenset()):
    return apply_derived(params, head.derived_params(model, params), set(loaded))


def task(head, name: str):
    from clipjax.heads import Task

    return Task(
        name=name, batch_ndim=BATCH_NDIM, build_models=head.build_models, encode=head.encode,
        loss=head.loss, batch_keys=head.batch_keys,
        build_data=lambda config, state: build_data(head, config, state),
        build_evaluators=lambda config: build_evaluators(head, config),
        make_encoders=lambda model, mesh: make_encoders(head, model, mesh),
        derive=lambda model, params, loaded=frozenset(): derive(head, model, params, loaded),
        identity=lambda config: {"task": name, "head": head.settings(config)},
        next_command=head.next_command)


# --- Using a trained (or plain CLIP) checkpoint -------------------------------------------


def load(checkpoint: str, task: str, **head) -> tuple:
    """(head module, eval model, NumPy params in its layout, config) for a checkpoint.

    A video head's workdir or file gives its own head (whatever `task` asks: every video
    head embeds clips and captions); a plain CLIP checkpoint (a CLIP run, OpenAI /
    OpenCLIP weights) gives `task`'s head with `head` settings over CLIP's towers — meanP
    pooling is CLIP's zero-shot video baseline. New modules start as at training.
    """
    import importlib

    from clipjax import config as config_lib, weights
    from clipjax.models import variants

    w = weights.load(checkpoint)
    trained = (w.config or {}).get("task", "clip")
    if trained != "clip" and trained not in ("clip4clip", "actionclip"):
        raise ValueError(f"{checkpoint} holds a {trained} model, not a video head or CLIP; "
                         "give a CLIP, CLIP4Clip or ActionCLIP checkpoint.")
    if trained != "clip":
        config = ml_collections.ConfigDict(w.config)
        name = trained
        if head:
            config.head.update(head)
    else:
        # load_config maps configs/ as clipjax.configs, which a source checkout lacks.
        config = config_lib.load_config("default").unlock()
        config.task, name = task, task
        config.model = w.arch
        # Frames and captions are read at the model's sizes, not the default run's.
        config.data.image_size = w.model_config.vision.image_size
        config.data.context_length = w.model_config.text.context_length
        base = variants.flat_fields(variants.to_dict(variants.get_config(w.arch)))
        overrides = {k: v for k, v in variants.flat_fields(variants.to_dict(w.model_config))
                     .items() if base.get(k) != v}
        config.model_overrides = ml_collections.ConfigDict()
        for key, value in overrides.items():  # dotted -> nested
            group, _, field = key.rpartition(".")
            target = config.model_overrides
            if group:
                if group not in target:
                    target[group] = ml_collections.ConfigDict()
                target = target[group]
            target[field] = value
        config.head = ml_collections.ConfigDict(head)
    config.scan, config.remat, config.dtype = False, "none", "float32"
    module = importlib.import_module(f"clipjax.heads.{name}")
    model = module.build_models(config)[1]
    params = jax.tree.map(jnp.asarray, w.params)
    if trained == "clip":  # the head's own modules start as they would for training
        from clipjax.models import clip

        fresh = jax.jit(model.init)(jax.random.key(0), *model.example_inputs(1))["params"]
        fresh = flax.linen.meta.unbox(fresh)
        flat, given = _flat(fresh), _flat(params)
        missing = [p for p in _flat(clip.abstract_params(clip.CLIP(model.config))) if p not in given]
        if missing:
            raise ValueError(f"{checkpoint} lacks {missing[0]} (and {len(missing) - 1} more) of "
                             f"{w.arch}; give a complete CLIP checkpoint.")
        flat.update({p: v for p, v in given.items() if p in flat})
        params = apply_derived(_unflat(flat), module.derived_params(model, _unflat(flat)), set())
    return module, model, params, config


def direction_evaluator(videos, templates=None, prefix: str = "direction"):
    """On the built-in videos: can the model tell a motion from its mirror?

    Each held-out clip is scored against six texts, one per motion: its own caption
    rewritten with each motion, or (given `templates`, ActionCLIP) the six class names in
    the templates, averaged as its test does. `top1`: the right motion wins among the six;
    `mirror`: it beats its mirror image (left vs right, up vs down, grow vs shrink), which a
    mean over frames cannot do (chance 50%).
    """
    from clipjax.data import synthetic_video as sv
    from clipjax.evals import video as video_evals

    def run(encoders, params) -> dict[str, float]:
        n, m = videos.num_videos, len(sv.MOTIONS)
        index = np.arange(n)
        drawn = sv.render(videos.seed, videos.split, index, 2, 4)
        if templates is not None:
            probs, seen, _ = video_evals.score_videos(encoders, params, videos, sv.CLASSNAMES,
                                                      templates)
            scores_VM, truth = probs, drawn.motion_B[seen]
        else:
            texts = []
            for motion in range(m):  # [M, N] captions, motion-major
                as_m = dataclasses.replace(drawn, motion_B=np.full(n, motion, np.int32))
                texts += sv.captions(videos.seed, videos.split, as_m, index)
            txt = video_evals.encode_texts(encoders, params, texts)
            parts, seen = [], []
            for sim_Qb, extra in video_evals.score_rows(encoders, params, videos, txt):
                i = extra["index"]
                parts.append(sim_Qb.reshape(m, n, -1)[:, i, np.arange(len(i))].T)
                seen.append(i)
            scores_VM, truth = np.concatenate(parts), drawn.motion_B[np.concatenate(seen)]
        rows = np.arange(len(truth))
        return {f"{prefix}/top1": float(np.mean(np.argmax(scores_VM, 1) == truth)),
                f"{prefix}/mirror": float(np.mean(scores_VM[rows, truth] >
                                                  scores_VM[rows, sv.MIRROR[truth]]))}

    return run
