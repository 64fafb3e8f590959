"""Text -> image search over a folder: an embedding index, queries, and an HTML results page.

An index is one .npz file: unit-norm image embeddings, the image paths, and metadata naming
the architecture and the weights' fingerprint, so a query is never scored with a text tower
other than the image tower's partner.
"""

import base64
import dataclasses
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from clipjax.data import file_sources, sources
from clipjax.data.transforms import load_image
from clipjax.evals import data
from clipjax.evals.encoders import Encoders, Params, embed_images, embed_texts
from clipjax.files import atomic_write as _atomic_write

INDEX_FORMAT = "clipjax-image-index/1"


@dataclasses.dataclass
class Index:
    embeddings: np.ndarray  # [N, E] unit-norm float32
    paths: list[str]  # absolute
    arch: str
    fingerprint: str
    checkpoint: str
    skipped: list[str] = dataclasses.field(default_factory=list)

    def meta(self) -> dict:
        return {"format": INDEX_FORMAT, "arch": self.arch, "fingerprint": self.fingerprint,
                "checkpoint": self.checkpoint, "skipped": self.skipped}


def build_index(encoders: Encoders, params: Params, root: str | os.PathLike, *, arch: str,
                fingerprint: str, checkpoint: str, batch_size: int = 256,
                on_skip: Callable[[str, str, str], None] | None = None,
                progress: Callable[[int], None] | None = None) -> Index:
    """Embeds every image file under `root` (sources.list_images); files that cannot be
    decoded are skipped, reported to `on_skip(path, reason, detail)` and listed."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the folder of images to embed.")
    files = sources.list_images(str(root))
    if not files:
        raise ValueError(f"{root} holds no image files ({', '.join(sources.IMAGE_EXTENSIONS)}); "
                         "point clipjax embed at a folder that contains images.")
    images = data.SourceImages(file_sources.ImageFiles(files, str(root)), on_skip=on_skip)
    out = embed_images(encoders, params, data.batch_fn(images, batch_size)(encoders),
                       progress=progress)
    skipped = [key for key, _, _ in images.skipped]
    if "index" not in out:
        raise ValueError(f"None of the {len(files)} image files under {root} could be read; "
                         "check that they are images (the skipped files are listed above).")
    order = np.argsort(out["index"])
    return Index(out["embedding"][order],
                 [str(Path(files[i]).resolve()) for i in out["index"][order]],
                 arch, fingerprint, checkpoint, skipped)


def save_index(index: Index, path: str | os.PathLike) -> None:
    """Writes the index whole (temporary file, then rename) or not at all."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=index.embeddings, paths=np.asarray(index.paths, dtype=str),
                     meta=np.asarray(json.dumps(index.meta())))

    _atomic_write(Path(path), write)


def load_index(path: str | os.PathLike) -> Index:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Index {path} does not exist; build it with `clipjax embed DIR "
                                f"--checkpoint CKPT --out {path}`.")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            emb, paths = z["embeddings"], [str(p) for p in z["paths"]]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a clipjax image index ({e}); build one with "
                         "`clipjax embed`.") from e
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, not {INDEX_FORMAT}; rebuild "
                         "it with this version's `clipjax embed`.")
    return Index(emb, paths, meta["arch"], meta["fingerprint"], meta["checkpoint"],
                 meta.get("skipped", []))


def check_model(index: Index, arch: str, fingerprint: str, checkpoint: str) -> None:
    """One clear error when the index was embedded by other weights than the query model."""
    if (index.arch, index.fingerprint) != (arch, fingerprint):
        raise ValueError(f"The index was built with {index.arch} weights {index.fingerprint} "
                         f"({index.checkpoint}) but the checkpoint {checkpoint} holds {arch} "
                         f"weights {fingerprint}; search with the checkpoint the index was built "
                         "with, or rebuild the index with `clipjax embed`.")


def query(index: Index, txt_E: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The k best (path, cosine similarity) for one unit-norm text embedding, best first;
    equal scores keep index order."""
    scores_N = index.embeddings @ np.asarray(txt_E, np.float32)
    k = min(k, len(scores_N))
    top = np.argsort(-scores_N, kind="stable")[:k]
    return [(index.paths[i], float(scores_N[i])) for i in top]


def search(encoders: Encoders, params: Params, index: Index, queries: Sequence[str], k: int
           ) -> list[list[tuple[str, float]]]:
    txt_QE = embed_texts(encoders, params, list(queries))
    return [query(index, t, k) for t in txt_QE]


def _thumbnail(path: str, size: int = 224) -> str | None:
    """A JPEG data URI of the image, at most `size` pixels on a side; None if unreadable."""
    try:
        image = load_image(path)
    except ValueError:
        return None
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(path: str | os.PathLike, results: dict[str, list[tuple[str, float]]]) -> None:
    """A self-contained page (thumbnails inlined) with each query's ranked images."""
    style = ("body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;"
             "width:232px;vertical-align:top}img{max-width:224px;max-height:224px}"
             "figcaption{font-size:12px;word-break:break-all}")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>clipjax search</title>",
             f"<style>{style}</style></head><body>"]
    for q, hits in results.items():
        parts.append(f"<h2>{html.escape(q)}</h2>")
        for rank, (p, score) in enumerate(hits, 1):
            uri = _thumbnail(p)
            img = f"<img src='{uri}' alt=''>" if uri else "<p>(unreadable)</p>"
            parts.append(f"<figure>{img}<figcaption>{rank}. {score:.4f}<br>{html.escape(p)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text("\n".join(parts), "utf-8"))
