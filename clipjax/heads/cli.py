"""`clipjax eval video-retrieval`, `clipjax eval action` and `clipjax classify-video`.

    clipjax eval video-retrieval --checkpoint clipjax-clip4clip_synthetic --dataset synthetic
    clipjax eval action --checkpoint RUN --dataset ucf101:/data/ucf101?split=1 --views 10x3
    clipjax classify-video a.mp4 b.mp4 --labels "running, jumping" --checkpoint RUN

A CLIP4Clip or ActionCLIP checkpoint evaluates as trained (any video head embeds clips and
captions); a plain CLIP checkpoint gives CLIP's zero-shot video baseline: the mean of its
frame embeddings (CLIP4Clip's meanP for retrieval, ActionCLIP's meanP fusion for actions).
"""

import argparse
import json
import os
import sys
import types
from pathlib import Path

import numpy as np

from clipjax.evals import cli as evals_cli

# The split a dataset is tested on when its spec names none (the readers default to train).
TEST_SPLITS = {"msrvtt": ("split", "test"), "msvd": ("split", "test"), "k400": ("split", "val"),
               "ucf101": ("subset", "test"), "hmdb51": ("subset", "test")}
# What a plain CLIP checkpoint becomes for each task: the mean over frames.
CLIP_BASELINE = {"clip4clip": {"sim_header": "meanP"}, "actionclip": {"fusion": "meanP"}}


# --- checkpoints ----------------------------------------------------------------------------


def trained_task(checkpoint: str) -> str:
    """The task a checkpoint was trained for ("clip" for CLIP weights), from the config it
    records (a workdir's config.json, a clipjax file's metadata); nothing is loaded."""
    from clipjax import files, weights

    path = Path(checkpoint).expanduser().absolute()
    workdir = path.parent.parent if path.parent.name == "checkpoints" else path
    config = None
    if weights.is_workdir(workdir) and (workdir / weights.CONFIG_FILE).is_file():
        config = json.loads((workdir / weights.CONFIG_FILE).read_text())
    elif path.exists() and (found := weights.clipjax_file(path)):
        config = json.loads(files.safetensors_metadata(found).get("config", "null"))
    return (config or {}).get("task", "clip")


def _fit(model, params, checkpoint: str, asked: dict):
    """`params` cut to what `model` uses; one sentence when the checkpoint cannot fill it
    (a --sim-header it was not trained with, a --frames its modules do not take)."""
    import flax

    from clipjax.models import clip

    want = flax.traverse_util.flatten_dict(clip.abstract_params(model), sep="/")
    have = flax.traverse_util.flatten_dict(params, sep="/")
    settings = ", ".join(f"{k}={v}" for k, v in asked.items()) or "its own settings"
    for path, spec in want.items():
        if path not in have:
            raise ValueError(f"{checkpoint} has no {path} weights for this model ({settings}); "
                             "evaluate it with the head settings it was trained with.")
        if tuple(have[path].shape) != tuple(spec.shape):
            raise ValueError(f"{checkpoint} cannot fill this model ({settings}): its {path} is "
                             f"{tuple(have[path].shape)}, the model's {tuple(spec.shape)}; keep "
                             "the settings it was trained with.")
    return flax.traverse_util.unflatten_dict({p: have[p] for p in want}, sep="/")


def describe(head_module, config, trained: str) -> str:
    """"ViT-B-32, CLIP4Clip seqTransf, 12 frames": what is being evaluated."""
    head = head_module.settings(config)
    if trained == "clip":
        what = "CLIP zero-shot (mean over frames)"
    elif config.task == "clip4clip":
        what = f"CLIP4Clip {head['sim_header']}" + (", 3D patch" if head["linear_patch"] == "3d"
                                                   else "")
    else:
        what = (f"ActionCLIP {head['fusion']}" + ("+TSM" if head["tsm"] else "")
                + (", joint" if head["joint"] else ""))
    return f"{config.model}, {what}, {head['frames']} frames"


