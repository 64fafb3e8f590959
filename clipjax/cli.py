"""The `clipjax` command; each subcommand is a thin wrapper over an importable function."""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import jax

from clipjax.data import cli as data_cli
from clipjax.evals import cli as evals_cli
from clipjax.heads import cli as heads_cli
from clipjax.models import variants


def model_info(arch: str, flops: bool = True) -> dict:
    """Parameter counts per tower and, with `flops`, forward GFLOPs per image and per caption.

    Counts come from abstract shapes (nothing is allocated, so the largest models work);
    FLOPs from XLA's cost analysis of the lowered encoders (a multiply-add counts as 2).
    """
    from clipjax.models.clip import abstract_params, count_params, create_model, dummy_inputs

    params = abstract_params(create_model(arch, scan=True))  # one traced block per tower
    config = variants.get_config(arch)
    info = {"arch": arch, "image_size": config.vision.image_size,
            "params_image": count_params(params, "visual"),
            "params_text": count_params(params, "text"), "params_total": count_params(params)}
    if flops:
        model = create_model(arch)
        plain = abstract_params(model)
        img, tok = dummy_inputs(model)

        def gflops(method: str, x) -> float:
            fn = jax.jit(functools.partial(model.apply, method=method))
            cost = fn.lower({"params": plain},
                            jax.ShapeDtypeStruct(x.shape, x.dtype)).cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return cost["flops"] / 1e9

        info.update(gflops_image=gflops("encode_image", img),
                    gflops_text=gflops("encode_text", tok))
    return info


def _info(args) -> None:
    archs = args.arch or [n for n in variants.VARIANTS if "tiny" not in n]
    head = f"{'arch':<14}{'image':>6}{'params image':>14}{'params text':>13}{'total':>10}"
    if args.flops:
        head += f"{'GFLOPs/image':>14}{'GFLOPs/caption':>16}"
        print("FLOPs come from XLA's cost analysis: seconds per architecture.", file=sys.stderr)
    print(head, flush=True)
    for arch in archs:  # each row as soon as it is known
        r = model_info(arch, flops=args.flops)
        row = (f"{r['arch']:<14}{r['image_size']:>6}{r['params_image'] / 1e6:>13.2f}M"
               f"{r['params_text'] / 1e6:>12.2f}M{r['params_total'] / 1e6:>9.2f}M")
        if args.flops:
            row += f"{r['gflops_image']:>14.2f}{r['gflops_text']:>16.2f}"
        print(row, flush=True)


def _convert(args) -> None:
    from clipjax import weights

    w = weights.load(args.src, args.arch)
    # By default a clipjax file goes back to PyTorch, and everything else comes to clipjax.
    to = args.to or ("openclip" if weights.clipjax_file(Path(args.src)) else "clipjax")
    written = weights.write(w, args.dst, to)
    print(f"Wrote {', '.join(map(str, written))}: {w.description} from {w.source}, "
          f"in the {to} layout.")


def _export(args) -> None:
    from clipjax import weights

    w = weights.load(args.workdir, step=args.step)
    written = weights.write(w, args.out, args.to)
    print(f"Wrote {', '.join(map(str, written))}: {w.description} from {w.source}, "
          f"in the {args.to} layout.")


def _arch(name: str) -> str:
    try:
        variants.get_config(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (automatic on Cloud TPU and under SLURM)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--local-device-ids", default=None,
                   help="comma-separated local accelerator ids this process drives")


def initialize_distributed(args) -> None:
    """jax.distributed from flags, else from the environment (Cloud TPU, SLURM, CLIPJAX_*)."""
    env = os.environ
    coordinator = args.coordinator or env.get("CLIPJAX_COORDINATOR")
    num = args.num_processes or (int(env["CLIPJAX_NUM_PROCESSES"])
                                 if "CLIPJAX_NUM_PROCESSES" in env else None)
    pid = args.process_id if args.process_id is not None else (
        int(env["CLIPJAX_PROCESS_ID"]) if "CLIPJAX_PROCESS_ID" in env else None)
    local = args.local_device_ids or env.get("CLIPJAX_LOCAL_DEVICE_IDS")
    local_ids = [int(i) for i in local.split(",")] if local else None
    if coordinator or num:
        if not (coordinator and num and pid is not None):
            raise ValueError("multi-host needs all of --coordinator, --num-processes and "
                             "--process-id (or CLIPJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID).")
        jax.distributed.initialize(coordinator, num, pid, local_device_ids=local_ids)
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 or \
            env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize(local_device_ids=local_ids)  # cluster auto-detection


