"""Where the ring losses' transfers sit in the TPU schedule, from ahead-of-time compiles.

    pip install libtpu   # no TPU needed: XLA compiles for a described topology
    python benchmarks/loss_hlo.py                          # v5e 2x4, embed 512, batch 32768
    python benchmarks/loss_hlo.py --rev 6b2a45f            # also the ring as of a git revision

Compiles the loss-and-gradient program of `tiled` and `sigmoid_ring` (as
benchmarks/loss_memory.py does) and reads the scheduled HLO (`compiled.as_text()`): one
row per collective-permute, with its ring (forward or backward pass), how often it runs
(inside the ring's loop or once), the bytes it moves, and what the schedule places between
its `collective-permute-start` and `-done`: a tile loop (a while loop with matmuls inside)
there means the transfer runs under compute; "nothing" means it is exposed. `--rev` loads
clipjax/losses.py from a git revision (`git show REV:clipjax/losses.py`) to compare.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host stays CPU; TPU is only a target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from clipjax import losses, sharding  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
         "u32": 4, "f64": 8, "s64": 8}
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CALLS = re.compile(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)")


def _split_shape(rest: str) -> tuple[str, str]:
    """('shape', 'opcode(...') from the text after ' = ' (tuple shapes nest parentheses)."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i + 1], rest[i + 2:]
    raise ValueError(f"unbalanced shape: {rest[:80]}")


def parse(hlo: str) -> dict[str, list[dict]]:
    """Computation name -> its instructions in schedule order (name, shape, opcode, text)."""
    comps, current = {}, None
    for line in hlo.splitlines():
        if m := _COMP.match(line):
            current = comps.setdefault(m.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTR.match(line)):
            shape, tail = _split_shape(line[m.end():])
            current.append({"name": m.group(1), "shape": shape,
                            "op": tail.split("(", 1)[0], "text": line})
    return comps


def _dots(comps, name, seen=None) -> int:
    """Matmuls (convolutions) in a computation and everything it calls."""
    seen = set() if seen is None else seen
    if name in seen or name not in comps:
        return 0
    seen.add(name)
    total = 0
    for ins in comps[name]:
        total += ins["op"] == "convolution"
        total += sum(_dots(comps, c, seen) for c in _CALLS.findall(ins["text"]))
    return total


def _trips(comps) -> dict[str, int]:
    """While-body computation -> trip count, read off its condition's `i < constant`."""
    trips = {}
    for instrs in comps.values():
        for ins in instrs:
            if ins["op"] != "while":
                continue
            body = re.search(r"body=%([\w.\-]+)", ins["text"]).group(1)
            cond = re.search(r"condition=%([\w.\-]+)", ins["text"]).group(1)
            consts = [int(c) for i in comps[cond]
                      for c in re.findall(r"constant\((\d+)\)", i["text"])]
            trips[body] = consts[0] if len(consts) == 1 else 0
    return trips


def _nbytes(shape: str) -> int:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", shape).groups()
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * BYTES[dtype]


def permutes(hlo: str) -> list[dict]:
    """Every collective-permute: ring, runs, operand, bytes and the compute it overlaps."""
    comps = parse(hlo)
    trips = _trips(comps)
    rows = []
    for comp, instrs in comps.items():
        for i, ins in enumerate(instrs):
            if ins["op"] not in ("collective-permute-start", "collective-permute"):
                continue
            operand = ins["shape"].lstrip("(").split(", ")[0] if ins["shape"][0] == "(" \
                else ins["shape"]
            op_name = re.search(r'op_name="([^"]*)"', ins["text"])
            ring = "backward" if op_name and "transpose(" in op_name.group(1) else "forward"
            row = {"ring": ring, "runs": trips.get(comp, 1), "loop": comp in trips,
                   "operand": re.sub(r"\{.*", "", operand), "bytes": _nbytes(operand),
                   "async": ins["op"] == "collective-permute-start", "tile_loops": 0,
                   "dots": 0}
            if row["async"]:
                done = next(j for j in range(i + 1, len(instrs))
                            if instrs[j]["op"] == "collective-permute-done"
                            and f"%{ins['name']})" in instrs[j]["text"])
                for mid in instrs[i + 1:done]:
                    called = _CALLS.findall(mid["text"])
                    dots = (mid["op"] == "convolution") + sum(_dots(comps, c) for c in called)
                    row["dots"] += dots
                    row["tile_loops"] += mid["op"] == "while" and dots > 0
            rows.append(row)
    return sorted(rows, key=lambda r: (r["ring"] != "forward", not r["loop"], -r["bytes"]))


