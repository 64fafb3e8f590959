"""LSeg (Li et al., 2022): language-driven semantic segmentation on CLIP's towers.

The ViT image tower is tapped at four blocks; DPT's reassemble ("pretrained": readout
projection, 1x1 convolutions, resampling to 1/4 ... 1/32) and refinement fusion ("scratch":
residual conv units with BatchNorm, bilinear x2 with aligned corners) give per-pixel
embeddings at half the input size, scored against the frozen text tower's embeddings of
any label list by a fixed 1/0.07 x cosine, then upsampled x2. Trained by per-pixel
cross-entropy (ignored pixels left out) with SGD and a poly schedule, the decoder at 10x.

The reference starts its image tower from an ImageNet ViT and takes only CLIP's text
tower; here both towers come from one CLIP checkpoint (init_checkpoint).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models import layers
from clipjax.models.clip import CLIP, _normalize
from clipjax.models.layers import (CONV_IN, CONV_OUT, CONV_SPATIAL, EMBED, MLP, Conv, Dtype,
                                   resize_aligned)
from clipjax.models.resnet import BatchNorm

DEFAULTS = {"features": 256, "hooks": (), "readout_dims": (), "template": "{}",
            "base_size": 520, "eval_mode": "slide", "eval_scales": (1.0,), "eval_flip": False,
            "train_words": "canonical", "held_out_classes": ()}
LOGIT_SCALE = 1 / 0.07  # fixed in the reference: nn.Parameter(log(1/0.07)).exp() is a tensor
FROZEN = ("^text/", "^logit_scale$", "^visual/ln_post/", "^visual/proj$")
BATCH_NDIM = {"image": 4, "mask": 3}
IGNORE = -1
BATCH_STATS = True  # the decoder's BatchNorm folds batch statistics in training


def default_hooks(depth: int) -> tuple[int, ...]:
    """The tapped blocks: DPT's (2, 5, 8, 11) for 12 blocks, (5, 11, 17, 23) for 24; evenly
    spaced, ending at the last block, for other depths."""
    return tuple(max(0, round((i + 1) * depth / 4) - 1) for i in range(4))


def default_readout_dims(width: int) -> tuple[int, ...]:
    """DPT's reassemble widths: ViT-L [256, 512, 1024, 1024], ViT-B [96, 192, 384, 768];
    smaller towers scale ViT-B's by their width."""
    if width >= 1024:
        return (256, 512, 1024, 1024)
    return tuple(max(8, width * k // 8) for k in (1, 2, 4, 8))


class ConvTranspose(nn.Module):
    """A transposed convolution with kernel = stride = `factor` (no overlap): every input
    pixel becomes a factor x factor block, as DPT's ConvTranspose2d(k=s, p=0)."""

    features: int
    factor: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        b, y, x, c = x_BYXC.shape
        f = self.factor
        kernel = layers.param_with_axes(
            self, "kernel", nn.initializers.lecun_normal(in_axis=2, out_axis=3),
            (f, f, c, self.features), (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, CONV_OUT))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                                      (CONV_OUT,))
        out = layers.einsum("byxc,ijcf->byixjf", x_BYXC, kernel, self.dtype)
        return out.reshape(b, y * f, x * f, self.features) + bias.astype(out.dtype)


class Reassemble(nn.Module):
    """DPT's act_postprocess1-4 (readout "project"): tokens of four blocks -> maps at 4x,
    2x, 1x and 1/2x the patch grid, widths `dims`."""

    dims: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, taps: list[jax.Array], grid: tuple[int, int]) -> list[jax.Array]:
        out = []
        for i, (x_BND, dim) in enumerate(zip(taps, self.dims)):
            b, n, d = x_BND.shape
            cls_BND = jnp.broadcast_to(x_BND[:, :1], (b, n - 1, d))
            y_BND = layers.Dense(d, (MLP, EMBED), dtype=self.dtype, activation=layers.exact_gelu,
                                 name=f"readout_{i}")(jnp.concatenate([x_BND[:, 1:], cls_BND], -1))
            y_BYXC = Conv(dim, 1, dtype=self.dtype, name=f"conv_{i}")(y_BND.reshape(b, *grid, d))
            if i == 0:
                y_BYXC = ConvTranspose(dim, 4, self.dtype, name=f"resample_{i}")(y_BYXC)
            elif i == 1:
                y_BYXC = ConvTranspose(dim, 2, self.dtype, name=f"resample_{i}")(y_BYXC)
            elif i == 3:
                y_BYXC = Conv(dim, 3, 2, dtype=self.dtype, name=f"resample_{i}")(y_BYXC)
            out.append(y_BYXC)
        return out


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> BN -> relu -> conv3x3 -> BN, plus the input."""

    train: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        c = x_BYXC.shape[-1]
        y = Conv(c, 3, use_bias=False, dtype=self.dtype, name="conv1")(nn.relu(x_BYXC))
        y = BatchNorm(self.train, name="bn1")(y)
        y = Conv(c, 3, use_bias=False, dtype=self.dtype, name="conv2")(nn.relu(y))
        return BatchNorm(self.train, name="bn2")(y) + x_BYXC


class Fusion(nn.Module):
    """DPT's "scratch": 3x3 convs to `features`, four refinement blocks (each adds the next
    finer map through a residual unit, refines, upsamples x2 with aligned corners and mixes
    by a 1x1 conv), and head1 to the embedding width."""

    features: int
    out_dim: int
    train: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: list[jax.Array]) -> jax.Array:
        f = self.features
        rn = [Conv(f, 3, use_bias=False, dtype=self.dtype, name=f"layer{i + 1}_rn")(m)
              for i, m in enumerate(maps)]
        path = None
        for i in (3, 2, 1, 0):
            x = rn[i]
            if path is not None:
                unit = ResidualConvUnit(self.train, self.dtype, name=f"refinenet{i + 1}_unit1")
                x = path[:, :x.shape[1], :x.shape[2]] + unit(x)
            x = ResidualConvUnit(self.train, self.dtype, name=f"refinenet{i + 1}_unit2")(x)
            x = resize_aligned(x, (2 * x.shape[1], 2 * x.shape[2]))
            path = Conv(f, 1, dtype=self.dtype, name=f"refinenet{i + 1}_out")(x)
        return Conv(self.out_dim, 1, dtype=self.dtype, name="head1")(path)


class LSeg(CLIP):
    """CLIP's towers with DPT's decoder on the image side."""

    crop: int = 480
    features: int = 256
    hooks: tuple[int, ...] = ()
    readout_dims: tuple[int, ...] = ()

    def video_options(self) -> dict:
        return {"any_size": True}  # DPT resizes the position grid to the crop

    def setup(self):
        super().setup()
        v = self.config.vision
        if v.is_resnet:
            raise ValueError("LSeg taps a ViT image tower's blocks; choose a ViT model.")
        hooks = self.hooks or default_hooks(v.layers)
        if len(hooks) != 4 or not all(0 <= h < v.layers for h in hooks):
            raise ValueError(f"head.hooks={tuple(hooks)}: give four block indices below {v.layers}.")
        self.pretrained = Reassemble(tuple(self.readout_dims or default_readout_dims(v.width)),
                                     self.dtype)
        self.scratch = Fusion(self.features, self.config.embed_dim, self.train, self.dtype)

    def pixel_embeddings(self, img_BHWC: jax.Array) -> jax.Array:
        """L2-normalised embeddings [B, H/2, W/2, E] of normalised float images."""
        v = self.config.vision
        h, w = img_BHWC.shape[1:3]
        _, feats = self.visual(img_BHWC, return_features=True)
        blocks_LBND = feats["blocks"]
        taps = [blocks_LBND[i] for i in (self.hooks or default_hooks(v.layers))]
        maps = self.pretrained(taps, (h // v.patch_size, w // v.patch_size))
        return _normalize(self.scratch(maps))

    def label_embeddings(self, tokens_CL: jax.Array) -> jax.Array:
        return self.encode_text(tokens_CL, normalize=True)

    def __call__(self, img_BHWC: jax.Array, tokens_CL: jax.Array) -> jax.Array:
        return pixel_logits(self.pixel_embeddings(img_BHWC), self.label_embeddings(tokens_CL),
                            img_BHWC.shape[1:3])

    def example_inputs(self, batch: int = 1) -> tuple:
        return (jnp.zeros((batch, self.crop, self.crop, 3), jnp.float32),
                jnp.zeros((2, self.config.text.context_length), jnp.int32))


def pixel_logits(pix_BYXE: jax.Array, labels_CE: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, C]: 1/0.07 x cosine at half resolution, upsampled x2 with aligned corners
    (and on to `size` for towers whose grid is not 1/16 of the input)."""
    logits = LOGIT_SCALE * jnp.einsum("byxe,ce->byxc", pix_BYXE, labels_CE.astype(jnp.float32))
    return resize_aligned(logits, tuple(size)) if logits.shape[1:3] != tuple(size) else logits