def _train(args) -> None:
    from clipjax import config as config_lib, hostmem, train

    config = config_lib.load_config(args.config, args.overrides)
    hostmem.configure()  # before any backend exists: XLA's threads pick their malloc arena once
    initialize_distributed(args)
    name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
    workdir = args.workdir or f"clipjax-{name}"
    train.train_and_evaluate(config, workdir)  # prints its own summary


def _compile(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; the TPU is a target
    from clipjax import aot, config as config_lib

    config = config_lib.load_config(args.config, args.overrides)
    report = aot.compile_train_step(config, args.topology)
    print(aot.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipjax", description="CLIP in JAX: train (the built-in default runs offline on "
        "a CPU), evaluate (zero-shot, retrieval, linear probes, video retrieval, action "
        "recognition), embed and search image folders, classify videos, export and convert "
        "checkpoints, plan pod runs. Every --checkpoint takes a training workdir, a step folder, a clipjax .safetensors or a PyTorch checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts (and GFLOPs) of architectures")
    p.add_argument("arch", nargs="*", type=_arch, metavar="ARCH",
                   help="architecture names (default: every full-size one)")
    p.add_argument("--flops", action="store_true",
                   help="also forward GFLOPs per image and caption (XLA's count; slower)")
    p.set_defaults(fn=_info)

    p = sub.add_parser("convert", help="PyTorch CLIP checkpoint <-> clipjax parameters",
                       description="Convert an OpenAI (.pt, TorchScript included), OpenCLIP (.pt, "
                       ".bin, .safetensors) or Hugging Face (folder or .safetensors) checkpoint, "
                       "or a training workdir, to a clipjax .safetensors parameter file; given a "
                       "clipjax file, convert back (--to openclip, the default, or hf).")
    p.add_argument("src", help="checkpoint file, Hugging Face model folder or training workdir")
    p.add_argument("dst", help="output file; written whole or not at all")
    p.add_argument("--arch", type=_arch, metavar="ARCH",
                   help="architecture (inferred from the shapes when omitted)")
    p.add_argument("--to", choices=["clipjax", "openclip", "hf"], default=None,
                   help="target layout (default: openclip for a clipjax file, clipjax for "
                   "anything else); hf writes a model folder, or a state dict to a .safetensors")
    p.set_defaults(fn=_convert)

    p = sub.add_parser("export", help="a training run's parameters as a file other tools read",
                       description="Write the parameters of a training workdir's latest (or "
                       "--step) checkpoint: a clipjax .safetensors (architecture and training "
                       "config recorded in it), an OpenCLIP state dict, or a Hugging Face model "
                       "folder (config.json included).")
    p.add_argument("workdir", metavar="WORKDIR", help="training workdir (or one step folder)")
    p.add_argument("out", metavar="OUT", help="output file (.safetensors; .pt for openclip) or, "
                   "for --to hf, a folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--to", choices=["clipjax", "openclip", "hf"], default="clipjax",
                   help="layout (default clipjax)")
    p.set_defaults(fn=_export)

    p = sub.add_parser("train", help="train CLIP (default: a tiny model on built-in shapes)",
                       description="Train from a config (a configs/ name or a .py file with "
                       "get_config(arg)), resuming from the workdir's latest checkpoint. "
                       "Overrides are dotted key=value pairs, e.g. optimizer.lr=1e-3.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--config", default="default", help="config name or path[:arg]")
    p.add_argument("--workdir", default=None,
                   help="checkpoints, metrics and plots (default: ./clipjax-<config name>)")
    _distributed_flags(p)
    p.set_defaults(fn=_train)

    p = sub.add_parser("compile", help="compile the train step for a TPU topology; per-chip "
                       "memory and FLOPs", description="Compile a config's real train step ahead "
                       "of time for a TPU topology (needs libtpu: pip install 'clipjax[tpu]'; no "
                       "TPU needed) and print per-chip memory, whether it fits HBM, and FLOPs.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--config", default="default", help="config name or path[:arg]")
    p.add_argument("--topology", required=True,
                   help="v5e-256, v5p-128, v4-32, v6e-16 or a shape such as v5e:16x16")
    p.add_argument("--json", default=None, help="also write the report here")
    p.set_defaults(fn=_compile)

    data_cli.register(sub)
    evals_cli.register(sub)
    heads_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"clipjax {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
