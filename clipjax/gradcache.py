"""Loss and gradients over the whole global batch, with exact gradient caching.

A model enters training as two functions:
  encode(params, batch) -> embeddings (any pytree of [B, ...] arrays, e.g. (img_BE, txt_BE))
  loss_on_embeddings(params, embeddings, batch) -> (loss, metrics)
The loss sees the embeddings of the whole global batch, so contrastive losses stay exact
whatever the micro-batch size.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import sharding

Encode = Callable[[Any, dict], Any]
LossOnEmbeddings = Callable[[Any, Any, dict], tuple[jax.Array, dict]]


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
