"""CLIP4Clip (Luo et al. 2021): video-text retrieval from CLIP's two towers.

Each frame goes through the image tower; a similarity head turns the frames and the
caption's end-of-text embedding into a score:

- `meanP`: normalise frames, masked mean, normalise; score = logit_scale x cosine.
- `seqLSTM`: an LSTM over the frames plus the frames (residual), then meanP.
- `seqTransf`: frame positions (from the text tower's positional embedding) and 4 blocks
  copied from text blocks 0-3, padded frames masked, residual, then meanP.
- `tightTransf`: the caption token and the frames in one sequence with positions and
  type embeddings through a 4-block cross model (text blocks 0-3), Linear -> 1 per pair.

`linear_patch="3d"` replaces the patch embedding with a (3, p, p) convolution over time
whose centre slice starts as the 2D kernel. Training is symmetric cross-entropy over the
global batch: the loose heads use the CLIP losses (softmax or tiled) unchanged;
tightTransf scores every caption against every clip of the global batch.

    clipjax train --config clip4clip_synthetic
"""

import jax
import jax.numpy as jnp

from clipjax import losses
from clipjax.heads import video
from clipjax.models import layers
from clipjax.models.clip import _normalize
from clipjax.models.layers import EMBED, POSITIONS

SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
DEFAULTS = {"frames": 12, "sim_header": "meanP", "linear_patch": "2d", "cross_layers": 4,
            "fps": 1, "slice_framepos": 2,
            # The frame positions start as the text tower's positional embedding times this
            # (1: the reference's copy).
            "position_scale": 1.0}


class CrossModel(layers.nn.Module):
    """tightTransf: [caption token, frames] + positions + types -> blocks -> pooled -> 1."""

    layers: int
    heads: int
    positions: int
    activation: str = "gelu"
    dtype: layers.Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    unroll: bool = False

    @layers.nn.compact
    def __call__(self, txt_QE: jax.Array, frames_QTE: jax.Array, mask_QT: jax.Array) -> jax.Array:
        q, t, e = frames_QTE.shape
        nn = layers.nn
        pos_PE = layers.param_with_axes(self, "position_embeddings", nn.initializers.normal(0.01),
                                        (self.positions, e), (POSITIONS, EMBED))
        # The reference leaves its type embeddings commented out; zeros start there.
        type_2E = layers.param_with_axes(self, "type_embeddings", nn.initializers.zeros, (2, e),
                                         (None, EMBED))
        x_QSE = jnp.concatenate([txt_QE[:, None], frames_QTE], axis=1)
        types_SE = jnp.concatenate([type_2E[:1], jnp.repeat(type_2E[1:], t, axis=0)])
        x_QSE = (x_QSE + pos_PE[:t + 1] + types_SE).astype(self.dtype)
        mask_QS = jnp.concatenate([jnp.ones((q, 1), bool), mask_QT.astype(bool)], axis=1)
        x_QSE, _ = layers.Transformer(self.layers, self.heads, 4 * e, self.activation,
                                      dtype=self.dtype, scan=self.scan, remat=self.remat,
                                      unroll=self.unroll, name="transformer")(
                                          x_QSE, key_mask_BN=mask_QS)
        pooled_QE = layers.LayerNorm(name="ln_pool")(x_QSE[:, 0])
        pooled_QE = layers.Dense(e, (EMBED, None), dtype=self.dtype, name="pool_dense",
                                 activation=layers.quick_gelu)(pooled_QE)
        score_Q1 = layers.Dense(1, (None, None), dtype=jnp.float32,
                                name="similarity_dense")(pooled_QE.astype(jnp.float32))
        return score_Q1[:, 0]


