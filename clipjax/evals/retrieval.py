"""Image <-> text retrieval recall@K with several captions per image (COCO / Flickr30k style).

Text -> image: a caption's query succeeds at K when its own image is among the K images
that score highest. Image -> text: an image's query succeeds at K when any of its captions
is among the K captions that score highest. Equal scores are ordered by index (a stable
sort), so results do not depend on the hardware's tie-breaking.

Scores are computed one chunk of queries at a time against all candidates, so memory is
chunk x candidates, never queries x candidates: 25k images x 125k captions at E=512 needs
the two embedding tables (0.3 GB) and one 512 x 125k score block (0.25 GB).
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clipjax import sharding
from clipjax.evals.encoders import (Encoders, Params, embed_images, embed_texts, host_share,
                                     run_rows)

KS = (1, 5, 10)


def _dot(q_bE, c_NE):
    return jnp.dot(q_bE, c_NE.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _t2i(cols, txt_bE, img_of_b):
    img_NE, = cols
    s_bN = _dot(txt_bE, img_NE)
    s_true = jnp.take_along_axis(s_bN, img_of_b[:, None], axis=1)
    before = jnp.arange(s_bN.shape[1])[None] < img_of_b[:, None]
    return (s_bN > s_true).sum(1) + ((s_bN == s_true) & before).sum(1)


@jax.jit
def _i2t(cols, img_bE, id_b):
    txt_TE, img_of_T = cols
    s_bT = _dot(img_bE, txt_TE)
    pos_bT = img_of_T[None] == id_b[:, None]
    # The best-scoring own caption (the first of equals) is where the image's hit lands.
    best_t = jnp.argmax(jnp.where(pos_bT, s_bT, -jnp.inf), axis=1)
    best = jnp.take_along_axis(s_bT, best_t[:, None], axis=1)
    before = jnp.arange(s_bT.shape[1])[None] < best_t[:, None]
    return (s_bT > best).sum(1) + ((s_bT == best) & before).sum(1)


def _ranks(fn, cols, queries: Mapping[str, np.ndarray], mesh: Mesh, chunk: int) -> np.ndarray:
    cols = jax.device_put(cols, sharding.replicated(mesh))
    shards = sharding.batch_size(mesh)
    chunk = -(-chunk // shards) * shards
    keys = list(queries)
    return run_rows(fn, cols, host_share(queries, chunk), keys, mesh, chunk)["out"]


def ranks(img_NE: np.ndarray, txt_TE: np.ndarray, img_of_T: np.ndarray, mesh: Mesh | None = None,
          chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(i2t rank of each image [N], t2i rank of each caption [T]); rank 0 is a hit at R@1.

    `img_of_T[t]` is the image index of caption t. Embeddings should be unit-norm.
    """
    img_of_T = np.asarray(img_of_T, np.int32)
    n = len(img_NE)
    if len(txt_TE) != len(img_of_T):
        raise ValueError(f"{len(txt_TE)} caption embeddings but {len(img_of_T)} caption-to-image "
                         "indices; give one image index per caption.")
    if len(img_of_T) and (img_of_T.min() < 0 or img_of_T.max() >= n):
        raise ValueError(f"Caption image indices must lie in [0, {n}); some lie outside, so "
                         "captions and images do not line up.")
    if missing := n - len(np.unique(img_of_T)):
        raise ValueError(f"{missing} of {n} images have no caption; every image needs at least "
                         "one for image-to-text recall.")
    mesh = sharding.create_mesh() if mesh is None else mesh
    img_NE, txt_TE = np.asarray(img_NE, np.float32), np.asarray(txt_TE, np.float32)
    i2t = _ranks(_i2t, (txt_TE, img_of_T), {"q": img_NE, "id": np.arange(n, dtype=np.int32)},
                 mesh, chunk)
    t2i = _ranks(_t2i, (img_NE,), {"q": txt_TE, "id": img_of_T}, mesh, chunk)
    return i2t, t2i


def recall(rank_Q: np.ndarray, k: int) -> float:
    return float((rank_Q < k).mean()) if len(rank_Q) else 0.0


@dataclasses.dataclass
class Result:
    i2t_ranks: np.ndarray  # [N]
    t2i_ranks: np.ndarray  # [T]

    def metrics(self, prefix: str = "retrieval", ks: Sequence[int] = KS) -> dict[str, float]:
        out = {f"{prefix}/i2t_R@{k}": recall(self.i2t_ranks, k) for k in ks}
        out.update({f"{prefix}/t2i_R@{k}": recall(self.t2i_ranks, k) for k in ks})
        return out

    def curve(self, max_k: int = 50) -> dict[str, list[float]]:
        """Recall@K for K = 1..max_k, each direction."""
        ks = range(1, max_k + 1)
        return {"k": list(ks), "i2t": [recall(self.i2t_ranks, k) for k in ks],
                "t2i": [recall(self.t2i_ranks, k) for k in ks]}

    def to_json(self) -> dict:
        return {"num_images": len(self.i2t_ranks), "num_captions": len(self.t2i_ranks),
                **{k.split("/", 1)[1]: v for k, v in self.metrics().items()},
                "curve": self.curve()}


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """(every caption, the image index of each) from per-image caption lists."""
    texts, img_of_T = [], []
    for i, caps in enumerate(captions):
        texts += list(caps)
        img_of_T += [i] * len(caps)
    return texts, np.asarray(img_of_T, np.int32)


def evaluate(encoders: Encoders, params: Params, batches: Iterable[Mapping[str, np.ndarray]],
             captions: Sequence[Sequence[str]], chunk: int = 512,
             progress: Callable[[int], None] | None = None) -> Result:
    """Recall of images from `batches` ({"image", "index"}: row i of the dataset) and
    `captions[i]`, the captions of image i."""
    out = embed_images(encoders, params, batches, progress=progress)
    if "index" not in out:
        raise ValueError("The retrieval data yielded no images; check the image paths.")
    img_NE = np.zeros((len(captions), out["embedding"].shape[1]), np.float32)
    img_NE[out["index"]] = out["embedding"]
    if len(np.unique(out["index"])) != len(captions):
        raise ValueError(f"{len(np.unique(out['index']))} images were embedded for "
                         f"{len(captions)} caption lists; give one image per caption list.")
    texts, img_of_T = flatten_captions(captions)
    txt_TE = embed_texts(encoders, params, texts)
    return Result(*ranks(img_NE, txt_TE, img_of_T, encoders.mesh, chunk))


def evaluator(batches: Callable[[Encoders], Iterable[Mapping[str, np.ndarray]]],
              captions: Sequence[Sequence[str]], name: str = "retrieval"):
    """An Evaluator over images ({"image", "index"} from `batches(encoders)`) and captions."""
    def run(encoders: Encoders, params: Params) -> dict[str, float]:
        return evaluate(encoders, params, batches(encoders), captions).metrics(name)

    return run
