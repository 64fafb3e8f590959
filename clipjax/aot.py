"""Plan a pod run from a laptop: compile the real train step for a TPU topology, ahead of time.

    clipjax compile --config clip_vit_b16 --topology v5e-256

libtpu (`pip install "clipjax[tpu]"`) compiles for a described topology on any machine; no
TPU is needed. The report is XLA's own per-chip accounting of the compiled step.
"""

import os
import re

import jax
import jax.numpy as jnp

from clipjax import heads, optim, sharding, train
from clipjax.models import clip

GIB = 2**30
# HBM per JAX device. v4 and v5p topologies list one device per chip (megacore).
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# Slice names (cores for v4/v5p, chips for v5e/v6e) -> the topology shape in chips.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


def topology_name(name: str) -> str:
    """"v5e-256" / "v5p-128" / "v4-32" / "v6e-16" (Cloud TPU slice names) or "v5e:16x16"."""
    if ":" in name:
        return name
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"TPU topology {name!r} not understood; write a slice name such as "
                         "v5e-256, v5p-128, v4-32, v6e-16, or a shape such as v5e:16x16.")
    kind, n = m.group(1).replace("v5litepod", "v5e"), int(m.group(2))
    chips, table = ((n // 2, _SHAPES_3D) if kind in ("v4", "v5p") else (n, _SHAPES_2D))
    if chips not in table:
        raise ValueError(f"no standard {kind} slice with {n} {'cores' if kind in ('v4', 'v5p') else 'chips'}; "
                         f"try one of: {', '.join(f'{kind}-{c * (2 if table is _SHAPES_3D else 1)}' for c in table)}.")
    return f"{kind}:{table[chips]}"


def topology_devices(name: str):
    """The devices of a TPU topology described, not attached (libtpu compiles for them)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = topology_name(name)  # a bad name is reported before libtpu is looked for
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(name, "tpu").devices
    except (ImportError, RuntimeError) as e:
        # jax says "JAX TPU support not installed" when libtpu is missing.
        if "not installed" in str(e) or "libtpu" in str(e).lower():
            raise ImportError('compiling for a TPU topology needs libtpu, which is not '
                              'installed: pip install "clipjax[tpu]".') from None
        raise


def abstract_step(config, devices):
    """(model, mesh, jitted train step, abstract sharded TrainState, abstract batch): all a
    compile needs, allocating nothing."""
    mesh = sharding.create_mesh(**{k: int(config.mesh[k]) for k in ("data", "fsdp", "tensor")},
                                devices=devices)
    task = heads.get_task(config)
    model, _ = task.build_models(config)
    sharding.check_global_batch(config.global_batch, mesh)
    steps = max(train.total_steps(config) if config.total_steps or config.data.num_examples
                else 10_000, config.optimizer.warmup_steps + 1)
    optimizer = optim.create_optimizer(train.optimizer_config(config, task, steps),
                                       clip.abstract_params(model), arch=config.model)
    shardings = train.state_shardings(model, optimizer, mesh)
    state = jax.eval_shape(lambda: train.TrainState(
        step=jnp.zeros((), jnp.int32), params=clip.abstract_params(model),
        opt_state=optimizer.init(clip.abstract_params(model))))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    size = getattr(model, "crop", model.config.vision.image_size)  # a dense head's crop
    ctx = config.data.context_length
    b = config.global_batch
    # Images and clips travel as uint8 and are normalised on the device.
    shapes = {"image": ((b, size, size, 3), jnp.uint8), "text": ((b, ctx), jnp.int32),
              "label": ((b,), jnp.int32), "frame_mask": ((b, getattr(model, "frames", 0)), bool),
              "video": ((b, getattr(model, "frames", 0), size, size, 3), jnp.uint8),
              "mask": ((b, size, size), jnp.int32),
              "prompts": ((b, getattr(model, "prompts", 0), ctx), jnp.int32),
              "rng": ((b,), jnp.uint32)}
    keys = task.batch_keys(config)
    if "prompts" in keys:
        from clipjax.heads import groupvit

        k = int(groupvit.settings(config)["multi_label"])
        shapes["prompts"] = ((b, k, ctx), jnp.int32)
    if "positive_map" in keys:  # GLIP: prompts, padded boxes and their token maps
        from clipjax.heads import glip

        m, ctx = int(glip.settings(config)["max_boxes"]), glip.context_length(config)
        shapes.update(tokens=((b, ctx), jnp.int32), boxes=((b, m, 4), jnp.float32),
                      box_mask=((b, m), bool), positive_map=((b, m, ctx), jnp.float32))
    batch = {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1],
                                     sharding=sharding.batch_sharding(mesh, len(shapes[k][0])))
             for k in keys}
    step = train.make_train_step(
        model, optimizer, mesh, shardings, loss=config.loss, accum_steps=config.accum_steps,
        loss_options={"tile": config.loss_tile} if config.loss in ("tiled", "sigmoid_ring") else {},
        batch_keys=keys, task=task, config=config)
    return model, mesh, step, state, batch


def compile_train_step(config, topology: str) -> dict:
    """Per-chip memory and FLOPs of `config`'s train step compiled for `topology`."""
    devices = topology_devices(topology)
    model, mesh, step, abstract, batch = abstract_step(config, devices)
    b = config.global_batch
    kind = devices[0].device_kind
    hbm = next((v for k, v in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0]))
                if kind.startswith(k)), None)
    head = {"topology": topology_name(topology), "device_kind": kind, "chips": len(devices),
            "mesh": dict(mesh.shape), "model": config.model, "global_batch": b,
            "task": config.get("task", "clip"), "frames": getattr(model, "frames", 0),
            "accum_steps": config.accum_steps, "hbm_gib": hbm,
            "loss": {"lseg": "pixel cross-entropy", "glip": "token focal + GIoU + centerness"}.get(
                config.get("task"), config.loss),
            "tflops_per_step": clip.train_flops(model, b) / 1e12}
    try:
        compiled = step.lower(abstract, batch).compile()
    except Exception as e:  # XLA:TPU refuses a program that cannot fit: report, not raise
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**head, **_exhausted(str(e))}
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return {
        **head,
        "arguments_gib": mem.argument_size_in_bytes / GIB,
        "outputs_gib": mem.output_size_in_bytes / GIB,
        "aliased_gib": mem.alias_size_in_bytes / GIB,
        "temporaries_gib": mem.temp_size_in_bytes / GIB, "total_gib": total / GIB,
        "fits": None if hbm is None else total <= hbm * GIB,
    }


