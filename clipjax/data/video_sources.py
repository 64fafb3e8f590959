"""Video datasets as users have them on disk, each named by one spec string.

    msrvtt:/data/msrvtt?split=train       CLIP4Clip's msrvtt_data: MSRVTT_data.json (20
    msrvtt:/data/msrvtt?split=test        captions a video) with MSRVTT_train.9k.csv, or the
                                          1k-A test MSRVTT_JSFUSION_test.csv (one sentence a
                                          video); videos MSRVTT_Videos/{id}.mp4 or .webm
                                          (videos/ or the root also do). captions=one (default:
                                          one random caption per video per epoch) or all
                                          (every video-caption pair a sample)
    msvd:/data/msvd?split=train|val|test  raw-captions.pkl (video id -> token lists, read with
                                          an unpickler that builds only builtin containers and
                                          strings), {split}_list.txt, YouTubeClips/{id}.avi;
                                          captions=all (default for train, as CLIP4Clip) or one
    k400:/data/k400?split=train|val       Kinetics CSVs (label,youtube_id,time_start,time_end,
                                          split) as {split}.csv in the root or annotations/;
                                          clips {youtube_id}_{start:06d}_{end:06d}.mp4 in
                                          <root>/<split>/ or <root>/<split>/<label>/
    ucf101:/data/ucf101?split=1&subset=train|test
                                          classInd.txt, trainlist0N.txt, testlist0N.txt (in the
                                          root or ucfTrainTestlist/); videos UCF-101/<Class>/
    hmdb51:/data/hmdb51?split=1&subset=train|test
                                          {class}_test_split{N}.txt (1 train, 2 test, 0 unused;
                                          in the root, splits/ or testTrainMulti_7030_splits/);
                                          videos <root>/<class>/<video>.avi
    videolist:/data/list.txt?root=/videos&labels=labels.csv
                                          mmaction's "video label" lines (0-indexed labels)
    rawframes:/data/list.txt?root=/frames&labels=labels.csv&tmpl=img_{:05d}.jpg&fps=30
                                          mmaction's "frame-dir n-frames label" lines; frames
                                          1-indexed files named by tmpl; fps (the folders' frame
                                          rate) only for CLIP4Clip's per-second sampling

Every dataset kind also takes `videos=FOLDER` where its videos are elsewhere; labels.csv is
ActionCLIP's lists/*_labels.csv (id,name). A source has `class_names` (also `classnames`)
for labelled datasets and `captions` (per video) for captioned ones. A record is {key, path,
num_frames (frame folders), captions (the video's), text (the caption a sample pairs with,
or the captions to pick one from), label}. A video that is not on disk is a skipped record
(missing_video), counted by the pipeline, never a crash; missing annotation files raise when
the source is opened. Paths are local files.
"""

import csv
import io
import json
import os
import pickle
import re

from clipjax.data.sources import Record, Source, skipped

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")


