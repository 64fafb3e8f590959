"""The device mesh, the logical-axis rule table, and the shardings of state and batch.

Parameters carry logical axis names (models/layers.py); `RULES` maps each name to a mesh
axis. Every other sharding in clipjax follows from this table and the batch axes.
"""

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from clipjax.models import clip, layers

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = layers.BATCH_AXES  # ("data", "fsdp"); parameters are split over fsdp only

# Logical axis -> mesh axis (None: replicated). FSDP shards every matrix along its
# residual width; tensor parallelism splits heads, MLP, vocabulary and conv outputs.
RULES: tuple[tuple[str, str | None], ...] = (
    (layers.EMBED, "fsdp"),
    (layers.MLP, "tensor"),
    (layers.HEADS, "tensor"),
    (layers.KV, None),
    (layers.QKV, None),
    (layers.VOCAB, "tensor"),
    (layers.JOINT, "tensor"),
    (layers.POSITIONS, None),
    (layers.LAYERS, None),
    (layers.CONV_IN, "fsdp"),
    (layers.CONV_OUT, "tensor"),
    (layers.CONV_SPATIAL, None),
)


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (fills)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: give positive "
                         "sizes with at most one -1 (which fills the remaining devices).")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with "
                             f"data={data}, fsdp={fsdp}, tensor={tensor}; make the fixed "
                             f"sizes divide {len(devices)}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices but {len(devices)} are present; set "
                         "one size to -1 to fill.")
    # Auto axes: jit propagates the shardings we annotate (Explicit is make_mesh's default).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def mesh_from_config(config: Mapping[str, Any]) -> Mesh:
    """The mesh described by a config's `mesh` entry ({data, fsdp, tensor})."""
    return create_mesh(**{k: int(config[k]) for k in ("data", "fsdp", "tensor") if k in config})


def batch_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, str | None]] = RULES) -> P:
    """The PartitionSpec of one array from its logical names.

    A dimension that the mesh axis does not divide stays replicated, and a mesh axis is
    used at most once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to "
                             "clipjax.sharding.RULES (map it to a mesh axis or None).")
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def logical_to_mesh(logical, abstract, mesh: Mesh, rules=RULES):
    """PartitionSpecs for a tree of logical specs and the matching tree of shapes."""
    return jax.tree.map(lambda names, x: spec_for(tuple(names), x.shape, mesh, rules),
                        logical, abstract, is_leaf=lambda x: isinstance(x, P))


def param_shardings(model: nn.Module, mesh: Mesh, rules=RULES):
    """NamedShardings for every parameter of a clipjax model, from its logical axes."""
    specs = logical_to_mesh(clip.logical_axes(model), clip.abstract_params(model), mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def optimizer_shardings(optimizer, abstract_params, shardings, mesh: Mesh):
    """Optimizer-state shardings: parameter-shaped leaves follow their parameter."""
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    # Frozen leaves keep no moments (optax.MaskedNode); their placeholder stays in place.
    return optax.tree_map_params(
        optimizer, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, abstract_state,
        shardings, transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, shardings) -> Any:
    """Runs `init_fn(rng)` so that every output is created directly in its sharding."""
    return jax.jit(init_fn, out_shardings=shardings)(rng)


def init_params(model: nn.Module, rng: jax.Array, mesh: Mesh, rules=RULES):
    """The model's parameters, created sharded; no device ever holds the whole model."""
    def init(key):
        return nn.meta.unbox(model.init(key, *clip.dummy_inputs(model))["params"])

    return init_sharded(init, rng, param_shardings(model, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows over data x fsdp; every other dimension replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    n = batch_size(mesh)
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} does not divide over the {n} batch "
                         f"shards of the mesh (data x fsdp = {n}); use a multiple of {n}.")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this host's rows (every host passes its own, equally many)."""
    out = {}
    for name, local in batch.items():
        local = np.asarray(local)
        global_rows = local.shape[0] * jax.process_count()
        if global_rows % batch_size(mesh):
            raise ValueError(f"batch entry {name!r} has {local.shape[0]} rows on each of "
                             f"{jax.process_count()} host(s), {global_rows} in all, which does "
                             f"not divide over the {batch_size(mesh)} batch shards of the mesh; "
                             f"use a global batch that is a multiple of {batch_size(mesh)}.")
        out[name] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, local.ndim), local, (global_rows, *local.shape[1:]))
    return out
