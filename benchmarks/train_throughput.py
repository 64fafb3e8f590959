"""Train-step throughput: clipjax vs OpenCLIP (PyTorch), same batch, precision and machine.

    python benchmarks/train_throughput.py                         # ViT-B-32, batch 32, fp32 + bf16
    python benchmarks/train_throughput.py --precision fp32 --steps 8
    python benchmarks/train_throughput.py --device gpu --arch ViT-B-16 --batch 256  # CUDA builds

One full training step on each side, on one device: forward, symmetric InfoNCE, backward,
global-norm clipping to 1, AdamW (b2 0.98, eps 1e-6, weight decay 0.2 on matrices only)
and the logit-scale clamp. clipjax runs `train.make_train_step` (jitted, state donated,
default XLA optimisation level); OpenCLIP runs `open_clip.create_model(arch)` in train
mode with `ClipLoss` and `torch.optim.AdamW`, as open_clip_train does. Both sides get
the same batch (random pixels, tokenised captions).

Precision: fp32 is float32 everywhere (on GPU TF32 is switched off on both sides). bf16
is clipjax's `dtype=bfloat16` (matmul operands bf16, parameters, layer norms and softmax
float32) against `torch.autocast(device, dtype=torch.bfloat16)`, which casts the inputs
of linear / matmul / bmm / conv / scaled_dot_product_attention to bf16 and leaves
parameters float32.

Host memory: by default both sides run with freed memory kept in the process
(`clipjax.hostmem`, what `clipjax train` does on a CPU): one glibc malloc arena, no mmap,
no trimming. It is set before either framework allocates, so it applies to both; OpenCLIP
gains from it too. `--host-malloc system` keeps glibc's defaults, under which XLA:CPU
maps a fresh multi-GB block for every step's temporaries and page-faults all of it.

Steps of the two sides alternate after the warm-up, so both see the same machine load;
the figure is the median step. The matmul peak (square matmul, f32 and bf16 operands
with f32 accumulation) is measured in the same run on both frameworks, and MFU is model
FLOPs (`clip.train_flops`: 3 x an unscanned forward as XLA counts it) / step time / the
peak of that framework and precision; XLA's cost analysis of the compiled step is printed
beside it.
"""

import argparse
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import clipjax  # noqa: E402
import reference  # noqa: E402
from clipjax import hostmem, optim, sharding, train  # noqa: E402
from clipjax.models import clip  # noqa: E402

OPTIMIZER = {"lr": 5e-4, "warmup_steps": 10, "total_steps": 1000, "weight_decay": 0.2}
WORDS = ("a photo of the red small dog cat on in with near old city street beach tree "
         "under over blue green").split()


def setup_device(device: str, threads: int) -> None:
    """One backend for jax, torch threads = cores; must run before jax touches a backend."""
    jax.config.update("jax_platforms", "cuda" if device == "gpu" else "cpu")
    if device == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu needs a CUDA build of torch and a visible GPU "
                             "(torch.cuda.is_available() is False); run on a GPU machine.")
        try:
            jax.devices("gpu")
        except RuntimeError:
            raise SystemExit("--device gpu needs jax with CUDA (pip install 'jax[cuda12]'); "
                             "this jax has no GPU backend.") from None
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(threads)


def make_batch(batch: int, image_size: int, context_length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, rng.integers(5, 20))) for _ in range(batch)]
    return {"image": rng.standard_normal((batch, image_size, image_size, 3), np.float32),
            "text": np.asarray(clipjax.tokenize(captions, context_length), np.int32)}


# --- Matmul peak ----------------------------------------------------------------------


def matmul_peak(make_run: Callable[[int], Callable[[], None]], n_max: int,
                seconds: float = 3.0, reps: int = 7) -> tuple[float, int]:
    """(FLOP/s, n): the best of `reps` n x n matmuls, n = n_max unless the kernel is very slow.

    The best rather than the median, since a peak is what the machine can do when nothing
    else runs; a pathological kernel (bf16 without hardware support) gets a smaller n.
    """
    n = n_max
    while True:
        run = make_run(n)
        run()
        t = time.perf_counter()
        run()
        if n <= 256 or time.perf_counter() - t < seconds:
            break
        n //= 2
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, n