def load(args, task: str, **head) -> types.SimpleNamespace:
    """The head, eval model, params on the mesh, config, fingerprint and encoders of
    --checkpoint; --frames and `head` override the head's settings."""
    import jax

    from clipjax import sharding, weights
    from clipjax.heads import video

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give a positive number of clips.")
    if args.frames is not None:
        if args.frames < 1:
            raise ValueError(f"--frames {args.frames}: give a positive number of frames a clip.")
        head["frames"] = args.frames
    trained = trained_task(args.checkpoint)
    if trained == "clip":
        head = {**CLIP_BASELINE[task], **head}
    module, model, params, config = video.load(args.checkpoint, task, **head)
    params = _fit(model, params, args.checkpoint, head)
    fp = weights.fingerprint(params)
    mesh = sharding.create_mesh()
    params = jax.device_put(params, sharding.param_shardings(model, mesh))
    return types.SimpleNamespace(
        head=module, model=model, params=params, config=config, fingerprint=fp,
        trained=trained, name=describe(module, config, trained),
        encoders=video.make_encoders(module, model, mesh, args.batch_size))


# --- data -----------------------------------------------------------------------------------


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def eval_spec(spec: str) -> str:
    """synthetic[:N] as given; a dataset spec with its test split where it names none."""
    from clipjax.data import sources

    spec = spec.strip()
    if is_synthetic(spec):
        n = spec.partition(":")[2]
        if n and not (n.isdigit() and int(n) > 0):
            raise ValueError(f"--dataset {spec!r}: write synthetic, or synthetic:N with N the "
                             "number of videos.")
        return spec
    kind, location, options = sources.parse_spec(spec)
    if kind not in TEST_SPLITS or TEST_SPLITS[kind][0] in options:
        return spec
    key, value = TEST_SPLITS[kind]
    return sources.format_spec(kind, location, {**options, key: value})


def open_dataset(spec: str, need: str):
    """The video source of a spec (None for synthetic), checked for `need` ("captions" or
    "labels") before any model is loaded."""
    from clipjax.data import video as video_data

    if is_synthetic(spec):
        return None
    source = video_data.open_video_source(spec)
    if need == "captions" and not source.has_text:
        raise ValueError(f"{spec} has no captions; video retrieval needs a captioned dataset "
                         "(msrvtt:, msvd:) or synthetic.")
    if need == "labels" and not (source.has_label and source.class_names):
        raise ValueError(f"{spec} has no class names; action recognition needs a labelled "
                         "dataset (k400:, ucf101:, hmdb51:, or a list given labels=labels.csv).")
    return source


def eval_videos(m, spec: str, source, views: str, on_skip):
    """The evaluation set, read as the head reads clips (its sampling, frames, image size)."""
    from clipjax.data import video as video_data
    from clipjax.heads import video

    if source is None:
        return video.eval_set(m.head, spec, m.config,
                              num_videos=m.config.eval.get("num_examples", 0))
    s = m.head.settings(m.config)
    return video_data.eval_set(
        source, num_frames=s["frames"], image_size=m.config.data.image_size,
        sampling=m.head.SAMPLING, views=video.parse_views(views), fps=s.get("fps", 1),
        slice_framepos=s.get("slice_framepos", 2), num_workers=m.config.data.num_workers,
        on_skip=on_skip)


def _header(m, videos, spec: str, views: str) -> list[tuple[str, str]]:
    return [("dataset", getattr(videos, "description", spec)),
            ("model", f"{m.name} (weights {m.fingerprint})"), ("views", views)]


def _identity(args, m, spec: str, views: str) -> dict:
    """What a results JSON records of the run: data, checkpoint, head and weights."""
    return {"dataset": spec, "checkpoint": args.checkpoint, "model": m.name,
            "head": {"task": m.config.task, **m.head.settings(m.config)},
            "fingerprint": m.fingerprint, "views": views}


class _Skips:
    """Unreadable videos of an evaluation (the pipeline logs each): counted, and their views
    ticked off the progress bar."""

    def __init__(self, views: int):
        self.keys: list[str] = []
        self.views, self.bar = views, None

    def __call__(self, key: str, reason: str, detail: str) -> None:
        self.keys.append(key)
        if self.bar is not None:
            self.bar.update(self.views)

    def note(self) -> str:
        return f" ({len(self.keys)} unreadable, skipped and logged)" if self.keys else ""


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip", file=sys.stderr, dynamic_ncols=True)


def _views(spec: str, views: str) -> str:
    from clipjax.heads import video

    clips, crops = video.parse_views(views)
    return "1x1" if is_synthetic(spec) else f"{clips}x{crops}"  # a built-in clip is one view


# --- eval video-retrieval ---------------------------------------------------------------------