class Clip4Clip(video.VideoCLIP):
    sim_header: str = "meanP"
    linear_patch: str = "2d"
    cross_layers: int = 4
    position_scale: float = 1.0  # see DEFAULTS

    def video_options(self) -> dict:
        return {"frames": self.frames, "patch_3d": self.linear_patch == "3d"}

    def setup(self):
        super().setup()
        if self.sim_header not in SIM_HEADERS:
            raise ValueError(f"head.sim_header={self.sim_header!r}; choose one of "
                             f"{', '.join(SIM_HEADERS)}.")
        if self.linear_patch not in ("2d", "3d"):
            raise ValueError(f"head.linear_patch={self.linear_patch!r}; choose 2d or 3d.")
        t = self.config.text
        common = dict(activation=self.config.activation, dtype=self.dtype, scan=self.scan,
                      remat=self.remat, unroll=self.unroll)
        if self.sim_header == "seqTransf":
            self.temporal = video.FrameTransformer(self.cross_layers, t.heads, t.context_length,
                                                   **common)
        elif self.sim_header == "seqLSTM":
            self.lstm = video.LSTM(self.config.embed_dim)
        elif self.sim_header == "tightTransf":
            self.cross = CrossModel(self.cross_layers, t.heads, t.context_length, **common)

    def encode_video(self, video_BTHWC: jax.Array, mask_BT: jax.Array) -> jax.Array:
        """[B, E]: the loose heads' unit-norm clip embedding (tightTransf: the frames' mean)."""
        frames_BTE = self.encode_frames(video_BTHWC)
        if self.sim_header == "seqTransf":
            frames_BTE = self.temporal(frames_BTE, mask_BT) + frames_BTE
        elif self.sim_header == "seqLSTM":
            frames_BTE = self.lstm(frames_BTE) + frames_BTE
        return video.mean_pool(frames_BTE, mask_BT)

    def tight_scores(self, txt_QE: jax.Array, frames_QTE: jax.Array, mask_QT: jax.Array):
        """tightTransf's score of caption q with clip q (rows already paired)."""
        return self.cross(txt_QE, frames_QTE, mask_QT)

    def __call__(self, video_BTHWC, mask_BT, tokens_BL):
        txt_BE = self.encode_text(tokens_BL)
        if self.sim_header != "tightTransf":
            return self.encode_video(video_BTHWC, mask_BT), _normalize(txt_BE)
        frames_BTE = self.encode_frames(video_BTHWC)
        return self.tight_scores(txt_BE, frames_BTE, mask_BT)


# --- The task: what the training loop asks of a head ----------------------------------


def settings(config) -> dict:
    return video.head_settings(config, DEFAULTS, "clip4clip")


def build_models(config):
    s = settings(config)
    model = video.build_model(Clip4Clip, config, "CLIP4Clip", frames=s["frames"],
                              sim_header=s["sim_header"], linear_patch=s["linear_patch"],
                              cross_layers=s["cross_layers"],
                              position_scale=float(s["position_scale"]))
    return model, model


def encode(model: Clip4Clip):
    """(clip embedding, caption embedding) of a batch; tightTransf keeps every frame."""

    def fn(params, batch):
        if model.sim_header == "tightTransf":
            frames = model.apply({"params": params}, batch["video"], method="encode_frames")
            txt = model.apply({"params": params}, batch["text"], method="encode_text")
            return frames, txt
        vid = model.apply({"params": params}, batch["video"], batch["frame_mask"],
                          method="encode_video")
        txt = model.apply({"params": params}, batch["text"], normalize=True,
                          method="encode_text")
        return vid, txt

    return fn


