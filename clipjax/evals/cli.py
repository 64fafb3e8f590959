"""`clipjax eval zeroshot | retrieval | linear-probe`, `clipjax embed` and `clipjax search`
(the video heads' `eval video-retrieval | action` are in clipjax.heads.cli)."""

import argparse
import json
import sys
from pathlib import Path


def _model(args):
    """(model, params on the mesh, arch, fingerprint, encoders) for --checkpoint."""
    import jax

    from clipjax import sharding
    from clipjax.evals.encoders import make_encoders
    from clipjax.weights import fingerprint, load_model

    model, params, arch = load_model(args.checkpoint, args.arch)
    fp = fingerprint(params)
    mesh = sharding.create_mesh()
    params = jax.device_put(params, sharding.param_shardings(model, mesh))
    return model, params, arch, fp, make_encoders(model, mesh, args.batch_size)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def _write_json(path: str, payload: dict) -> None:
    from clipjax.files import atomic_write as _atomic_write
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _is_main() -> bool:
    import jax
    return jax.process_index() == 0


def _zeroshot(args) -> None:
    import numpy as np

    from clipjax.evals import data, plots, prompts, zeroshot

    source = data.labelled(args.dataset, args.data_dir)
    classnames = prompts.resolve_classnames(source.label_names, source.num_labels, args.classes,
                                            source.dataset, source.description)
    templates = (prompts.load_templates(args.templates) if args.templates
                 else zeroshot.default_templates(source, args.classes))

    _, params, arch, fp, encoders = _model(args)
    bar = _progress(len(source), "zero-shot")
    result = zeroshot.evaluate(encoders, params,
                               data.batch_fn(source, encoders.batch_size)(encoders),
                               classnames, templates, progress=bar.update)
    bar.close()
    if not _is_main():
        return
    acc = result.per_class_accuracy()
    worst = [i for i in acc.argsort(kind="stable") if not np.isnan(acc[i])][:5]
    skipped = f" ({len(source.skipped)} unreadable, skipped and logged)" if source.skipped else ""
    print(_table([("dataset", source.description), ("model", f"{arch} (weights {fp})"),
                  ("images", f"{len(result.labels)}{skipped}"),
                  ("classes", str(result.num_classes)),
                  ("templates", str(len(templates))),
                  *[(f"top-{k}", f"{100 * v:.2f}%") for k, v in result.topk.items()],
                  ("worst classes", ", ".join(f"{result.classnames[i]} {100 * acc[i]:.0f}%"
                                              for i in worst))]))
    payload = {"task": "zeroshot", "dataset": args.dataset, "checkpoint": args.checkpoint,
               "arch": arch, "fingerprint": fp, "templates": templates, **result.to_json()}
    _write_json(args.out, payload)
    written = [args.out]
    if not args.no_plots:
        stem = Path(args.out).with_suffix("")
        plots.per_class_accuracy(f"{stem}_per_class.png", result.classnames, acc)
        plots.confusion_matrix(f"{stem}_confusion.png", result.classnames, result.confusion())
        written += [f"{stem}_per_class.png", f"{stem}_confusion.png"]
    print(f"Wrote {', '.join(written)}.")


def _retrieval(args) -> None:
    from clipjax.evals import data, plots, retrieval

    if (args.captions is None) == (args.dataset is None):
        raise ValueError("Give either --captions FILE (with --images-root) or --dataset "
                         "synthetic[:N], not both or neither.")
    if args.dataset is not None:
        source = data.labelled(args.dataset)
        if not isinstance(source, data.SyntheticImages):
            raise ValueError(f"--dataset {args.dataset!r}: retrieval datasets are synthetic[:N] "
                             "or a caption file given with --captions.")
        captions = source.captions()
    else:
        source, captions = data.captioned(args.captions, args.images_root, args.split)
    _, params, arch, fp, encoders = _model(args)
    bar = _progress(len(source), "retrieval")
    result = retrieval.evaluate(encoders, params,
                                data.batch_fn(source, encoders.batch_size)(encoders),
                                captions, chunk=args.chunk, progress=bar.update)
    bar.close()
    if not _is_main():
        return
    m = result.metrics()
    print(_table([("dataset", source.description), ("model", f"{arch} (weights {fp})"),
                  ("images", str(len(result.i2t_ranks))),
                  ("captions", str(len(result.t2i_ranks))),
                  *[(k.split("/", 1)[1], f"{100 * v:.2f}%") for k, v in m.items()]]))
    _write_json(args.out, {"task": "retrieval", "checkpoint": args.checkpoint, "arch": arch,
                           "fingerprint": fp, **result.to_json()})
    written = [args.out]
    if not args.no_plots:
        png = f"{Path(args.out).with_suffix('')}_recall.png"
        plots.recall_curve(png, result.curve())
        written.append(png)
    print(f"Wrote {', '.join(written)}.")


