"""Jitted, mesh-sharded encoders and the batching that every evaluator shares.

Rows (images, token ids) are split over the mesh's batch axes; a partial batch is padded to
the fixed batch size, so each encoder compiles once, and the padded rows are dropped from
the results. Results come back to every host as NumPy arrays.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from clipjax import sharding
from clipjax.tokenizer import tokenize

Params = Any
EncodeFn = Callable[[Params, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Encoders:
    """What an evaluator needs from a model: jitted encoders and their input sizes.

    encode_image(params, img_BHWC) -> unit-norm img_BE; encode_text(params, tokens_BL) ->
    unit-norm txt_BE; image_features(params, img_BHWC) -> unnormalised feature_BD for linear
    probes (a ViT's class token before the projection, a ResNet's attention-pool output).
    """

    encode_image: EncodeFn
    encode_text: EncodeFn
    image_features: EncodeFn
    image_size: int
    context_length: int
    mesh: Mesh
    batch_size: int = 256  # global rows per call; a multiple of the mesh's batch shards


def make_encoders(model, mesh: Mesh | None = None, batch_size: int = 256) -> Encoders:
    """Encoders for a clipjax CLIP module, sharded over `mesh` (default: all devices, data)."""
    mesh = sharding.create_mesh() if mesh is None else mesh
    shards = sharding.batch_size(mesh)
    batch_size = -(-batch_size // shards) * shards
    out = sharding.batch_sharding(mesh, 2)

    def apply(method: str, normalize: bool | None):
        kwargs = {} if normalize is None else {"normalize": normalize}
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method, **kwargs),
                       out_shardings=out)

    def features(p, img_BHWC):
        emb_BE, feats = model.apply({"params": p}, img_BHWC, method="image_features")
        # A ViT's class token after ln_post is the paper's linear-probe feature; a ResNet's
        # attention pool already is its last layer.
        return emb_BE if "tokens" not in feats else feats["tokens"][:, 0]

    v, t = model.config.vision, model.config.text
    return Encoders(apply("encode_image", True), apply("encode_text", True),
                    jax.jit(features, out_shardings=out), v.image_size, t.context_length, mesh,
                    batch_size)


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _any_host(flag: bool) -> bool:
    """True when `flag` is set on any host (hosts must agree on how many steps to run)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _chunks(batches: Iterable[Mapping[str, np.ndarray]], rows: int) -> Iterator[dict]:
    """Regroup host batches into chunks of `rows` rows (the last may be short), each with a
    boolean "valid" entry."""
    pending: list[dict] = []
    have = 0

    def take(n: int) -> dict:
        nonlocal pending, have
        out, left, rest = [], n, []
        for b in pending:
            k = len(b["valid"])
            if left >= k:
                out.append(b)
                left -= k
            elif left > 0:
                out.append({key: v[:left] for key, v in b.items()})
                rest.append({key: v[left:] for key, v in b.items()})
                left = 0
            else:
                rest.append(b)
        pending, have = rest, have - (n - left)
        return {key: np.concatenate([b[key] for b in out]) for key in out[0]}

    for batch in batches:
        b = {k: np.asarray(v) for k, v in batch.items()}
        b["valid"] = np.ones(len(next(iter(b.values()))), bool)
        pending.append(b)
        have += len(b["valid"])
        while have >= rows:
            yield take(rows)
    if have:
        yield take(have)


def run_rows(fn: Callable, params: Params, batches: Iterable[Mapping[str, np.ndarray]],
             keys: Sequence[str], mesh: Mesh, batch_size: int,
             progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """fn(params, *batch[keys]) over host-local rows, `batch_size` global rows per call.

    Returns {"out": [N, ...]} plus every other entry of the batches (labels, indices),
    gathered alongside in the same row order so that all hosts' results line up; padding
    rows are dropped.
    """
    local = batch_size // jax.process_count()
    outs: dict[str, list[np.ndarray]] = {}
    it = _chunks(batches, local)
    template = None
    while True:
        chunk = next(it, None)
        if not _any_host(chunk is not None):
            break
        if chunk is None:  # this host ran out first: feed padding so the others can go on
            chunk = {k: v.copy() for k, v in template.items()}
            chunk["valid"][:] = False
        template = chunk
        if len(chunk["valid"]) < local:
            pad = local - len(chunk["valid"])
            chunk = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in chunk.items()}
            chunk["valid"][-pad:] = False
        inputs = sharding.shard_batch({k: chunk[k] for k in keys}, mesh)
        y = _gather(fn(params, *[inputs[k] for k in keys]))
        rest = {k: v for k, v in chunk.items() if k not in keys}
        if jax.process_count() > 1:
            rest = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                    for k, v in rest.items()}
        valid = rest.pop("valid")
        outs.setdefault("out", []).append(y[valid])
        for k, v in rest.items():
            outs.setdefault(k, []).append(v[valid])
        if progress is not None:
            progress(int(chunk["valid"].sum()))
    if not outs:
        return {"out": np.zeros((0,), np.float32)}
    return {k: np.concatenate(v) for k, v in outs.items()}


def embed_images(encoders: Encoders, params: Params,
                 batches: Iterable[Mapping[str, np.ndarray]], features: bool = False,
                 progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """{"embedding": unit-norm [N, E] (or "features" [N, D]), plus each batch's other entries}.

    `batches` yield host-local {"image": f32 [b, S, S, 3], ...} of any size b.
    """
    fn = encoders.image_features if features else encoders.encode_image
    out = run_rows(fn, params, batches, ["image"], encoders.mesh, encoders.batch_size, progress)
    out["features" if features else "embedding"] = out.pop("out").astype(np.float32)
    return out


def host_share(rows: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's contiguous share of each global batch of rows that every host holds alike;
    run_rows's gather puts the shares back in order."""
    p, n = jax.process_index(), jax.process_count()
    total = len(next(iter(rows.values())))
    for lo in range(0, total, batch_size):
        hi = min(lo + batch_size, total)
        per = -(-(hi - lo) // n)
        a, b = lo + p * per, min(lo + (p + 1) * per, hi)
        if a < b:
            yield {k: v[a:b] for k, v in rows.items()}


def embed_texts(encoders: Encoders, params: Params, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm txt_TE for texts that every host holds alike (prompts, captions)."""
    index = {"i": np.arange(len(texts))}
    batches = ({"tokens": tokenize([texts[i] for i in b["i"]], encoders.context_length)}
               for b in host_share(index, encoders.batch_size))
    out = run_rows(encoders.encode_text, params, batches, ["tokens"], encoders.mesh,
                   encoders.batch_size)["out"]
    return out.astype(np.float32).reshape(len(texts), -1)