def tight_logits(model: Clip4Clip, params, txt_QE, frames_VTE, mask_VT, chunk: int = 0):
    """[Q, V] cross-model scores of every caption with every clip, `chunk` captions at a
    time (default: about 4096 pairs), so memory holds chunk x V sequences, not Q x V."""
    q, v = txt_QE.shape[0], frames_VTE.shape[0]
    chunk = min(q, chunk or max(1, 4096 // v))

    def row(txt_cE):
        c = txt_cE.shape[0]
        txt = jnp.repeat(txt_cE, v, axis=0)
        frames = jnp.tile(frames_VTE, (c, 1, 1))
        mask = jnp.tile(mask_VT, (c, 1))
        return model.apply({"params": params}, txt, frames, mask,
                           method="tight_scores").reshape(c, v)

    pad = (-q) % chunk
    txt = jnp.pad(txt_QE, ((0, pad), (0, 0)))
    out = jax.lax.map(row, txt.reshape(-1, chunk, txt.shape[-1]))
    return out.reshape(-1, v)[:q]


def cross_entropy_both_ways(logits_QV: jax.Array):
    """CLIP4Clip's CrossEn on sim and sim^T, averaged (the diagonal is the positive)."""
    diag = jnp.diagonal(logits_QV)
    t2v = jnp.mean(jax.nn.logsumexp(logits_QV, axis=1) - diag)
    v2t = jnp.mean(jax.nn.logsumexp(logits_QV, axis=0) - diag)
    return (t2v + v2t) / 2, jax.lax.stop_gradient(losses.logit_metrics(logits_QV.T))


def loss(model: Clip4Clip, config, mesh):
    if model.sim_header != "tightTransf":
        from clipjax.train import clip_loss

        return clip_loss(config.loss, mesh, **({"tile": config.loss_tile}
                                               if config.loss == "tiled" else {}))

    def fn(params, embeddings, batch):
        frames_VTE, txt_QE = embeddings
        logits = tight_logits(model, params, txt_QE, frames_VTE, batch["frame_mask"])
        return cross_entropy_both_ways(logits)

    return fn


def batch_keys(config) -> tuple[str, ...]:
    return ("video", "frame_mask", "text")


def derived_params(model: Clip4Clip, params) -> dict:
    """{path: value} of the modules CLIP4Clip starts from CLIP's own weights."""
    flat = video._flat(params)
    out = {}
    if model.linear_patch == "3d":
        out["visual/conv2_kernel"] = video.centre_3d_kernel(flat["visual/conv1_kernel"])
    if model.sim_header == "seqTransf":
        out.update(video.copy_text_blocks(flat, "temporal", model.cross_layers, model.scan))
        out["temporal/frame_position_embeddings"] = (model.position_scale *
                                                     flat["text/positional_embedding"])
    elif model.sim_header == "tightTransf":
        out.update(video.copy_text_blocks(flat, "cross", model.cross_layers, model.scan))
        out["cross/position_embeddings"] = model.position_scale * flat["text/positional_embedding"]
    return out


TEXT = "caption"  # training text: one of the clip's captions
SAMPLING = "clip4clip"  # 1 frame a second, linspace down to head.frames
EXAMPLE_SOURCE = "msrvtt:/data/msrvtt?split=train"


def eval_functions(model: Clip4Clip):
    """(encode_video, encode_text, similarity) for clipjax.evals.video.VideoEncoders."""
    if model.sim_header == "tightTransf":
        def encode_video(params, batch):
            frames = model.apply({"params": params}, batch["video"], method="encode_frames")
            return frames, batch["frame_mask"]

        def encode_text(params, tokens):
            return model.apply({"params": params}, tokens, method="encode_text")

        def similarity(params, txt_QE, vid):
            return tight_logits(model, params, txt_QE, *vid, chunk=8)

        return encode_video, encode_text, similarity

    def encode_video(params, batch):
        return model.apply({"params": params}, batch["video"], batch["frame_mask"],
                           method="encode_video")

    def encode_text(params, tokens):
        return model.apply({"params": params}, tokens, normalize=True, method="encode_text")

    def similarity(params, txt_QE, vid_VE):
        return jnp.exp(params["logit_scale"]) * (txt_QE @ vid_VE.T)

    return encode_video, encode_text, similarity


def evaluators(videos) -> dict:
    from clipjax.evals import video as video_evals

    return {"video_retrieval": video_evals.retrieval_evaluator(videos)}


def next_command(config, workdir: str) -> str:
    data = "synthetic" if config.data.source == "synthetic" else config.eval.get("video") or \
        "msrvtt:/data/msrvtt"
    return f"clipjax eval video-retrieval --checkpoint {workdir} --dataset {data}"
