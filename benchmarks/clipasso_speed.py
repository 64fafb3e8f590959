"""CLIPasso's optimisation step: speed, how it grows with strokes and canvas, memory, devices.

    python benchmarks/clipasso_speed.py                 # RN101-sized tower, ~15 min on 2 cores
    python benchmarks/clipasso_speed.py --tower RN-tiny       # a smoke run

One step is what `clipjax sketch` repeats up to 2001 times a sketch: draw the strokes, warp
sketch and photo 4 times together, run the frozen ResNet on the 5 sketch views (forward and
backward) and the 5 photo views (forward), one Adam update. The tower has random weights
(speed does not depend on their values). Each figure is the median of a few steps after
the compile; the memory is XLA's compiled memory analysis of the step (temporaries a row:
a sketch x seed). The device comparison spreads a batch of images x seeds over 8
simulated CPU devices (the same cores: this shows the overhead of sharding, not a
speed-up) against one.
"""

import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def random_params(tower, seed: int = 0):
    """He-normal convolutions and identity BatchNorm, without compiling the init."""
    import flax.linen as nn

    shapes = nn.meta.unbox(jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros(
        (1, tower.image_size, tower.image_size, 3)))["params"])
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']") or name.endswith("['scale']"):
            return np.ones(x.shape, np.float32)
        if name.endswith("['mean']") or name.endswith("['bias']"):
            return np.zeros(x.shape, np.float32)
        fan_in = int(np.prod(x.shape[:-1])) or 1
        return (rng.standard_normal(x.shape) * np.sqrt(2.0 / fan_in) * 0.5).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def measure(tower, params, canvas: int, strokes: int, rows: int = 1, mesh=None,
            steps: int = 3) -> dict:
    """Compile time, median step time and memory of `rows` sketches at once."""
    from clipjax import sharding
    from clipjax.heads import clipasso

    s = clipasso.Settings(strokes=strokes)
    _, step = clipasso.step_fns(tower, clipasso.untraced(s), canvas)
    rng = np.random.default_rng(0)
    state = clipasso.init_state(rng.uniform(0, canvas, (rows, strokes, 4, 2)), s)
    photos = jnp.asarray(rng.uniform(size=(rows, canvas, canvas, 3)), jnp.float32)
    seeds = jnp.arange(rows, dtype=jnp.uint32)
    if mesh is not None:
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
        state = jax.tree.map(lambda x: put(x) if x.ndim else x, state)
        photos, seeds = put(photos), put(seeds)
        params = jax.device_put(params, sharding.replicated(mesh))
    t0 = time.perf_counter()
    compiled = step.lower(params, state, photos, seeds, 0).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state = compiled(params, state, photos, seeds, i)
        jax.block_until_ready(state.strokes)
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "step_s": float(np.median(times)),
            "temp_bytes": int(mem.temp_size_in_bytes) if mem else 0,
            "arg_bytes": int(mem.argument_size_in_bytes) if mem else 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tower", default="RN101", help="ResNet CLIP architecture (random weights)")
    p.add_argument("--steps", type=int, default=3, help="timed steps a measurement")
    p.add_argument("--devices-tower", default="RN-tiny", help="tower of the device comparison "
                   "(RN101 x 24 rows is minutes a step on a laptop)")
    p.add_argument("--images", type=int, default=8, help="images in the device comparison")
    args = p.parse_args()

    from clipjax import sharding
    from clipjax.heads import clipasso
    from clipjax.models import variants

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"{jax.device_count()} devices (8 simulated on CPU)")
    tower = clipasso.tower_of(variants.get_config(args.tower))
    params = random_params(tower)
    nparams = sum(x.size for x in jax.tree.leaves(params))
    print(f"tower {args.tower}: {nparams / 1e6:.1f} M parameters, {tower.image_size} px input")
    one = sharding.create_mesh(devices=jax.devices()[:1])

    base = measure(tower, params, 224, 16, steps=args.steps)
    print(f"\n16 strokes, 224 px, one sketch: {1 / base['step_s']:.3f} it/s "
          f"({base['step_s']:.2f} s/it; compile {base['compile_s']:.0f} s); 2001 iterations "
          f"= {2001 * base['step_s'] / 60:.1f} min a seed")
    print(f"memory: {base['temp_bytes'] / 2**20:.0f} MiB of temporaries a sketch, "
          f"{base['arg_bytes'] / 2**20:.0f} MiB of arguments (the frozen tower is "
          f"{4 * nparams / 2**20:.0f} MiB)")

    print("\nstrokes  s/it    x16-strokes  temp MiB")
    for n in (8, 16, 32, 64):
        r = base if n == 16 else measure(tower, params, 224, n, steps=args.steps)
        print(f"{n:>7}  {r['step_s']:6.2f}  {r['step_s'] / base['step_s']:11.2f}  "
              f"{r['temp_bytes'] / 2**20:8.0f}")
    print("\ncanvas  s/it    x224-canvas  temp MiB   (views resized to the tower's input)")
    for c in (112, 224, 448):
        r = base if c == 224 else measure(tower, params, c, 16, steps=args.steps)
        print(f"{c:>6}  {r['step_s']:6.2f}  {r['step_s'] / base['step_s']:11.2f}  "
              f"{r['temp_bytes'] / 2**20:8.0f}")
    rows3 = measure(tower, params, 224, 16, rows=3, steps=args.steps)
    print(f"\n3 seeds at once: {rows3['step_s']:.2f} s/it ({rows3['step_s'] / base['step_s']:.2f}x "
          f"one), temporaries {rows3['temp_bytes'] / 3 / 2**20:.0f} MiB a sketch")

    small = clipasso.tower_of(variants.get_config(args.devices_tower))
    small_params = random_params(small)
    rows = args.images * 3
    canvas = small.image_size
    print(f"\n{args.images} images x 3 seeds = {rows} rows, {args.devices_tower} tower, "
          f"{canvas} px, 16 strokes:")
    out = {}
    for name, mesh in (("1 device", one), ("8 devices", sharding.create_mesh())):
        padded = -(-rows // sharding.batch_size(mesh)) * sharding.batch_size(mesh)
        r = measure(small, small_params, canvas, 16, rows=padded, mesh=mesh, steps=args.steps)
        out[name] = r
        sketches = args.images / (2001 * r["step_s"])
        per_device = padded // mesh.size
        print(f"  {name:<9}: {r['step_s']:.3f} s/it for {padded} rows -> {sketches:.4f} "
              f"sketches/s ({sketches * 3600:.1f} an hour at 2001 iterations, 3 seeds); "
              f"{r['temp_bytes'] / per_device / 2**20:.1f} MiB of temporaries a row on a device")
    ratio = out["1 device"]["step_s"] / out["8 devices"]["step_s"]
    print(f"  8 devices / 1 device speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
