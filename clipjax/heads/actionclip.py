"""ActionCLIP (Wang et al. 2021): action recognition as video-text matching.

T frames (TSN segments) go through the image tower, optionally with a temporal shift
inside every block (`tsm`: 1/8 of the patch tokens' channels from the next frame, 1/8 from
the previous, the class token untouched) or as one joint sequence (`joint`); a
post-network fusion pools them:

- `Transf` (the paper's): learned frame positions, 6 CLIP blocks, residual, mean over T.
- `meanP`, `Conv_1D` (a depthwise temporal convolution started as a channel shift),
  `LSTM` (residual), `Transf_cls` (a class token over the frames, 6 blocks, final norm).

Class names in 16 prompt templates form the text, a random template per training sample;
the loss is ActionCLIP's KL divergence to softmax(10 x same-label) over the global batch,
both directions (`losses.kl_multi_positive`). Testing averages the per-template softmax
of 100 x cosine over the templates (and over views).

    clipjax train --config actionclip_synthetic
"""

import jax
import jax.numpy as jnp

from clipjax.evals import prompts
from clipjax.heads import video
from clipjax.models import layers
from clipjax.models.clip import _normalize
from clipjax.models.layers import CONV_SPATIAL, EMBED, POSITIONS

FUSIONS = ("meanP", "Conv_1D", "LSTM", "Transf", "Transf_cls")
DEFAULTS = {"frames": 8, "fusion": "Transf", "fusion_layers": 6, "tsm": False, "joint": False}
TEMPLATES = prompts.ACTION_TEMPLATES  # ActionCLIP's 16 (utils/Text_Prompt.py)


