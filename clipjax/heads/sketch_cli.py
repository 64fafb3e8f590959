"""`clipjax sketch`: CLIPasso line drawings of images, as SVG, PNG and optionally GIF.

    clipjax sketch cat.jpg --checkpoint RN101.safetensors \\
        --saliency-checkpoint ViT-B-32.safetensors --strokes 16 --out cat.svg
    clipjax sketch photos/ --checkpoint RN101.safetensors --out sketches/ --gif

The loss tower is a ResNet CLIP (RN101 as the paper; `clipjax convert` makes the file from
OpenAI's RN101.pt) and the saliency tower a ViT CLIP (ViT-B/32); either may be a clipjax
training workdir. Images of a folder are sketched in batches of images x seeds spread over
the devices; one that cannot be read is reported and the others are still drawn.
"""

import math
import os
import sys
from pathlib import Path

import numpy as np


def load_tower(path: str, flag: str = "--checkpoint"):
    """(ResNet image tower, its params, description) of a ResNet CLIP checkpoint."""
    from clipjax import weights
    from clipjax.heads import clipasso

    w = weights.load(path)
    if w.model_config is None or not w.model_config.vision.is_resnet:
        raise ValueError(f"{flag} {path} holds {w.description}, whose image tower is not a "
                         "ResNet; CLIPasso's loss needs a ResNet CLIP such as RN101 (clipjax "
                         "convert RN101.pt RN101.safetensors).")
    return clipasso.tower_of(w.model_config), w.params["visual"], w.description


def load_saliency(path: str, flag: str = "--saliency-checkpoint"):
    """(CLIP model with a ViT image tower, its params, description)."""
    from clipjax import weights

    w = weights.load(path)
    if w.model_config is None or w.model_config.vision.is_resnet:
        raise ValueError(f"{flag} {path} holds {w.description}, whose image tower is not a ViT; "
                         "the saliency map needs a ViT CLIP's attention, such as ViT-B-32.")
    # The image tower and CLIP's scalars (setup creates them); the text tower stays unread.
    params = {k: v for k, v in w.params.items() if k == "visual" or not isinstance(v, dict)}
    return w.model(), params, w.description


def read_image(path: str, canvas: int) -> np.ndarray:
    """[canvas, canvas, 3] float32 in [0, 1]: transparency on white, squashed to a square as
    CLIPasso's get_target resizes a non-square photo (bicubic)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give image files or a folder of them.")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image)
            image = image.convert("RGB").resize((canvas, canvas), Image.BICUBIC)
    except Exception as e:  # PIL's errors name no file
        raise ValueError(f"cannot read {path} as an image ({type(e).__name__}: {e}); give a "
                         "JPEG, PNG or other image PIL opens.") from None
    return np.asarray(image, np.float32) / 255.0


def read_mask(path: str, canvas: int) -> np.ndarray:
    """[canvas, canvas] float32, 1 on the object (any non-black pixel of the mask image)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--mask {path} does not exist; give an image that is white on "
                                "the object and black elsewhere.")
    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((canvas, canvas), Image.BILINEAR)
    except Exception as e:
        raise ValueError(f"cannot read --mask {path} as an image ({type(e).__name__}).") from None
    return (np.asarray(grey, np.float32) >= 128).astype(np.float32)


def image_paths(inputs: list[str]) -> list[str]:
    """The files given, a folder's images in name order in place of the folder."""
    from clipjax.data.sources import IMAGE_EXTENSIONS

    out = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.is_file()
                           and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{item} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            out += found
        else:
            out.append(item)
    return out


def outputs(path: str, out: str | None, single: bool) -> dict[str, Path]:
    """{"svg", "png", "gif"} paths: --out FILE.svg for one image, else --out is a folder."""
    if out is not None and out.endswith(".svg"):
        if not single:
            raise ValueError(f"--out {out} names one SVG but several images are given; give a "
                             "folder for --out.")
        svg = Path(out)
    else:
        svg = Path(out or ".") / (Path(path).stem + ".svg")
    return {"svg": svg, "png": svg.with_suffix(".png"), "gif": svg.with_suffix(".gif")}


def write(sketch, files: dict[str, Path], canvas: int, gif: bool) -> None:
    """The SVG, its PNG (the rasteriser's render, what CLIP saw) and the optimisation GIF."""
    import jax.numpy as jnp
    from PIL import Image

    from clipjax.heads import raster

    files["svg"].parent.mkdir(parents=True, exist_ok=True)
    widths_S = np.full(len(sketch.points_S42), sketch.width)
    raster.write_svg(str(files["svg"]), sketch.points_S42, widths_S, sketch.opacity_S, canvas)
    grey = raster.render(jnp.asarray(sketch.points_S42), jnp.asarray(widths_S),
                         jnp.asarray(sketch.opacity_S), canvas)
    Image.fromarray(np.uint8(np.clip(np.asarray(grey), 0, 1) * 255 + 0.5)).save(files["png"])
    if gif and sketch.frames:
        raster.gif([f / 255.0 for f in sketch.frames], str(files["gif"]))