def _video_retrieval(args) -> None:
    from clipjax.evals import video as video_evals
    from clipjax.heads import video

    spec = eval_spec(args.dataset)
    views = _views(spec, args.views)
    source = open_dataset(spec, "captions")
    head = {"sim_header": args.sim_header} if args.sim_header else {}
    m = load(args, "clip4clip", **head)
    clips, crops = video.parse_views(views)
    skips = _Skips(clips * crops)
    videos = eval_videos(m, spec, source, views, skips)
    with _progress(videos.num_videos * clips * crops, "video retrieval") as skips.bar:
        sim_TV, video_of_T = video_evals.retrieval_scores(m.encoders, m.params, videos,
                                                          progress=skips.bar.update)
    metrics = {k.split("/", 1)[1]: v
               for k, v in video_evals.retrieval_metrics(sim_TV, video_of_T).items()}
    direction = (video.direction_evaluator(videos)(m.encoders, m.params)
                 if source is None else {})
    if not evals_cli._is_main():
        return
    rows = [*_header(m, videos, spec, views), ("videos", f"{videos.num_videos}{skips.note()}"),
            ("captions", str(len(video_of_T)))]
    for way in ("t2v", "v2t"):
        rows += [(f"{way} R@{k}", f"{100 * metrics[f'{way}_R@{k}']:.2f}%") for k in (1, 5, 10)]
        rows += [(f"{way} {r}", f"{metrics[f'{way}_{r}']:.1f}") for r in ("MdR", "MnR")]
    rows += [(f"direction {k.split('/')[1].replace('top1', 'top-1')}", f"{100 * v:.2f}%")
             for k, v in direction.items()]
    print(evals_cli._table(rows))
    evals_cli._write_json(args.out, {
        "task": "video_retrieval", **_identity(args, m, spec, views),
        "num_videos": videos.num_videos,
        "num_captions": len(video_of_T), "skipped": skips.keys, **metrics,
        **({"direction": {k.split("/")[1]: v for k, v in direction.items()}}
           if direction else {})})
    print(f"Wrote {args.out}.")


# --- eval action --------------------------------------------------------------------------------


def templates(spec: str | None) -> list[str]:
    """ActionCLIP's 16 templates, or --templates (a file with one a line, or one template)."""
    from clipjax.evals import prompts
    from clipjax.heads import actionclip

    return prompts.load_templates(spec) if spec else list(actionclip.TEMPLATES)