def _shift_kernel(key, shape, dtype=jnp.float32):
    """Conv_1D's start: a quarter of the channels from t-1, half from t, a quarter from t+1."""
    k, e = shape
    q = e // 4
    w = jnp.zeros(shape, dtype)
    w = w.at[0, :q].set(1.0).at[1, q:q + e // 2].set(1.0)
    return w.at[2, e - q:].set(1.0)


class ClassTokenTransformer(layers.nn.Module):
    """Transf_cls: a class token before the frames, positions, blocks, a final LayerNorm."""

    layers: int
    heads: int
    frames: int
    activation: str = "gelu"
    dtype: layers.Dtype = jnp.float32

    @layers.nn.compact
    def __call__(self, x_BTE: jax.Array) -> jax.Array:
        nn = layers.nn
        b, t, e = x_BTE.shape
        cls_E = layers.param_with_axes(self, "class_embedding", nn.initializers.normal(0.02),
                                       (e,), (EMBED,))
        pos_SE = layers.param_with_axes(self, "positional_embedding", nn.initializers.normal(0.02),
                                        (self.frames + 1, e), (POSITIONS, EMBED))
        x_BSE = jnp.concatenate([jnp.broadcast_to(cls_E, (b, 1, e)), x_BTE], axis=1) + pos_SE
        x_BSE, _ = layers.Transformer(self.layers, self.heads, 4 * e, self.activation,
                                      dtype=self.dtype, name="transformer")(x_BSE.astype(self.dtype))
        return layers.LayerNorm(name="ln_post")(x_BSE[:, 0]).astype(jnp.float32)


class ActionClip(video.VideoCLIP):
    fusion: str = "Transf"
    fusion_layers: int = 6
    tsm: bool = False
    joint: bool = False

    def video_options(self) -> dict:
        return {"frames": self.frames, "shift": self.tsm, "joint": self.joint}

    def setup(self):
        super().setup()
        if self.fusion not in FUSIONS:
            raise ValueError(f"head.fusion={self.fusion!r}; choose one of {', '.join(FUSIONS)}.")
        e = self.config.embed_dim
        heads = max(1, self.config.text.width // 64)
        if self.fusion == "Transf":
            # ActionCLIP's blocks normalise with eps 1e-12 and start positions at N(0, 0.02).
            self.temporal = video.FrameTransformer(
                self.fusion_layers, heads, self.config.text.context_length,
                self.config.activation, self.dtype, self.scan, self.remat, self.unroll,
                ln_eps=1e-12, position_std=0.02)
        elif self.fusion == "Transf_cls":
            self.temporal = ClassTokenTransformer(self.fusion_layers, heads, self.frames,
                                                  self.config.activation, self.dtype)
        elif self.fusion == "LSTM":
            self.temporal = video.LSTM(e)
        elif self.fusion == "Conv_1D":
            self.temporal_kernel = layers.param_with_axes(self, "temporal_kernel", _shift_kernel,
                                                          (3, e), (CONV_SPATIAL, EMBED))

    def encode_video(self, video_BTHWC: jax.Array, mask_BT: jax.Array,
                     normalize: bool = False) -> jax.Array:
        """[B, E]: the fused clip embedding."""
        x_BTE = self.encode_frames(video_BTHWC)
        if self.joint:  # one embedding per clip already
            out_BE = x_BTE[:, 0]
        elif self.fusion == "Transf_cls":
            out_BE = self.temporal(x_BTE)
        else:
            if self.fusion == "Transf":
                x_BTE = self.temporal(x_BTE) + x_BTE
            elif self.fusion == "LSTM":
                x_BTE = self.temporal(x_BTE) + x_BTE
            elif self.fusion == "Conv_1D":
                padded = jnp.pad(x_BTE, ((0, 0), (1, 1), (0, 0)))
                t = x_BTE.shape[1]
                x_BTE = x_BTE + sum(padded[:, k:k + t] * self.temporal_kernel[k] for k in range(3))
            out_BE = video.masked_mean(x_BTE, mask_BT)
        return _normalize(out_BE) if normalize else out_BE

    def __call__(self, video_BTHWC, mask_BT, tokens_BL):
        return (self.encode_video(video_BTHWC, mask_BT, normalize=True),
                self.encode_text(tokens_BL, normalize=True))


# --- The task --------------------------------------------------------------------------


def settings(config) -> dict:
    return video.head_settings(config, DEFAULTS, "actionclip")


def build_models(config):
    s = settings(config)
    model = video.build_model(ActionClip, config, "ActionCLIP", frames=s["frames"],
                              fusion=s["fusion"], fusion_layers=s["fusion_layers"],
                              tsm=bool(s["tsm"]), joint=bool(s["joint"]))
    return model, model


def encode(model: ActionClip):
    def fn(params, batch):
        vid = model.apply({"params": params}, batch["video"], batch["frame_mask"], True,
                          method="encode_video")
        txt = model.apply({"params": params}, batch["text"], normalize=True,
                          method="encode_text")
        return vid, txt

    return fn


def loss(model: ActionClip, config, mesh):
    from clipjax.train import clip_loss

    return clip_loss(config.loss, mesh)


def batch_keys(config) -> tuple[str, ...]:
    return ("video", "frame_mask", "text", "label")


def derived_params(model: ActionClip, params) -> dict:
    return {}  # ActionCLIP starts its fusion afresh


TEXT = "template"  # training text: a random template with the clip's class name
SAMPLING = "tsn"  # head.frames segments, a random frame of each in training, centres in test
EXAMPLE_SOURCE = "k400:/data/k400?split=train"


def eval_functions(model: ActionClip):
    """(encode_video, encode_text, similarity) for clipjax.evals.video.VideoEncoders."""

    def encode_video(params, batch):
        return model.apply({"params": params}, batch["video"], batch["frame_mask"], True,
                           method="encode_video")

    def encode_text(params, tokens):
        return model.apply({"params": params}, tokens, normalize=True, method="encode_text")

    def similarity(params, txt_QE, vid_VE):
        return 100.0 * (txt_QE @ vid_VE.T)  # ActionCLIP's test scores (not logit_scale)

    return encode_video, encode_text, similarity


def evaluators(videos) -> dict:
    from clipjax.evals import video as video_evals

    if not videos.classnames:
        raise ValueError("ActionCLIP evaluates on a labelled video set (k400, ucf101, hmdb51, "
                         "videolist/rawframes with labels=...); this one has no class names.")
    return {"action": video_evals.action_evaluator(videos, videos.classnames, TEMPLATES)}


def next_command(config, workdir: str) -> str:
    data = "synthetic" if config.data.source == "synthetic" else config.eval.get("video") or \
        "ucf101:/data/ucf101?split=1"
    return f"clipjax eval action --checkpoint {workdir} --dataset {data}"