def cross_entropy(logits_BHWC: jax.Array, mask_BHW: jax.Array) -> tuple[jax.Array, dict]:
    """Mean per-pixel cross-entropy over the labelled pixels (mask == IGNORE left out)."""
    valid = mask_BHW != IGNORE
    logp = jax.nn.log_softmax(logits_BHWC.astype(jnp.float32), axis=-1)
    target = jnp.where(valid, mask_BHW, 0)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, nll, 0.0)) / count
    acc = jnp.sum(valid & (jnp.argmax(logits_BHWC, -1) == mask_BHW)) / count
    return loss, {"pixel_accuracy": acc}


# --- The task --------------------------------------------------------------------------


def settings(config) -> dict:
    from clipjax.heads import video

    return video.head_settings(config, DEFAULTS, "lseg")


def build_models(config):
    from clipjax.heads import video

    s = settings(config)
    model = video.build_model(LSeg, config, "LSeg", crop=config.data.image_size,
                              features=int(s["features"]), hooks=tuple(s["hooks"]),
                              readout_dims=tuple(s["readout_dims"]))
    return model.clone(train=True), model


def encode(model: LSeg):
    """Pixel embeddings of {"image"}; in training also the decoder's batch statistics."""
    from clipjax.train import device_images

    def fn(params, batch):
        img = device_images(batch["image"])
        if model.train:
            pix, stats = model.apply({"params": params}, img, method="pixel_embeddings",
                                     mutable=["batch_stats"])
            return pix, stats["batch_stats"]
        return model.apply({"params": params}, img, method="pixel_embeddings")

    return fn