def _settings(args):
    from clipjax.heads import clipasso

    try:
        weights = tuple(float(v) for v in args.layer_weights.split(","))
    except ValueError:
        raise ValueError(f"--layer-weights {args.layer_weights!r}: give 5 numbers separated by "
                         "commas (stem, layer1..layer4), e.g. 0,0,1,1,0.") from None
    s = clipasso.Settings(strokes=args.strokes, iterations=args.iterations,
                          eval_every=args.eval_every, width=args.width, layer_weights=weights,
                          fc_weight=args.fc_weight, optimise_opacity=args.opacity)
    s.check()
    for flag, value, least in (("--seeds", args.seeds, 1), ("--canvas", args.canvas, 16),
                               ("--batch-size", args.batch_size, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: give at least {least}.")
    return s


def _sketch(args) -> None:
    from tqdm import tqdm

    from clipjax import sharding
    from clipjax.heads import clipasso

    s = _settings(args)
    paths = image_paths(args.images)
    outputs(paths[0], args.out, len(paths) == 1)  # --out FILE.svg with several images
    if args.mask and len(paths) != 1:
        raise ValueError(f"--mask names one mask but {len(paths)} images are given; sketch the "
                         "masked image on its own.")
    tower, params, name = load_tower(args.checkpoint)
    vit = vit_params = None
    if args.saliency_checkpoint:
        vit, vit_params, _ = load_saliency(args.saliency_checkpoint)
    canvas = args.canvas or tower.image_size
    mesh = sharding.create_mesh()
    shards = sharding.batch_size(mesh)
    group = args.batch_size or shards // math.gcd(shards, args.seeds)  # rows fill the mesh
    seeds_K = [args.seed + 1000 * k for k in range(args.seeds)]  # run_object_sketching's
    failed, ready, done = [], [], 0

    def run(part) -> None:  # one batch of images x seeds over the mesh
        span = f"{done + 1}-{done + len(part)}" if len(part) > 1 else f"{done + 1}"
        last = (s.iterations - 1) // s.eval_every * s.eval_every
        with tqdm(total=last, desc=f"sketch {span} of {len(paths)}", unit="it",
                  file=sys.stderr, dynamic_ncols=True) as bar:
            def progress(steps, loss):
                bar.update(steps)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            sketches = clipasso.optimise(
                tower, params, np.stack([p[1] for p in part]), np.stack([p[2] for p in part]), s,
                seeds_K=seeds_K, mesh=mesh, frames=args.gif, progress=progress)
        for (path, _, _, files), sketch in zip(part, sketches):
            write(sketch, files, canvas, args.gif)
            shown = ", ".join(str(files[k]) for k in ("svg", "png", "gif")
                              if k != "gif" or (args.gif and sketch.frames))
            print(f"# {path} -> {shown} (loss {sketch.loss:.5f}, seed {seeds_K[sketch.seed]}, "
                  f"best at iteration {sketch.best_iteration}; {name})", flush=True)

    for i, path in enumerate(paths):
        try:
            photo = read_image(path, canvas)
            mask = read_mask(args.mask, canvas) if args.mask else None
            if mask is not None:  # the object on white, as CLIPasso's --mask_object
                photo = photo * mask[..., None] + (1.0 - mask[..., None])
            files = outputs(path, args.out, len(paths) == 1)
            start = clipasso.initial_points(photo, s.strokes, seeds_K, vit, vit_params, mask)
            ready.append((path, photo, start, files))
        except (ValueError, FileNotFoundError) as e:
            print(f"clipjax sketch: {e} Sketching the others.", file=sys.stderr, flush=True)
            failed.append(path)
        if ready and (len(ready) == group or i == len(paths) - 1):
            run(ready)
            done += len(ready)
            ready = []
    if failed:
        raise ValueError(f"{len(failed)} of {len(paths)} images could not be sketched: "
                         f"{', '.join(failed)}.")


def register(sub) -> None:
    """Adds `sketch` to the `clipjax` argument parser."""
    p = sub.add_parser("sketch", help="CLIPasso line drawings of images (SVG, PNG, GIF)",
                       description="Draw each image with a few black Bézier strokes whose "
                       "control points are optimised until a frozen CLIP ResNet sees the image "
                       "in them (CLIPasso). Writes IMAGE.svg and IMAGE.png (and IMAGE.gif).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a ResNet CLIP for the "
                   "loss (RN101 as the paper): clipjax .safetensors, training workdir or "
                   "PyTorch checkpoint")
    p.add_argument("--saliency-checkpoint", default=None, metavar="CKPT", help="a ViT CLIP whose "
                   "attention places the first strokes (ViT-B-32 as the paper); without it "
                   "strokes start anywhere on the image's XDoG lines")
    p.add_argument("--strokes", type=int, default=16, help="Bézier strokes (default 16)")
    p.add_argument("--iterations", type=int, default=2001, help="at most (default 2001)")
    p.add_argument("--seeds", type=int, default=3, help="sketches an image, the lowest loss kept "
                   "(default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed; the others add 1000 each")
    p.add_argument("--mask", default=None, metavar="FILE", help="object mask (white on the "
                   "object): the image is whitened outside it and strokes start inside")
    p.add_argument("--canvas", type=int, default=None, help="canvas pixels (default: the loss "
                   "tower's image size, 224 for RN101)")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between "
                   "evaluations of the un-augmented loss (default 10)")
    p.add_argument("--width", type=float, default=1.5, help="stroke width as CLIPasso's "
                   "--width (diffvg's half width: 1.5 draws 3 px lines)")
    p.add_argument("--layer-weights", default="0,0,1,1,0", help="MSE weights of the stem and "
                   "layer1..layer4 maps (default 0,0,1,1,0)")
    p.add_argument("--fc-weight", type=float, default=0.1, help="weight of 1 - cos of the "
                   "embeddings (default 0.1)")
    p.add_argument("--opacity", action="store_true", help="also optimise stroke opacities "
                   "(Adam, lr 0.01)")
    p.add_argument("--batch-size", type=int, default=0, help="images optimised together "
                   "(default: enough for images x seeds to fill the devices)")
    p.add_argument("--out", default=None, help="FILE.svg for one image, else a folder "
                   "(default: the current folder)")
    p.add_argument("--gif", action="store_true", help="also write the optimisation as a GIF")
    p.set_defaults(fn=_sketch)
