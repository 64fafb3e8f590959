"""`clipjax data ...` subcommands: convert, info, bench, synthetic."""

import argparse
import time


def _convert(args) -> None:
    from clipjax.data import arrayrecord
    meta = arrayrecord.convert(args.src, args.dst, shard_size=args.shard_size,
                               num_workers=args.workers, verify=args.verify)
    skipped = sum(meta["skipped"].values())
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(meta["skipped"].items()))
    print(f"Wrote {meta['records']} samples in {len(meta['shards'])} shards to {args.dst}"
          + (f"; skipped {skipped} ({reasons})." if skipped else "; none skipped."))
    print(f"Train on it with the source arrayrecord:{args.dst}")


def _info(args) -> None:
    from clipjax.data import sources
    source = sources.open_source(args.spec)
    size = f"{len(source)} records" if source.random_access else f"{len(source.shards)} shards"
    fields = ["image"] + ["text"] * source.has_text + ["label"] * source.has_label
    print(f"{source.kind} source {args.spec}: {size}; fields {', '.join(fields)}; "
          f"{'random access' if source.random_access else 'streamed shard by shard'}")
    if source.class_names:
        shown = ", ".join(source.class_names[:10])
        more = f" ... ({len(source.class_names)} classes)" if len(source.class_names) > 10 else ""
        print(f"classes: {shown}{more}")


def _bench(args) -> None:
    from clipjax.data import pipeline
    it = pipeline.make_iterator(args.spec, global_batch_size=args.batch, image_size=args.image_size,
                                train=True, seed=0, process_index=0, process_count=1,
                                num_workers=args.workers)
    with it:
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        seconds = time.perf_counter() - start
    print(f"{args.batches * args.batch / seconds:.1f} images/s "
          f"({it.config['num_workers']} workers, batch {args.batch}, {args.image_size} px). "
          f"{it.summary()}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _synthetic(args) -> None:
    from clipjax.data import synthetic
    paths = synthetic.write_images(args.folder, args.count, image_size=args.image_size,
                                   seed=args.seed, split=args.split)
    print(f"Wrote {len(paths)} {args.image_size}x{args.image_size} PNG files of the built-in "
          f"{args.split} split to {args.folder} (class in each name).")


def register(sub) -> None:
    """Adds the data subcommands to the `clipjax` argument parser."""
    data = sub.add_parser("data", help="data sources: convert to ArrayRecord, inspect, benchmark; "
                          "write the built-in shapes",
                          description="Data sources are spec strings such as "
                          "'wds:/data/{00000..00999}.tar', 'csv:/data/train.csv?img_key=filepath"
                          "&caption_key=title', 'folder:/data/photos', 'imagefolder:/data/val', "
                          "'tfds:coco_captions?data_dir=/data/tfds', 'arrayrecord:/data/ar'.")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("convert", help="any source -> ArrayRecord shards (random access, "
                            "global shuffle, exact resume)")
    p.add_argument("src", help="source spec, e.g. 'wds:/data/{00000..00999}.tar'")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--shard-size", type=_positive_int, default=10_000,
                   help="records per output shard for non-tar sources (default 10000)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="processes converting shards in parallel (default 1)")
    p.add_argument("--verify", action="store_true",
                   help="decode every image fully (default: headers only)")
    p.set_defaults(fn=_convert)

    p = data_sub.add_parser("info", help="size, fields and classes of a source")
    p.add_argument("spec")
    p.set_defaults(fn=_info)

    p = data_sub.add_parser("bench", help="training-pipeline images/s on this machine")
    p.add_argument("spec")
    p.add_argument("--batch", type=_positive_int, default=256)
    p.add_argument("--image-size", type=_positive_int, default=224)
    p.add_argument("--workers", type=int, default=None, help="default: CPU cores less one")
    p.add_argument("--batches", type=_positive_int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.set_defaults(fn=_bench)

    p = data_sub.add_parser("synthetic", help="write built-in shapes as PNG files (to try "
                            "embed and search)")
    p.add_argument("folder")
    p.add_argument("--count", type=_positive_int, default=200)
    p.add_argument("--image-size", type=_positive_int, default=64)
    p.add_argument("--split", choices=["held_out", "train"], default="held_out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_synthetic)