def _action(args) -> None:
    from clipjax.evals import video as video_evals
    from clipjax.evals.prompts import display_name
    from clipjax.heads import video

    spec = eval_spec(args.dataset)
    views = _views(spec, args.views)
    source = open_dataset(spec, "labels")
    prompts = templates(args.templates)
    m = load(args, "actionclip")
    clips, crops = video.parse_views(views)
    skips = _Skips(clips * crops)
    videos = eval_videos(m, spec, source, views, skips)
    names = [display_name(c) for c in videos.classnames]
    with _progress(videos.num_videos * clips * crops, "action") as skips.bar:
        probs_VC, _, labels_V = video_evals.score_videos(m.encoders, m.params, videos, names,
                                                         prompts, progress=skips.bar.update)
    if labels_V is None:
        raise ValueError(f"No video of {spec} could be read (see the skipped videos above).")
    topk = video_evals.topk_accuracy(probs_VC, labels_V, (1, 5))
    c = len(names)
    counts_C = np.bincount(labels_V, minlength=c)
    correct_C = np.bincount(labels_V[probs_VC.argmax(1) == labels_V], minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_C = correct_C / counts_C
    worst = [i for i in acc_C.argsort(kind="stable") if counts_C[i]][:5]
    if not evals_cli._is_main():
        return
    print(evals_cli._table([
        *_header(m, videos, spec, views), ("videos", f"{len(labels_V)}{skips.note()}"),
        ("classes", str(c)), ("templates", str(len(prompts))),
        *[(f"top-{k}", f"{100 * v:.2f}%") for k, v in topk.items()],
        ("worst classes", ", ".join(f"{names[i]} {100 * acc_C[i]:.0f}%" for i in worst))]))
    evals_cli._write_json(args.out, {
        "task": "action", **_identity(args, m, spec, views), "templates": prompts,
        "num_videos": len(labels_V), "num_classes": c, "skipped": skips.keys,
        **{f"top{k}": v for k, v in topk.items()},
        "per_class": [{"class": n, "accuracy": None if not k else float(a), "videos": int(k)}
                      for n, a, k in zip(names, acc_C, counts_C)]})
    print(f"Wrote {args.out}.")


# --- classify-video -------------------------------------------------------------------------


class VideoFiles:
    """Video files and frame folders as a video set (clipjax.evals.video.VideoSet): each read
    when its batch is due, as the evaluation pipeline reads a dataset's videos; one that cannot
    be read is reported through `on_error(path, reason)` and left out."""

    def __init__(self, paths: list[str], prepare, on_error):
        self.paths, self.prepare, self.on_error = paths, prepare, on_error
        self.num_videos, self.classnames = len(paths), None

    def captions(self) -> None:
        return None

    def _record(self, path: str) -> dict:
        from clipjax.data.video import FRAME_TMPL

        record = {"key": path, "path": path, "skip": None, "text": None, "label": None}
        if os.path.isdir(path):  # extracted frames img_00001.jpg, img_00002.jpg, ...
            n = 0
            while os.path.isfile(os.path.join(path, FRAME_TMPL.format(n + 1))):
                n += 1
            if n == 0:
                return {**record, "skip": ("empty_video", "a folder without frames named "
                                           f"{FRAME_TMPL.format(1)}, ...")}
            record["num_frames"] = n
        return record

    def batches(self, batch_size: int):
        import jax

        for i in range(jax.process_index(), len(self.paths), jax.process_count()):
            path = self.paths[i]
            try:
                record = self._record(path)
                out = self.prepare(record) if not record["skip"] else record
            except ImportError:
                raise
            except Exception as e:  # noqa: BLE001 - a bad file is reported, never fatal
                out = {"skip": (type(e).__name__, str(e))}
            if "skip" in out:
                reason, detail = out["skip"]
                self.on_error(path, f"{reason.replace('_', ' ')}: {detail}")
                continue
            rows = out.get("rows", [out])
            yield {"video": np.stack([r["video"] for r in rows]),
                   "frame_mask": np.stack([r["frame_mask"] for r in rows]),
                   "index": np.full(len(rows), i, np.int64)}


def parse_labels(labels: str | None, labels_file: str | None) -> list[str]:
    if labels_file is not None:
        if not Path(labels_file).is_file():
            raise FileNotFoundError(f"--labels-file {labels_file} does not exist; give a file "
                                    "with one label a line.")
        names = [line.strip() for line in Path(labels_file).read_text().splitlines()]
        where = f"--labels-file {labels_file}"
    else:
        names = [n.strip() for n in labels.split(",")]
        where = f"--labels {labels!r}"
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{where} names no labels; give them comma-separated, e.g. --labels "
                         "\"running, jumping, swimming\".")
    return names


def _classify_video(args) -> None:
    from clipjax.data.video import VideoPrepare
    from clipjax.evals import video as video_evals
    from clipjax.heads import video

    labels = parse_labels(args.labels, args.labels_file)
    if args.top < 1:
        raise ValueError(f"--top {args.top}: ask for at least one label, e.g. --top 5.")
    clips, crops = video.parse_views(args.views)
    prompts = templates(args.templates)
    m = load(args, "actionclip")
    s = m.head.settings(m.config)
    # The file's clips as the head's evaluation reads a dataset's: TSN centres (ActionCLIP,
    # CLIP) or 1 frame a second (CLIP4Clip; frame folders: every frame, their rate unknown).
    prepare = VideoPrepare(
        types.SimpleNamespace(class_names=None, has_label=False), num_frames=s["frames"],
        image_size=m.config.data.image_size, train=False, sampling=m.head.SAMPLING,
        fps=s.get("fps", 1), slice_framepos=s.get("slice_framepos", 2), views=(clips, crops),
        context_length=m.config.data.context_length, text=False, templates=None, index=False)
    failed = []

    def on_error(path: str, reason: str) -> None:
        failed.append(path)
        print(f"clipjax classify-video: cannot read {path} ({reason}); classifying the others.",
              file=sys.stderr, flush=True)

    files = VideoFiles(list(args.videos), prepare, on_error)
    probs_VC, index_V, _ = video_evals.score_videos(m.encoders, m.params, files, labels, prompts)
    if evals_cli._is_main():
        top = min(args.top, len(labels))
        for probs_C, i in zip(probs_VC, index_V):
            print(f"# {args.videos[i]}")
            for rank, c in enumerate(np.argsort(-probs_C, kind="stable")[:top], 1):
                print(f"{rank:>3}  {probs_C[c]:.4f}  {labels[c]}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(args.videos)} videos could not be read: "
                         f"{', '.join(failed)}.")