def _linear_probe(args) -> None:
    from clipjax.evals import data, linear_probe

    # A tfds: dataset named without split= reads the split of its role.
    sources = {"train": data.labelled(args.train, args.data_dir, ("train",)),
               "test": data.labelled(args.test, args.data_dir, ("test",))}
    if args.val:
        sources["val"] = data.labelled(args.val, args.data_dir, ("validation",))
    sizes = {k: s.num_labels for k, s in sources.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"The splits disagree on the label space ({sizes}); give splits of "
                         "one dataset.")
    _, params, arch, fp, encoders = _model(args)
    feats = {}
    for k, s in sources.items():
        bar = _progress(len(s), f"features {k}")
        feats[k] = linear_probe.features(encoders, params,
                                         data.batch_fn(s, encoders.batch_size)(encoders),
                                         progress=bar.update)
        bar.close()
    result = linear_probe.probe(feats["train"], feats["test"], feats.get("val"),
                                num_classes=sizes["train"], mesh=encoders.mesh,
                                max_iter=args.max_iter)
    if not _is_main():
        return
    print(_table([("train", sources["train"].description), ("test", sources["test"].description),
                  ("model", f"{arch} (weights {fp})"),
                  ("lambda", (f"1e{result.log10_lambda:g} (scikit-learn C = "
                              f"{10 ** -result.log10_lambda:.3g})")),
                  ("top-1", f"{100 * result.top1:.2f}%"),
                  ("mean per class", f"{100 * result.mean_per_class:.2f}%")]))
    _write_json(args.out, {"task": "linear_probe", "checkpoint": args.checkpoint, "arch": arch,
                           "fingerprint": fp, **result.to_json()})
    print(f"Wrote {args.out}.")


def _embed(args) -> None:
    from tqdm import tqdm

    from clipjax.data import sources
    from clipjax.evals import search

    root = Path(args.folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the folder of images to embed.")
    total = len(sources.list_images(str(root)))
    _, params, arch, fp, encoders = _model(args)
    bar = _progress(total, "embed")

    def skipped(path: str, reason: str, detail: str) -> None:
        tqdm.write(f"skipped unreadable file {path}: {reason} ({detail})", file=sys.stderr)
        bar.update(1)

    index = search.build_index(encoders, params, root, arch=arch, fingerprint=fp,
                               checkpoint=str(Path(args.checkpoint).resolve()),
                               batch_size=encoders.batch_size, on_skip=skipped,
                               progress=bar.update)
    bar.close()
    if not _is_main():
        return
    search.save_index(index, args.out)
    note = f"; skipped {len(index.skipped)} unreadable file(s)" if index.skipped else ""
    print(f"Embedded {len(index.paths)} images from {root} into {args.out} ({arch}, weights "
          f"{fp}){note}.")


def _search(args) -> None:
    from clipjax.evals import search

    index = search.load_index(args.index)
    checkpoint = args.checkpoint or index.checkpoint
    if args.checkpoint is None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"The checkpoint the index was built with, {checkpoint}, is gone; "
                                "pass --checkpoint with the same weights.")
    args.checkpoint = checkpoint
    args.arch = args.arch or (index.arch if args.checkpoint == index.checkpoint else None)
    if args.k < 1:
        raise ValueError(f"-k {args.k}: ask for at least one result, e.g. -k 10.")
    _, params, arch, fp, encoders = _model(args)
    search.check_model(index, arch, fp, checkpoint)
    results = dict(zip(args.query, search.search(encoders, params, index, args.query, args.k)))
    if not _is_main():
        return
    for q, hits in results.items():
        print(f"# {q}")
        for rank, (path, score) in enumerate(hits, 1):
            print(f"{rank:>3}  {score:.4f}  {path}")
    if args.html:
        search.write_html(args.html, results)
        print(f"Wrote {args.html}.")


