"""Sources of image files: CSV/TSV rows, caption folders, class folders, and a list of
paths chosen in code (ImageFiles). Specs and the Source base are in sources.py."""

import csv
import io
import os
import posixpath

from clipjax.data.sources import (IMAGE_EXTENSIONS, Record, Source, _is_local, _local,
                                  list_images, open_file, read_bytes, skipped)


def _read_image(path: str) -> bytes | Record:
    """The file's bytes, or the skip record of a file that cannot be read."""
    try:
        return read_bytes(path)
    except FileNotFoundError:
        return skipped(path, "missing_image", "file does not exist")
    except OSError as e:
        return skipped(path, "unreadable_file", f"{type(e).__name__}: {e}")



class CsvSource(Source):
    """Rows of (image path, caption) from a CSV or TSV file."""

    kind = "csv"
    options_allowed = {"img_key": "image path column", "caption_key": "caption column",
                       "sep": "separator", "root": "base of relative paths"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        img_key = options.get("img_key", "filepath")
        caption_key = options.get("caption_key", "title")
        default_sep = "," if location.lower().endswith(".csv") else "\t"
        sep = {"tab": "\t", "comma": ",", "\\t": "\t"}.get(options.get("sep", default_sep),
                                                          options.get("sep", default_sep))
        if len(sep) != 1:
            raise ValueError(f"Option sep={sep!r} in {spec!r} must be one character, tab or comma.")
        root = options.get("root", posixpath.dirname(location) if not _is_local(location)
                           else os.path.dirname(os.path.abspath(_local(location))))
        try:
            with open_file(location) as f:
                text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
                reader = csv.reader(text, delimiter=sep)
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"CSV file {location!r} is empty.")
                for column in (img_key, caption_key):
                    if column not in header:
                        raise ValueError(
                            f"CSV file {location!r} has no column {column!r} (columns: "
                            f"{', '.join(header)}): pass img_key= and caption_key=, or sep= if "
                            "the separator is not " + repr(sep) + ".")
                i_img, i_cap = header.index(img_key), header.index(caption_key)
                rows = [(r[i_img], r[i_cap]) if len(r) > max(i_img, i_cap) else ("", "")
                        for r in reader if r]
        except FileNotFoundError:
            raise FileNotFoundError(f"CSV file {location!r} does not exist.") from None
        if not rows:
            raise ValueError(f"CSV file {location!r} has a header but no rows.")
        join = os.path.join if _is_local(root) else posixpath.join
        self.paths = [p if (not p or "://" in p or os.path.isabs(p)) else join(root, p)
                      for p, _ in rows]
        self.captions = [c for _, c in rows]

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path = self.paths[index]
        if not path:
            return skipped(f"row {index + 2}", "missing_image", "empty image path")
        image = _read_image(path)
        if isinstance(image, dict):
            return image
        return {"key": path, "image": image, "text": self.captions[index], "label": None}


class CaptionFolderSource(Source):
    """Images anywhere under a folder, each captioned by the .txt file beside it."""

    kind = "folder"

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        self.paths = list_images(location)
        if not self.paths:
            raise ValueError(f"Folder {location!r} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}).")

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path = self.paths[index]
        image = _read_image(path)
        if isinstance(image, dict):
            return image
        try:
            text = read_bytes(path.rsplit(".", 1)[0] + ".txt")
        except FileNotFoundError:
            text = None
        except OSError as e:
            return skipped(path, "unreadable_file", f"caption: {type(e).__name__}: {e}")
        return {"key": path, "image": image, "text": text, "label": None}


class ClassFolderSource(Source):
    """One subfolder per class, classes in sorted order (torchvision's ImageFolder)."""

    kind = "imagefolder"
    has_text = False
    has_label = True
    options_allowed = {"template": "caption template with {} for the class name"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        self.template = options.get("template")
        if self.template is not None and "{}" not in self.template:
            raise ValueError(f"Option template={self.template!r} in {spec!r} needs a {{}} where "
                             "the class name goes.")
        self.has_text = self.template is not None
        root = location.rstrip("/")
        files = list_images(root)
        # The class is the first folder below root; deeper folders belong to it.
        relative = [f[len(root) + 1:].replace(os.sep, "/") for f in files]
        pairs = [(r.split("/", 1)[0], f) for r, f in zip(relative, files) if "/" in r]
        self.class_names = sorted({c for c, _ in pairs})
        if not self.class_names:
            raise ValueError(f"Folder {location!r} holds no class subfolders with images; a "
                             "labelled image folder needs one subfolder of images per class "
                             "(root/cat/1.jpg, root/dog/2.jpg).")
        index = {c: i for i, c in enumerate(self.class_names)}
        self.paths = [f for _, f in pairs]
        self.labels = [index[c] for c, _ in pairs]

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path, label = self.paths[index], self.labels[index]
        image = _read_image(path)
        if isinstance(image, dict):
            return image
        text = self.template.format(self.class_names[label]) if self.template else None
        return {"key": path, "image": image, "text": text, "label": label}


class ImageFiles(Source):
    """Images at paths that the caller chose (`clipjax embed`'s folder walk, the images of a
    retrieval caption file): no captions, no labels, and no spec string of their own."""

    kind = "files"
    has_text = False

    def __init__(self, paths: list[str], name: str):
        super().__init__(name, name, {})
        self.paths = [os.fspath(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        image = _read_image(self.paths[index])
        if isinstance(image, dict):
            return image
        return {"key": self.paths[index], "image": image, "text": None, "label": None}


KINDS: dict[str, type[Source]] = {
    "csv": CsvSource,
    "folder": CaptionFolderSource,
    "imagefolder": ClassFolderSource,
}