def jax_matmul(dtype) -> Callable[[int], Callable[[], None]]:
    precision = "highest" if dtype == jnp.float32 else None  # no TF32 on a GPU
    mm = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision,
                                      preferred_element_type=jnp.float32))

    def make(n):
        a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
        return lambda: mm(a, b).block_until_ready()

    return make


def torch_matmul(dtype, device: str) -> Callable[[int], Callable[[], None]]:
    """F.linear under autocast for bf16: the kernel OpenCLIP's layers reach."""
    dev = "cuda" if device == "gpu" else "cpu"

    def make(n):
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

        def run():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                torch.nn.functional.linear(a, b)
            if dev == "cuda":
                torch.cuda.synchronize()

        return run

    return make


def measure_peaks(device: str) -> dict[tuple[str, str], tuple[float, int]]:
    n_max = 8192 if device == "gpu" else 2048
    return {
        ("clipjax", "fp32"): matmul_peak(jax_matmul(jnp.float32), n_max),
        ("clipjax", "bf16"): matmul_peak(jax_matmul(jnp.bfloat16), n_max),
        ("openclip", "fp32"): matmul_peak(torch_matmul(torch.float32, device), n_max),
        ("openclip", "bf16"): matmul_peak(torch_matmul(torch.bfloat16, device), n_max),
    }


# --- The two training steps -----------------------------------------------------------


def clipjax_step(arch: str, batch_np: dict, precision: str):
    """(run one step, XLA's FLOPs per step, model config)."""
    model = clipjax.create_model(arch, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    optimizer = optim.create_optimizer(dict(OPTIMIZER), clipjax.abstract_params(model), arch=arch)
    shardings = train.state_shardings(model, optimizer, mesh)
    state = train.create_train_state(model, optimizer, jax.random.key(0), mesh)
    batch = sharding.shard_batch(batch_np, mesh)
    with jax.default_matmul_precision("highest" if precision == "fp32" else "default"):
        step = train.make_train_step(model, optimizer, mesh, shardings, loss="softmax")
        compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    box = [state]

    def run():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics))

    return run, float((cost or {}).get("flops", float("nan"))), model.config