# --- the parsers ----------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, views: str) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a CLIP4Clip or ActionCLIP training workdir (its latest step), one step "
                   "folder of it or its .safetensors; or any CLIP checkpoint (a CLIP workdir, "
                   "clipjax .safetensors, OpenAI / OpenCLIP .pt), evaluated zero-shot with the "
                   "mean over frames")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="frames a clip (default: the head's, 12 CLIP4Clip, 8 ActionCLIP)")
    p.add_argument("--views", default=views, metavar="CLIPSxCROPS",
                   help=f"clips x crops a video, their scores averaged (default {views})")
    p.add_argument("--batch-size", type=int, default=64,
                   help="clips per encoder call over all devices (default 64, rounded up to a "
                   "multiple of the device count)")


_LABELLED = ("k400:/data/k400, ucf101:/data/ucf101?split=1, hmdb51:/data/hmdb51?split=1, "
             "videolist:LIST?labels=labels.csv or rawframes:LIST?labels=labels.csv")


def register_eval(tasks) -> None:
    """Adds `eval video-retrieval` and `eval action` to `clipjax eval`'s subparsers."""
    r = tasks.add_parser("video-retrieval", help="text<->video recall@1/5/10 (CLIP4Clip)",
                         description="Text-to-video and video-to-text recall@K, median and mean "
                         "rank, as CLIP4Clip reports them (ties counted once); on the built-in "
                         "videos also whether the model tells a motion from its mirror.")
    _common(r, "1x1")
    r.add_argument("--dataset", required=True, help="synthetic[:N] (the built-in moving shapes), "
                   "msrvtt:/data/msrvtt (1k-A test) or msvd:/data/msvd; the test split unless "
                   "the spec names one")
    r.add_argument("--sim-header", choices=("meanP", "seqLSTM", "seqTransf", "tightTransf"),
                   help="CLIP4Clip's similarity head (default: the checkpoint's; meanP for CLIP)")
    r.add_argument("--out", default="video_retrieval.json", help="results JSON")
    r.set_defaults(fn=_video_retrieval)

    a = tasks.add_parser("action", help="action recognition top-1/top-5 (ActionCLIP)",
                         description="Action recognition as ActionCLIP tests it: each class name "
                         "in 16 templates, a softmax per template averaged, and over views.")
    _common(a, "10x3")
    a.add_argument("--dataset", required=True, help=f"synthetic[:N] or a labelled dataset ("
                   f"{_LABELLED}); the test split (k400: val) unless the spec names one")
    a.add_argument("--templates", help="a file with one template a line ({} for the class "
                   "name), or one template (default: ActionCLIP's 16)")
    a.add_argument("--out", default="action.json", help="results JSON")
    a.set_defaults(fn=_action)
    from clipjax.heads import detect_cli, segment_cli

    segment_cli.register_eval(tasks)
    detect_cli.register_eval(tasks)


def register(sub) -> None:
    """Adds `classify-video` to the `clipjax` argument parser."""
    c = sub.add_parser("classify-video", help="rank labels for video files",
                       description="Score each video file (mp4, webm, avi, mkv, ...) or folder "
                       "of frames (img_00001.jpg, ...) against the labels, each in ActionCLIP's "
                       "16 templates, and print the labels ranked by probability.")
    c.add_argument("videos", nargs="+", metavar="VIDEO")
    labels = c.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "running, jumping"')
    labels.add_argument("--labels-file", metavar="FILE", help="one label a line")
    _common(c, "1x1")
    c.add_argument("--top", type=int, default=5, help="labels printed a video (default 5)")
    c.add_argument("--templates", help="a file with one template a line, or one template "
                   "(default: ActionCLIP's 16)")
    c.set_defaults(fn=_classify_video)
    from clipjax.heads import detect_cli, segment_cli, sketch_cli

    segment_cli.register(sub)
    detect_cli.register(sub)
    sketch_cli.register(sub)