def _common(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    p.add_argument("--checkpoint", required=checkpoint_required, metavar="CKPT",
                   help="a training workdir (its latest step) or one step folder of it, a "
                   "clipjax .safetensors, or a PyTorch OpenAI / OpenCLIP / Hugging Face "
                   "checkpoint (file or folder)")
    p.add_argument("--arch", metavar="ARCH", help="architecture (inferred when omitted)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images or texts per encoder call over all devices (default 256, "
                   "rounded up to a multiple of the device count)")


def register(sub) -> None:
    """Adds the evaluation and search subcommands to the `clipjax` argument parser."""
    from clipjax.heads import cli as heads_cli

    p = sub.add_parser("eval", help="zero-shot classification, retrieval, linear probes, video "
                       "retrieval, action recognition")
    tasks = p.add_subparsers(dest="task", required=True)

    z = tasks.add_parser("zeroshot", help="zero-shot top-1/top-5 with prompt ensembles",
                         description="Zero-shot classification as OpenCLIP evaluates it: "
                         "class embeddings from prompt-template ensembles, top-1 and top-5.")
    _common(z)
    z.add_argument("--dataset", required=True, help="a labelled source spec (tfds:imagenet2012, "
                   "tfds:cifar10?split=test, imagefolder:DIR, arrayrecord:DIR), a folder with one "
                   "subfolder per class, or synthetic[:N]; tfds reads split validation, else "
                   "test, unless the spec names one")
    z.add_argument("--data-dir", help="tfds data directory (added to a tfds: spec as data_dir=)")
    z.add_argument("--classes", help="class names: a shipped dataset (imagenet1k, cifar10, ...) "
                   "or a file with one name per line in label order")
    z.add_argument("--templates", help="openai (80), short (7), a shipped dataset, a file, or "
                   "one template with {} (default: the dataset's own)")
    z.add_argument("--out", default="zeroshot.json", help="results JSON; the PNGs go beside it")
    z.add_argument("--no-plots", action="store_true", help="skip the per-class and confusion PNGs")
    z.set_defaults(fn=_zeroshot)

    r = tasks.add_parser("retrieval", help="image<->text recall@1/5/10",
                         description="Image-to-text and text-to-image recall@K with several "
                         "captions per image (COCO / Flickr30k protocol).")
    _common(r)
    r.add_argument("--captions", help="Karpathy split JSON (dataset_coco.json), a JSON list of "
                   "{image, captions}, or a CSV/TSV with image,caption columns")
    r.add_argument("--images-root", help="folder the caption file's image paths are relative "
                   "to (default: the caption file's folder)")
    r.add_argument("--split", default="test", help="Karpathy split (default test)")
    r.add_argument("--dataset", help="synthetic[:N] instead of a caption file")
    r.add_argument("--chunk", type=int, default=512, help="queries scored at once")
    r.add_argument("--out", default="retrieval.json", help="results JSON; the PNG goes beside it")
    r.add_argument("--no-plots", action="store_true", help="skip the recall@K PNG")
    r.set_defaults(fn=_retrieval)

    lp = tasks.add_parser("linear-probe", help="logistic regression on frozen image features",
                          description="The CLIP paper's linear probe: L-BFGS logistic regression, "
                          "L2 strength by binary search on a validation split, refit, test.")
    _common(lp)
    for split in ("train", "test"):
        lp.add_argument(f"--{split}", required=True, help="a labelled source spec (tfds:cifar10, "
                        f"whose split defaults to {split}; imagefolder:DIR; arrayrecord:DIR), a "
                        "class folder, or synthetic-train[:N] / synthetic[:N]")
    lp.add_argument("--val", help="validation data, as --train (default: 20%% of --train held "
                    "out; a tfds split defaults to validation)")
    lp.add_argument("--data-dir", help="tfds data directory (added to tfds: specs as data_dir=)")
    lp.add_argument("--max-iter", type=int, default=1000,
                    help="L-BFGS iterations per fit at most (default 1000, scikit-learn's "
                    "setting in OpenAI's linear-probe example)")
    lp.add_argument("--out", default="linear_probe.json", help="results JSON")
    lp.set_defaults(fn=_linear_probe)
    heads_cli.register_eval(tasks)

    e = sub.add_parser("embed", help="embed every image under a folder into a search index",
                       description="Embed every image under FOLDER (any depth) for `clipjax "
                       "search`; unreadable files are skipped and listed.")
    e.add_argument("folder", metavar="FOLDER")
    _common(e)
    e.add_argument("--out", required=True, metavar="INDEX", help="index file to write (.npz)")
    e.set_defaults(fn=_embed)

    s = sub.add_parser("search", help="rank indexed images by a text query",
                       description="Rank the images of an index built by `clipjax embed` by "
                       "their similarity to each query.")
    s.add_argument("query", nargs="+", help="one or more text queries")
    s.add_argument("--index", required=True, metavar="INDEX")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    _common(s, checkpoint_required=False)
    s.add_argument("--html", metavar="PAGE", help="also write a self-contained HTML page")
    s.set_defaults(fn=_search)