_SIZE = r"([\d.]+)([KMGTP]?)"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _exhausted(message: str) -> dict:
    """The figure XLA:TPU gives when a program exceeds HBM.

    Its messages read "... HLO temporaries (2.08P) exceeds available HBM (15.75G)" or
    "Used 120.5G of 15.75G hbm".
    """
    m = (re.search(r"\(" + _SIZE + r"\) exceeds available HBM", message)
         or re.search(_SIZE + r" of " + _SIZE + r" hbm", message))
    used = float(m.group(1)) * _UNITS[m.group(2)] / GIB if m else float("nan")
    return {"arguments_gib": float("nan"), "outputs_gib": float("nan"),
            "aliased_gib": float("nan"), "temporaries_gib": float("nan"), "total_gib": used,
            "fits": False,
            "error": message.strip().splitlines()[0][:300]}


def format_report(r: dict) -> str:
    what = r["model"] if r.get("task", "clip") == "clip" else f"{r['task']} {r['model']}" + (
        f", {r['frames']} frames a clip" if r.get("frames") else "")
    lines = [
        f"{what} on {r['topology']} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}",
        f"global batch {r['global_batch']:,}, accum_steps {r['accum_steps']}, loss {r['loss']}",
    ]
    if "error" in r:
        return "\n".join(lines + [f"DOES NOT FIT: XLA needs about {r['total_gib']:.2f} GiB per "
                                  f"chip of {r['hbm_gib']} GiB HBM ({r['error']})"])
    fits = {True: "fits", False: "DOES NOT FIT", None: "unknown HBM"}[r["fits"]]
    return "\n".join(lines + [
        f"per chip: arguments {r['arguments_gib']:.2f} GiB, outputs {r['outputs_gib']:.2f} GiB "
        f"(donated/aliased {r['aliased_gib']:.2f}), temporaries {r['temporaries_gib']:.2f} GiB",
        f"per chip total {r['total_gib']:.2f} GiB of {r['hbm_gib']} GiB HBM: {fits}",
        f"{r['tflops_per_step']:.3g} model TFLOPs per step (3 x forward, remat not counted) "
        f"({r['tflops_per_step'] * 1e12 / r['global_batch'] / 1e9:.3g} GFLOPs per example)",
    ])