def label_tokens(names, context_length: int, template: str = "{}") -> np.ndarray:
    from clipjax.tokenizer import tokenize

    return tokenize([template.format(n) for n in names], context_length)


def loss(model: LSeg, config, mesh):
    """Per-pixel cross-entropy over the training label list (the frozen text tower's
    embeddings of it, computed in the step without a gradient)."""
    from clipjax.heads import dense

    names = dense.train_classnames(config)
    keep = seen_classes(config, names)
    # Held-out classes (LSeg's zero-shot setting) leave the label list; their pixels are ignored.
    lut = np.full(len(names), IGNORE, np.int32)
    lut[keep] = np.arange(len(keep))
    lut = jnp.asarray(lut)
    tokens_CL = jnp.asarray(label_tokens([names[i] for i in keep],
                                         model.config.text.context_length,
                                         settings(config)["template"]))

    def fn(params, pix_BYXE, batch):
        labels_CE = model.apply({"params": jax.lax.stop_gradient(params)}, tokens_CL,
                                method="label_embeddings")
        mask = batch["mask"]
        mask = jnp.where(mask == IGNORE, IGNORE, lut[jnp.clip(mask, 0, len(names) - 1)])
        return cross_entropy(pixel_logits(pix_BYXE, labels_CE, mask.shape[1:3]), mask)

    return fn


def batch_keys(config) -> tuple[str, ...]:
    return ("image", "mask")


def seen_classes(config, names) -> list[int]:
    """Indices of the classes LSeg trains on: all but head.held_out_classes (by name)."""
    held = tuple(settings(config)["held_out_classes"])
    if unknown := [h for h in held if h not in names]:
        raise ValueError(f"head.held_out_classes names {unknown[0]!r}, which is not a class of "
                         f"the training data ({', '.join(names)}).")
    keep = [i for i, n in enumerate(names) if n not in held]
    if not keep:
        raise ValueError("head.held_out_classes holds out every class; leave some to train on.")
    return keep


def scorer(model: LSeg, template: str = "{}"):
    """(embed_labels(params, names) -> [C, E], scores(params, uint8 images, labels) -> logits
    [B, H, W, C]) for evaluation and `clipjax segment`."""
    from clipjax.train import device_images

    embed = jax.jit(lambda p, t: model.apply({"params": p}, t, method="label_embeddings"))

    def embed_labels(params, names, **_):
        return embed(params, jnp.asarray(label_tokens(names, model.config.text.context_length,
                                                      template)))

    def scores(params, img_BHWC, labels_CE):
        pix = model.apply({"params": params}, device_images(img_BHWC), method="pixel_embeddings")
        return pixel_logits(pix, labels_CE, img_BHWC.shape[1:3])

    return embed_labels, scores


SEGMENT_OPTIONS = dict(template="{}")
EXAMPLE_SOURCE = "ade20k:/data/ADEChallengeData2016?split=training"


def synthetic_options(config) -> dict:
    return {"fields": ("image", "mask")}


def real_data(config):
    from clipjax.data import segmentation

    s = settings(config)
    return segmentation.make_seg_iterator(
        config.data.source, global_batch_size=config.global_batch,
        crop_size=config.data.image_size, base_size=int(s["base_size"]), train=True,
        seed=config.seed, num_workers=config.data.num_workers)


def evaluators(config, dataset, spec: str, options: dict) -> dict:
    """The split scored with its own label words; on the built-in images also with
    synonyms LSeg never trained with ("disc" for circle, "hoop" for ring, ...)."""
    from clipjax.heads import dense

    synthetic = dense.is_synthetic(spec)
    if synthetic:
        from clipjax.data import synthetic_seg
    names = synthetic_seg.label_words("canonical") if synthetic else dataset.classnames
    held = [i for i in range(len(names)) if i not in seen_classes(config, names)]
    groups = {"unseen": held, "seen": [i for i in range(len(names)) if i not in held]} \
        if held else None
    out = {"seg": dense.evaluator(dataset, names, "seg", options, groups=groups)}
    if synthetic:
        out["seg_synonyms"] = dense.evaluator(dataset, synthetic_seg.label_words("synonym"),
                                              "seg_synonyms", options, groups=groups)
    return out


def next_command(config, workdir: str) -> str:
    data = config.eval.get("segmentation") or "synthetic"
    return f"clipjax eval segmentation --checkpoint {workdir} --dataset {data}"


def output_names(labels: list[str]) -> list[str]:
    """The classes a segmentation with `labels` assigns: the labels themselves."""
    return list(labels)