def openclip_step(arch: str, batch_np: dict, precision: str, device: str):
    """Run one OpenCLIP step: open_clip_train's param groups, AdamW, ClipLoss, clip, clamp."""
    oc = reference.open_clip()
    dev = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(0)
    model = oc.create_model(arch, device=dev, output_dict=True).train()
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        excluded = p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if excluded else decay).append(p)
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": OPTIMIZER["weight_decay"]}],
                            lr=OPTIMIZER["lr"], betas=(0.9, 0.98), eps=1e-6)
    loss_fn = oc.ClipLoss()
    images = torch.from_numpy(batch_np["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
    text = torch.from_numpy(batch_np["text"]).long().to(dev)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(images, text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


def time_interleaved(runs: dict[str, Callable[[], None]], warmup: int, steps: int,
                     max_step_s: float = 0.0) -> dict[str, list[tuple[float, float, int]]]:
    """(wall s, process CPU s, minor page faults) of each timed step; the sides alternate.

    A side whose step takes longer than max_step_s (0: no limit) runs no more steps and
    keeps that one time, flagged by the report as an estimate.
    """
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runs}
    slow: set[str] = set()
    for i in range(warmup + steps):
        for name, run in runs.items():
            if name in slow:
                continue
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, c = time.perf_counter(), time.process_time()
            run()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            df = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
            if i >= warmup or (max_step_s and dt > max_step_s):
                times[name].append((dt, dc, df))
            if max_step_s and dt > max_step_s:
                slow.add(name)
            print(f"  {'warm-up' if i < warmup else 'step'} {i + 1:>2} {name:<9}{dt:8.2f} s "
                  f"(CPU {dc:6.2f} s, {df:>7} page faults, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    return times


# --- Report ---------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (XLA uses every core)")
    parser.add_argument("--max-step-s", type=float, default=300.0,
                        help="stop timing a side whose step exceeds this (0: never); torch's "
                        "bf16 step on a CPU without bf16 matmul units takes over 10 minutes")
    parser.add_argument("--host-malloc", default="retain", choices=["retain", "system"],
                        help="retain: keep freed host memory (both sides; clipjax train's CPU "
                        "default); system: glibc's defaults")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be at least 5 (the figure is a median).")
    retained = hostmem.configure(args.host_malloc)  # before either framework allocates

    setup_device(args.device, args.threads)
    dev = jax.devices()[0]
    print(f"{args.arch}, batch {args.batch}, {dev.device_kind} ({dev.platform}), "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {os.cpu_count()} cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"host malloc {'retained' if retained else 'glibc defaults'}")
    print(f"load average {os.getloadavg()}")
    peaks = measure_peaks(args.device)

    config = clipjax.get_config(args.arch)
    batch = make_batch(args.batch, config.vision.image_size, config.text.context_length)
    flops = clip.train_flops(clip.create_model(args.arch), args.batch)
    rows = []
    for precision in args.precision:
        print(f"\n{precision}: compiling clipjax (load {os.getloadavg()[0]:.1f})", flush=True)
        t = time.perf_counter()
        jax_run, xla_flops, _ = clipjax_step(args.arch, batch, precision)
        print(f"  compiled in {time.perf_counter() - t:.0f} s", flush=True)
        torch_run = openclip_step(args.arch, batch, precision, args.device)
        times = time_interleaved({"clipjax": jax_run, "openclip": torch_run}, args.warmup,
                                 args.steps, args.max_step_s)
        for side in ("clipjax", "openclip"):
            wall = [w for w, _, _ in times[side]]
            step_s = statistics.median(wall)
            rows.append({"precision": precision, "side": side, "step_s": step_s,
                         "n": len(wall), "lo": min(wall), "hi": max(wall),
                         "cpu_s": statistics.median(c for _, c, _ in times[side]),
                         "faults": statistics.median(f for _, _, f in times[side]),
                         "ips": args.batch / step_s,
                         "xla": xla_flops if side == "clipjax" else None})

    # Measured again after the steps, so that a load that came or went is seen by both.
    peaks = {k: max(v, w) for (k, v), w in zip(peaks.items(), measure_peaks(args.device).values())}
    machine = {p: max(peaks["clipjax", p][0], peaks["openclip", p][0]) for p in ("fp32", "bf16")}
    print("\nmatmul peak (best of 7 before and 7 after the steps, n x n, f32 accumulation)")
    for (side, prec), (rate, n) in peaks.items():
        print(f"  {'jax' if side == 'clipjax' else 'torch':<6}{prec:<6}{rate / 1e9:8.1f} GFLOP/s"
              f"  n={n}")
    print(f"\nmodel FLOPs/step {flops / 1e12:.3f} TFLOP (clip.train_flops: 3 x forward); "
          f"load average at end {os.getloadavg()}")
    print(f"{'precision':<10}{'side':<10}{'steps':>6}{'median s':>10}{'min-max s':>14}"
          f"{'CPU s':>7}{'faults':>9}{'img/s':>8}{'MFU':>7}{'XLA TFLOP':>10}{'ratio':>8}")
    for row in rows:
        other = next(r for r in rows if r["precision"] == row["precision"] and r is not row)
        estimate = min(row["n"], other["n"]) < args.steps
        ratio = (("~" if estimate else "") + f"{row['ips'] / other['ips']:.2f}x"
                 if row["side"] == "clipjax" else "")
        xla = f"{row['xla'] / 1e12:.3f}" if row["xla"] else ""
        row["mfu"] = flops / row["step_s"] / machine[row["precision"]]
        print(f"{row['precision']:<10}{row['side']:<10}{row['n']:>6}{row['step_s']:10.2f}"
              f"{row['lo']:8.2f}-{row['hi']:<5.2f}{row['cpu_s']:7.1f}{row['faults']:9.0f}"
              f"{row['ips']:8.2f}"
              f"{row['mfu']:7.1%}{xla:>10}{ratio:>8}")
    print("ratio: clipjax img/s / OpenCLIP img/s (~: a side ran fewer steps than asked, over "
          "--max-step-s).\nCPU s: process CPU time of the median step, all threads; well "
          "under cores x wall means other processes held the cores.\nfaults: minor page faults "
          "of the median step (memory mapped afresh and touched).\nMFU: model FLOPs / "
          f"median step / the machine's peak at that precision (fp32 "
          f"{machine['fp32'] / 1e9:.0f}, bf16 {machine['bf16'] / 1e9:.0f} GFLOP/s, the faster "
          "framework's).")


if __name__ == "__main__":
    main()