def compile_loss(module, mesh, kind: str, batch: int, embed: int, tile: int):
    """The compiled loss-and-gradient program, as benchmarks/loss_memory.py builds it."""
    fn = module.get_loss(kind)

    def loss(img_BE, txt_BE, log_scale, bias):
        return fn(img_BE, txt_BE, jnp.exp(log_scale), bias, mesh=mesh, tile=tile)

    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    rep = NamedSharding(mesh, P())
    emb = jax.ShapeDtypeStruct((batch, embed), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(grad, out_shardings=((rep, rep), (rows, rows, rep, rep))).lower(
        emb, emb, scalar, scalar).compile()


def load_rev(rev: str):
    """clipjax/losses.py as of a git revision, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:clipjax/losses.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"losses_{rev.replace('/', '_')}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"losses_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overlap(row) -> str:
    if not row["async"]:
        return "synchronous"
    ops = f"{row['dots']} dot op{'s' * (row['dots'] != 1)}"
    if row["tile_loops"]:
        return f"tile loop ({ops})"
    return ops if row["dots"] else "nothing"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["tiled", "sigmoid_ring"],
                        choices=["tiled", "sigmoid_ring"])
    parser.add_argument("--rev", nargs="*", default=[],
                        help="git revisions whose clipjax/losses.py to compile as well")
    parser.add_argument("--dump", help="write each compiled HLO text into this folder")
    args = parser.parse_args()

    mesh = sharding.create_mesh(
        devices=topologies.get_topology_desc(args.topology, "tpu").devices)
    codes = {"working tree": losses} | {rev: load_rev(rev) for rev in args.rev}
    print(f"{args.topology} ({mesh.size} chips), global batch {args.batch}, embed "
          f"{args.embed}, tile {args.tile}: every collective-permute of loss + gradients")
    print("| code | loss | ring | where | runs | operand | MiB | between start and done |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for code, module in codes.items():
        for kind in args.kinds:
            compiled = compile_loss(module, mesh, kind, args.batch, args.embed, args.tile)
            hlo = compiled.as_text()
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                name = f"{code.replace(' ', '_')}_{kind}.hlo"
                with open(os.path.join(args.dump, name), "w") as f:
                    f.write(hlo)
            rows = permutes(hlo)
            for r in rows:
                where = "ring loop" if r["loop"] else "once"
                print(f"| {code} | {kind} | {r['ring']} | {where} | {r['runs']} | "
                      f"{r['operand']} | {r['bytes'] / 2**20:.3f} | {_overlap(r)} |")
            m = compiled.memory_analysis()
            total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes)
            for ring in ("forward", "backward"):
                ring_rows = [r for r in rows if r["ring"] == ring]
                hidden = sum(r["runs"] * r["bytes"] for r in ring_rows if r["tile_loops"])
                moved = sum(r["runs"] * r["bytes"] for r in ring_rows)
                summary.append((code, kind, ring, sum(r["runs"] for r in ring_rows),
                                moved, hidden, total))
            sys.stdout.flush()

    print("\nper ring: collective-permutes run, MiB moved, share of it under a tile loop;"
          " bytes per chip of the whole program")
    print("| code | loss | ring | permutes run | MiB moved | under tile loop | bytes per chip |")
    print("|---|---|---|---|---|---|---|")
    for code, kind, ring, runs, moved, hidden, total in summary:
        print(f"| {code} | {kind} | {ring} | {runs} | {moved / 2**20:.2f} | "
              f"{hidden / max(moved, 1):.0%} | {total:,} |")


if __name__ == "__main__":
    main()