class VideoSource(Source):
    """Per-video paths, captions or labels, and the records (videos, or video-caption pairs)."""

    is_video = True
    has_text = False
    has_label = False
    extensions: tuple[str, ...] = (".mp4",)
    options_allowed = {"videos": "folder that holds the videos"}
    folder_option = "videos"  # the option that says where the videos are

    def _finish(self, keys: list[str], names: list[str], folders: list[str], *,
                captions: list[list[str]] | None = None, labels: list[int] | None = None,
                class_names: list[str] | None = None, num_frames: list[int] | None = None,
                pairs: bool = False) -> None:
        """Store the per-video fields; `names` are paths relative to each of `folders`."""
        self.keys, self.names, self.folders = keys, names, folders
        self.captions, self.labels, self.num_frames = captions, labels, num_frames
        self.class_names = class_names
        self.has_text, self.has_label = captions is not None, labels is not None
        self.pairs = None
        if pairs:
            self.pairs = [(v, c) for v, caps in enumerate(captions) for c in range(len(caps))]
        if not keys:
            raise ValueError(f"{self.spec!r} lists no videos.")
        self._check_some_exist()

    def per_video(self) -> "VideoSource":
        """The same source with one record per video (what evaluation reads)."""
        if self.pairs is None:
            return self
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, pairs=None)
        return out

    @property
    def num_videos(self) -> int:
        return len(self.keys)

    @property
    def classnames(self) -> list[str] | None:
        return self.class_names

    def __len__(self) -> int:
        return len(self.keys) if self.pairs is None else len(self.pairs)

    def candidates(self, video: int) -> list[str]:
        """Where video `video` may be, in the order looked at."""
        name = self.names[video]
        if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS or self.num_frames is not None:
            stems = [name]
        else:
            stems = [name + ext for ext in self.extensions]
        return [os.path.join(folder, stem) for folder in self.folders for stem in stems]

    def find(self, video: int) -> str | None:
        exists = os.path.isdir if self.num_frames is not None else os.path.isfile
        return next((p for p in self.candidates(video) if exists(p)), None)

    def _check_some_exist(self) -> None:
        # A wrong root shows at once; single missing videos are skipped while reading.
        n = self.num_videos
        probe = sorted({i * n // 16 for i in range(16)})
        if all(self.find(i) is None for i in probe):
            where = " or ".join(self.folders[:3])
            raise FileNotFoundError(
                f"None of {len(probe)} videos of {self.spec!r} looked for is on disk (e.g. "
                f"{self.candidates(0)[0]}): put the videos under {where}, or pass "
                f"{self.folder_option}=FOLDER.")

    def read(self, index: int) -> Record:
        video, caption = (index, None) if self.pairs is None else self.pairs[index]
        key = self.keys[video]
        path = self.find(video)
        if path is None:
            return skipped(key, "missing_video", f"not at {self.candidates(video)[0]}")
        record = {"key": key, "path": path, "text": None, "label": None, "skip": None}
        if self.num_frames is not None:
            record["num_frames"] = self.num_frames[video]
        if self.captions is not None:
            record["captions"] = list(self.captions[video])
            # What the pipeline reads: the pair's caption, or all of them to pick one from.
            record["text"] = (record["captions"][caption] if caption is not None
                              else record["captions"])
        if self.labels is not None:
            record["label"] = self.labels[video]
        return record


# ---------------------------------------------------------------------------------------
# Shared file handling.


def _find_file(root: str, subfolders: tuple[str, ...], names: tuple[str, ...], what: str,
               fix: str) -> str:
    """The first of root/sub/name that exists, or one FileNotFoundError naming what to do."""
    for name in names:
        for sub in subfolders:
            path = os.path.join(root, sub, name)
            if os.path.isfile(path):
                return path
    looked = ", ".join(os.path.join(root, s) for s in subfolders if s)
    named = names[0] + "".join(f" or {n}" for n in names[1:])
    raise FileNotFoundError(f"{what} {named} is not in {root}"
                            + (f" nor in {looked}" if looked else "") + f": {fix}")


def _folders(root: str, options: dict, subfolders: tuple[str, ...]) -> list[str]:
    """The video folders to look in: videos= if given, else the conventional ones present."""
    if "videos" in options:
        if not os.path.isdir(options["videos"]):
            raise FileNotFoundError(f"Video folder {options['videos']!r} does not exist: fix "
                                    "the videos= option.")
        return [options["videos"]]
    found = [os.path.join(root, s) for s in subfolders if os.path.isdir(os.path.join(root, s))]
    return found or [root]


def _root(location: str, what: str) -> str:
    if not os.path.isdir(location):
        raise FileNotFoundError(f"{what} folder {location!r} does not exist: point the spec at "
                                "the folder that holds its annotation files.")
    return location


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in csv.DictReader(f)]


def _columns(rows: list[dict], path: str, needed: tuple[str, ...]) -> None:
    have = list(rows[0]) if rows else []
    missing = [c for c in needed if c not in have]
    if missing:
        raise ValueError(f"{path!r} has no column {missing[0]!r} (columns: {', '.join(have)}); "
                         f"it needs {', '.join(needed)}.")


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _choice(options: dict, name: str, allowed: tuple[str, ...], default: str, spec: str) -> str:
    value = options.get(name, default)
    if value not in allowed:
        raise ValueError(f"Option {name}={value!r} in {spec!r} must be one of "
                         f"{', '.join(allowed)}.")
    return value


def read_labels_csv(path: str) -> list[str]:
    """Class names by id from an `id,name` CSV (ActionCLIP's lists/*_labels.csv)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Labels file {path!r} does not exist: fix the labels= option.")
    rows = _read_csv(path)
    _columns(rows, path, ("id", "name"))
    by_id = {int(r["id"]): r["name"] for r in rows}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{path!r} must number its classes 0, 1, 2, ... without gaps.")
    return [by_id[i] for i in range(len(by_id))]


def readable(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'brush_hair' -> 'brush hair'."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return " ".join(name.replace("_", " ").split()).lower()


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds builtin containers, strings and numbers; refuses every class and function."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"Refusing to load {self._path!r}: it asks for {module}.{name}, and only dicts, "
            "lists and strings are read from a pickle; rebuild the file from plain data.")


def load_data_pickle(path: str):
    """A pickle of plain data (dicts, lists, tuples, strings, numbers), never code."""
    with open(path, "rb") as f:
        return _DataOnlyUnpickler(io.BytesIO(f.read()), path).load()


# ---------------------------------------------------------------------------------------
# Caption datasets (CLIP4Clip).


class MsrvttSource(VideoSource):
    kind = "msrvtt"
    extensions = (".mp4", ".webm")
    options_allowed = {**VideoSource.options_allowed, "split": "train or test",
                       "captions": "one or all"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _root(location, "MSR-VTT")
        split = _choice(options, "split", ("train", "test"), "train", spec)
        fix = ("point msrvtt: at the folder holding MSRVTT_data.json, MSRVTT_train.9k.csv and "
               "MSRVTT_JSFUSION_test.csv (CLIP4Clip's msrvtt_data).")
        subs = ("", "msrvtt_data", "annotations")
        if split == "train":
            ids_csv = _find_file(root, subs, ("MSRVTT_train.9k.csv",), "MSR-VTT file", fix)
            rows = _read_csv(ids_csv)
            _columns(rows, ids_csv, ("video_id",))
            ids = [r["video_id"] for r in rows]
            data = _find_file(root, subs, ("MSRVTT_data.json",), "MSR-VTT file", fix)
            with open(data, encoding="utf-8") as f:
                sentences = json.load(f)["sentences"]
            by_video: dict[str, list[str]] = {i: [] for i in ids}
            for s in sorted(sentences, key=lambda s: s.get("sen_id", 0)):
                if s["video_id"] in by_video:
                    by_video[s["video_id"]].append(s["caption"])
            captions = [by_video[i] for i in ids]
            how = _choice(options, "captions", ("one", "all"), "one", spec)
        else:
            test_csv = _find_file(root, subs, ("MSRVTT_JSFUSION_test.csv",), "MSR-VTT file", fix)
            rows = _read_csv(test_csv)
            _columns(rows, test_csv, ("video_id", "sentence"))
            ids = [r["video_id"] for r in rows]
            captions = [[r["sentence"]] for r in rows]
            how = _choice(options, "captions", ("one", "all"), "one", spec)
        folders = _folders(root, options, ("MSRVTT_Videos", "videos", "videos/all"))
        self._finish(ids, ids, folders, captions=captions, pairs=how == "all")


class MsvdSource(VideoSource):
    kind = "msvd"
    extensions = (".avi", ".mp4", ".webm", ".mkv")
    options_allowed = {**VideoSource.options_allowed, "split": "train, val or test",
                       "captions": "one or all"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _root(location, "MSVD")
        split = _choice(options, "split", ("train", "val", "test"), "train", spec)
        fix = ("point msvd: at the folder holding raw-captions.pkl and train_list.txt, "
               "val_list.txt, test_list.txt (CLIP4Clip's msvd_data).")
        subs = ("", "msvd_data")
        pkl = _find_file(root, subs, ("raw-captions.pkl",), "MSVD file", fix)
        ids = _lines(_find_file(root, subs, (f"{split}_list.txt",), "MSVD file", fix))
        raw = load_data_pickle(pkl)
        if not isinstance(raw, dict):
            raise ValueError(f"{pkl!r} holds a {type(raw).__name__}, not a dict from video id to "
                             "captions.")
        captions = []
        for video in ids:
            if video not in raw:
                raise ValueError(f"{pkl!r} has no captions for {video!r} of {split}_list.txt.")
            captions.append([_caption(c) for c in raw[video]])
        how = _choice(options, "captions", ("one", "all"), "all" if split == "train" else "one",
                      spec)
        folders = _folders(root, options, ("YouTubeClips", "videos"))
        self._finish(ids, ids, folders, captions=captions, pairs=how == "all")


def _caption(tokens) -> str:
    """A caption stored as a token list (or a string) as one string."""
    if isinstance(tokens, (list, tuple)):
        return " ".join(t.decode() if isinstance(t, bytes) else str(t) for t in tokens)
    return tokens.decode() if isinstance(tokens, bytes) else str(tokens)


# ---------------------------------------------------------------------------------------
# Action datasets (ActionCLIP).


class K400Source(VideoSource):
    kind = "k400"
    extensions = (".mp4", ".mkv", ".webm")
    options_allowed = {**VideoSource.options_allowed, "split": "train, val or test"}
    _ALIASES = {"train": ("train",), "val": ("val", "validate", "validation"),
                "test": ("test",)}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _root(location, "Kinetics")
        split = _choice(options, "split", ("train", "val", "test"), "train", spec)
        aliases = self._ALIASES[split]
        table = _find_file(root, ("", "annotations", "kinetics400"),
                           tuple(f"{a}.csv" for a in aliases), "Kinetics annotation file",
                           "point k400: at the folder holding train.csv and validate.csv "
                           "(label,youtube_id,time_start,time_end,split).")
        rows = _read_csv(table)
        _columns(rows, table, ("label", "youtube_id", "time_start", "time_end"))
        self.class_names = sorted({r["label"] for r in rows})
        index = {c: i for i, c in enumerate(self.class_names)}
        names = [f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_"
                 f"{int(float(r['time_end'])):06d}" for r in rows]
        self._label_dirs = [r["label"] for r in rows]
        folders = _folders(root, options, aliases)
        self._finish(names, names, folders, labels=[index[r["label"]] for r in rows],
                     class_names=self.class_names)

    def candidates(self, video: int) -> list[str]:
        label = self._label_dirs[video]
        subs = dict.fromkeys(("", label, label.replace(" ", "_")))
        return [os.path.join(folder, sub, self.names[video] + ext) if sub
                else os.path.join(folder, self.names[video] + ext)
                for folder in self.folders for sub in subs for ext in self.extensions]


class Ucf101Source(VideoSource):
    kind = "ucf101"
    extensions = (".avi",)
    options_allowed = {**VideoSource.options_allowed, "split": "1, 2 or 3",
                       "subset": "train or test"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _root(location, "UCF101")
        split = _choice(options, "split", ("1", "2", "3"), "1", spec)
        subset = _choice(options, "subset", ("train", "test"), "train", spec)
        fix = ("point ucf101: at the folder holding ucfTrainTestlist/ (classInd.txt, "
               "trainlist01.txt).")
        subs = ("", "ucfTrainTestlist")
        folder_names = []
        for line in _lines(_find_file(root, subs, ("classInd.txt",), "UCF101 file", fix)):
            number, name = line.split(maxsplit=1)
            if int(number) != len(folder_names) + 1:
                raise ValueError(f"classInd.txt must number its classes 1, 2, 3, ...; line "
                                 f"{line!r} breaks the order.")
            folder_names.append(name.strip())
        by_folder = {n.lower(): i for i, n in enumerate(folder_names)}
        lines = _lines(_find_file(root, subs, (f"{subset}list0{split}.txt",), "UCF101 file", fix))
        names, labels = [], []
        for line in lines:
            parts = line.split()
            name = parts[0].replace("\\", "/")
            folder = name.split("/", 1)[0].lower()
            if folder not in by_folder:
                raise ValueError(f"Video {name!r} of {subset}list0{split}.txt is in no class of "
                                 "classInd.txt.")
            # trainlist labels are 1-indexed classInd numbers; testlist has none: the folder.
            labels.append(int(parts[1]) - 1 if len(parts) > 1 else by_folder[folder])
            names.append(name)
        folders = _folders(root, options, ("UCF-101", "UCF101", "videos"))
        self._finish([os.path.splitext(n)[0] for n in names], names, folders, labels=labels,
                     class_names=[readable(n) for n in folder_names])


class Hmdb51Source(VideoSource):
    kind = "hmdb51"
    extensions = (".avi",)
    options_allowed = {**VideoSource.options_allowed, "split": "1, 2 or 3",
                       "subset": "train or test"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _root(location, "HMDB51")
        split = _choice(options, "split", ("1", "2", "3"), "1", spec)
        subset = _choice(options, "subset", ("train", "test"), "train", spec)
        pattern = re.compile(rf"^(.+)_test_split{split}\.txt$")
        split_dir, files = None, {}
        for sub in ("testTrainMulti_7030_splits", "splits", "test_train_splits", ""):
            directory = os.path.join(root, sub)
            if os.path.isdir(directory):
                files = {m.group(1): m.group(0) for f in sorted(os.listdir(directory))
                         if (m := pattern.match(f))}
                if files:
                    split_dir = directory
                    break
        if not files:
            raise FileNotFoundError(
                f"No HMDB51 split files *_test_split{split}.txt in {root!r} or its "
                "testTrainMulti_7030_splits/: point hmdb51: at the folder that holds them.")
        classes = sorted(files)
        wanted = "1" if subset == "train" else "2"
        names, labels = [], []
        for label, cls in enumerate(classes):
            for line in _lines(os.path.join(split_dir, files[cls])):
                video, use = line.split()[:2]
                if use == wanted:
                    names.append(f"{cls}/{video}")
                    labels.append(label)
        folders = _folders(root, options, ("hmdb51_org", "videos"))
        self._finish([os.path.splitext(n)[0] for n in names], names, folders, labels=labels,
                     class_names=[readable(c) for c in classes])


class VideoListSource(VideoSource):
    """mmaction's video list: "path label" per line, paths relative to root=."""

    kind = "videolist"
    folder_option = "root"
    options_allowed = {"root": "folder the listed paths start from",
                       "labels": "id,name CSV of class names"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        lines = self._list(location, 1)
        names = [parts[0] for parts in lines]
        labels = [int(parts[1]) for parts in lines]
        self._finish(names, names, [self._root(location, options)], labels=labels,
                     class_names=self._classes(options, labels))

    def _list(self, location: str, fields: int) -> list[list[str]]:
        if not os.path.isfile(location):
            raise FileNotFoundError(f"List file {location!r} does not exist: fix the path after "
                                    f"'{self.kind}:'.")
        out = []
        for number, line in enumerate(_lines(location), 1):
            parts = line.rsplit(maxsplit=fields)
            if len(parts) != fields + 1 or not all(p.lstrip("-").isdigit() for p in parts[1:]):
                what = "path label" if fields == 1 else "frame-folder frame-count label"
                raise ValueError(f"Line {number} of {location!r} is {line!r}; each line must be "
                                 f"'{what}'.")
            out.append(parts)
        return out

    def _root(self, location: str, options: dict) -> str:
        root = options.get("root", os.path.dirname(os.path.abspath(location)))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Folder {root!r} does not exist: fix the root= option.")
        return root

    def _classes(self, options: dict, labels: list[int]) -> list[str] | None:
        if "labels" not in options:
            return None
        names = read_labels_csv(options["labels"])
        if labels and max(labels) >= len(names):
            raise ValueError(f"Label {max(labels)} in {self.location!r} is beyond the "
                             f"{len(names)} classes of {options['labels']!r}.")
        return names


class RawFramesSource(VideoListSource):
    """mmaction's rawframes list: "frame-folder frame-count label"; frames 1-indexed files."""

    kind = "rawframes"
    options_allowed = {**VideoListSource.options_allowed,
                       "tmpl": "frame file name, e.g. img_{:05d}.jpg",
                       "fps": "frame rate of the folders (for CLIP4Clip sampling)"}

    def __init__(self, spec, location, options):
        Source.__init__(self, spec, location, options)
        self.tmpl = options.get("tmpl", "img_{:05d}.jpg")
        try:
            self.tmpl.format(1)
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"Option tmpl={self.tmpl!r} in {spec!r} must hold one {{}} field "
                             "for the frame number, e.g. img_{:05d}.jpg.") from None
        self.fps = float(options["fps"]) if "fps" in options else None
        lines = self._list(location, 2)
        names = [parts[0] for parts in lines]
        labels = [int(parts[2]) for parts in lines]
        self._finish(names, names, [self._root(location, options)], labels=labels,
                     class_names=self._classes(options, labels),
                     num_frames=[int(parts[1]) for parts in lines])


KINDS: dict[str, type[VideoSource]] = {
    "msrvtt": MsrvttSource,
    "msvd": MsvdSource,
    "k400": K400Source,
    "ucf101": Ucf101Source,
    "hmdb51": Hmdb51Source,
    "videolist": VideoListSource,
    "rawframes": RawFramesSource,
}
