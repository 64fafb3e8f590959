"""Data sources: specs, every bad-input kind counted exactly, CSV/folders/TFDS/ArrayRecord."""

import io
import json
import logging
import os
import re
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from clipjax import cli, tfrecord
from clipjax.data import arrayrecord, pipeline, sources, transforms, wds_source
from clipjax.data.transforms import CLIP_MEAN, CLIP_STD
from clipjax.tokenizer import tokenize

# ---------------------------------------------------------------------------------------
# Builders of test data, shared with test_data_pipeline.py.


def jpeg_bytes(seed: int, size=(20, 16), quality: int = 90) -> bytes:
    pixels_HWC = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels_HWC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(pixels_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels_HWC).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10 gigapixels: what a decompression bomb looks like to PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def caption(i: int) -> str:
    return f"sample {i}"


def write_wds(folder, shards: int, per_shard: int, start: int = 0) -> str:
    """Good samples `start`, `start + 1`, ...; returns the wds: spec."""
    os.makedirs(folder, exist_ok=True)
    i = start
    for s in range(shards):
        members = []
        for _ in range(per_shard):
            members += [(f"{i:06d}.jpg", jpeg_bytes(i)), (f"{i:06d}.txt", caption(i).encode()),
                        (f"{i:06d}.json", b"{}")]
            i += 1
        write_tar(os.path.join(folder, f"{s:05d}.tar"), members)
    return f"wds:{folder}/{{00000..{shards - 1:05d}}}.tar"


def write_caption_folder(folder, n: int) -> str:
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"{i:04d}.jpg"), "wb") as f:
            f.write(jpeg_bytes(i))
        with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
            f.write(caption(i))
    return f"folder:{folder}"


_CAPTION_OF_TOKENS: dict = {}


def captions_of(batch) -> list[str]:
    """The caption of each row, recognised by its token ids."""
    if not _CAPTION_OF_TOKENS:
        for i in range(2000):
            _CAPTION_OF_TOKENS[tokenize(caption(i))[0].tobytes()] = caption(i)
    return [_CAPTION_OF_TOKENS[row.tobytes()] for row in np.asarray(batch["text"], np.int32)]


def read_all(spec, **kw) -> tuple[list[str], pipeline.DataIterator]:
    it = pipeline.make_iterator(spec, global_batch_size=kw.pop("batch", 4), image_size=16,
                                train=False, process_index=0, process_count=1, num_workers=0, **kw)
    out = []
    for batch in it:
        out += captions_of(batch)
    return out, it


# ---------------------------------------------------------------------------------------
# Specs.


def test_expand_braces():
    assert wds_source.expand_braces("s/{008..011}.tar") == [f"s/{i:03d}.tar" for i in range(8, 12)]
    assert wds_source.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert wds_source.expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("s/{3..1}.tar", "s/{00..02.tar", "s/{x}.tar"):
        with pytest.raises(ValueError):
            wds_source.expand_braces(bad)


def test_parse_spec_options_and_errors():
    assert sources.parse_spec("csv:/d/t.csv?img_key=path&caption_key=cap") == (
        "csv", "/d/t.csv", {"img_key": "path", "caption_key": "cap"})
    # A glob's ? is part of the path, not the start of options.
    assert sources.parse_spec("arrayrecord:/d/part-?????.array_record") == (
        "arrayrecord", "/d/part-?????.array_record", {})
    assert sources.parse_spec("wds:gs://b/x/{0..9}.tar?weight=2")[2] == {"weight": "2"}
    # format_spec is the inverse, whatever the option values hold.
    parts = ("tfds", "ds:1.0.0", {"data_dir": "/a b/c+d&e?f=g", "split": "train[:10%]"})
    assert sources.parse_spec(sources.format_spec(*parts)) == parts
    with pytest.raises(ValueError, match="Unknown data source kind 'webdataset'"):
        sources.open_source("webdataset:/x")
    with pytest.raises(ValueError, match="has no kind"):
        sources.open_source("/just/a/path")


def test_source_errors_before_training(tmp_path):
    spec = write_wds(tmp_path / "w", 2, 1)
    with pytest.raises(FileNotFoundError,
                       match=r"2 of 4 WebDataset shards do not exist: .*00002.tar"):
        sources.open_source(spec.replace("00001", "00003"))
    with pytest.raises(ValueError, match="Unknown option 'wieght'"):
        sources.open_source(spec + "?wieght=2")
    with pytest.raises(ValueError, match="weight=-1"):
        sources.open_source(spec + "?weight=-1")
    with pytest.raises(FileNotFoundError, match="CSV file"):
        sources.open_source(f"csv:{tmp_path}/none.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.open_source(f"folder:{tmp_path}/none")
    with pytest.raises(FileNotFoundError, match="No .array_record files"):
        sources.open_source(f"arrayrecord:{tmp_path}/w")
    with pytest.raises(ValueError, match="does not divide over 3 hosts"):
        pipeline.make_iterator(spec, global_batch_size=8, image_size=16, train=True,
                               process_index=0, process_count=3, num_workers=0)
    # The command line turns these into one line and exit status 2.
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "info", spec.replace("00001", "00003")])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------
# Bad input: each kind skipped, counted and logged with its key; no good sample lost.


def _bad_shards(folder) -> tuple[str, list[str], dict[str, int]]:
    os.makedirs(folder)
    truncated_jpeg = jpeg_bytes(0, (48, 40))
    good = [(i, jpeg_bytes(i)) for i in range(5)]
    members = []
    for i, data in good[:3]:
        members += [(f"g{i}.jpg", data), (f"g{i}.txt", caption(i).encode())]
    members += [
        ("corrupt.jpg", b"not an image \x00\xff" * 10), ("corrupt.txt", b"x"),
        ("truncated.jpg", truncated_jpeg[:len(truncated_jpeg) // 2]), ("truncated.txt", b"x"),
        ("empty.jpg", b""), ("empty.txt", b"x"),
        ("big.png", png_bytes(np.zeros((100, 200, 3), np.uint8))), ("big.txt", b"x"),
        ("bomb.png", bomb_png()), ("bomb.txt", b"x"),
        ("nocaption.jpg", jpeg_bytes(9)),                       # a member without its pair
        ("blank.jpg", jpeg_bytes(10)), ("blank.txt", b"  \n "),
        ("latin1.jpg", jpeg_bytes(11)), ("latin1.txt", "café".encode("latin-1")),
        ("noimage.txt", b"a caption without an image"),         # the other unpaired member
    ]
    members += [("g3.jpg", good[3][1]), ("g3.txt", caption(3).encode()),
                ("g4.webp", _webp(4)), ("g4.txt", caption(4).encode())]
    write_tar(os.path.join(folder, "00000.tar"), members)
    # A shard cut inside its third image: the two samples before the cut are kept.
    whole = os.path.join(folder, "whole.tar")
    write_tar(whole, [m for i in (5, 6, 7) for m in ((f"g{i}.jpg", jpeg_bytes(i, (64, 64))),
                                                     (f"g{i}.txt", caption(i).encode()))])
    with tarfile.open(whole) as tar:
        third = tar.getmember("g7.jpg")
    data = open(whole, "rb").read()
    os.remove(whole)
    with open(os.path.join(folder, "00001.tar"), "wb") as f:
        f.write(data[:third.offset_data + third.size // 2])
    open(os.path.join(folder, "00002.tar"), "wb").close()  # zero bytes
    expected = {"corrupt_image": 1, "truncated_image": 1, "empty_image": 1, "image_too_large": 2,
                "missing_caption": 2, "caption_not_utf8": 1, "missing_image": 1,
                "truncated_shard": 2}
    bad_keys = ["corrupt", "truncated", "empty", "big", "bomb", "nocaption", "blank", "latin1",
                "noimage", "00001.tar", "00002.tar"]
    return f"wds:{folder}/{{00000..00002}}.tar?max_pixels=10000", bad_keys, expected


def _webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(seed))).save(buf, "WEBP")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    spec, bad_keys, expected = _bad_shards(tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="clipjax.data"):
        got, it = read_all(spec, batch=3)
    assert sorted(got) == sorted(caption(i) for i in range(7))
    stats = it.stats()
    assert stats == {f"skipped/{k}": v for k, v in expected.items()}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key in bad_keys:
        assert key in logged, key
    assert it.summary().startswith("Skipped 11 samples:")


def test_all_bad_data_stops_with_a_clear_error(tmp_path):
    write_tar(tmp_path / "0.tar", [(f"k{i}.jpg", b"junk") for i in range(40)])
    it = pipeline.make_iterator(f"wds:{tmp_path}/0.tar", global_batch_size=2, image_size=16,
                                train=True, process_index=0, process_count=1, num_workers=0,
                                max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match=r"samples were all skipped \(missing_caption"):
        next(it)


def test_tars_through_fsspec_urls(tmp_path):
    """Remote shards go through fsspec; its in-memory filesystem stands in for gs:// or s3://."""
    import fsspec
    fs = fsspec.filesystem("memory")
    write_wds(tmp_path / "w", shards=2, per_shard=3)
    for name in ("00000.tar", "00001.tar"):
        fs.pipe(f"/bucket/shards/{name}", (tmp_path / "w" / name).read_bytes())
    try:
        got, _ = read_all("wds:memory://bucket/shards/{00000..00001}.tar")
        assert sorted(got) == [caption(i) for i in range(6)]
        with pytest.raises(FileNotFoundError, match="1 of 3 WebDataset shards do not exist: "
                                                    "memory://bucket/shards/00002.tar"):
            sources.open_source("wds:memory://bucket/shards/{00000..00002}.tar")
    finally:
        fs.rm("/bucket", recursive=True)


# ---------------------------------------------------------------------------------------
# CSV and folders.


def test_csv_source(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    rows = [b"filepath\ttitle\tother", b"img/0.jpg\tsample 0\tz",
            f"{tmp_path}/img/1.jpg\tsample 1\tz".encode(), b"img/missing.jpg\tsample 7\tz",
            b"img/2.jpg\tbad \xff caption\tz", b"img/2.jpg\t \tz", b"img/2.jpg\tsample 2\tz"]
    (tmp_path / "train.tsv").write_bytes(b"\n".join(rows) + b"\n")
    got, it = read_all(f"csv:{tmp_path}/train.tsv")
    assert got == [caption(0), caption(1), caption(2)]
    assert it.stats() == {
        "skipped/missing_image": 1, "skipped/caption_not_utf8": 1, "skipped/missing_caption": 1}
    # OpenCLIP's option names; comma-separated .csv by default; columns checked up front.
    (tmp_path / "t.csv").write_text("path,cap\nimg/0.jpg,sample 0\n")
    assert read_all(f"csv:{tmp_path}/t.csv?img_key=path&caption_key=cap")[0] == [caption(0)]
    with pytest.raises(ValueError, match=r"no column 'filepath' \(columns: path, cap\)"):
        sources.open_source(f"csv:{tmp_path}/t.csv")


def test_caption_folder_and_class_folder(tmp_path):
    write_caption_folder(tmp_path / "caps", 5)
    os.remove(tmp_path / "caps" / "0003.txt")
    got, it = read_all(f"folder:{tmp_path}/caps")
    assert got == [caption(i) for i in (0, 1, 2, 4)]
    assert it.stats()["skipped/missing_caption"] == 1
    # Evaluation batches hold exactly what the OpenCLIP-exact eval transform gives.
    batch = next(pipeline.make_iterator(f"folder:{tmp_path}/caps", global_batch_size=2,
                                        image_size=12, train=False, process_index=0,
                                        process_count=1, num_workers=0))
    np.testing.assert_array_equal(
        batch["image"][1], transforms.eval_transform(str(tmp_path / "caps" / "0001.jpg"), 12))

    for name, count in (("zebra", 2), ("ant", 3), ("moth", 1)):
        (tmp_path / "cls" / name / "sub").mkdir(parents=True)
        for i in range(count):
            (tmp_path / "cls" / name / ("sub" if i else "") / f"{i}.png").write_bytes(
                png_bytes(np.full((8, 8, 3), i, np.uint8)))
    # Hidden files and folders are not images of the dataset (macOS's ._ files, .git).
    (tmp_path / "cls" / "ant" / "._0.png").write_bytes(b"AppleDouble metadata")
    (tmp_path / "cls" / ".git").mkdir()
    (tmp_path / "cls" / ".git" / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    names, it = pipeline.classification_eval(f"imagefolder:{tmp_path}/cls", global_batch_size=4,
                                             image_size=16, process_index=0, process_count=1)
    batches = list(it)
    assert names == ["ant", "moth", "zebra"]
    assert [len(b["label"]) for b in batches] == [4, 2]
    assert set(batches[0]) == {"image", "label", "index"}
    assert np.concatenate([b["label"] for b in batches]).tolist() == [0, 0, 0, 1, 2, 2]
    assert it.stats() == {}
    # With a caption template a class folder also gives text.
    src = sources.open_source(f"imagefolder:{tmp_path}/cls?template=a photo of a {{}}.")
    assert src.read(3)["text"] == "a photo of a moth."


# ---------------------------------------------------------------------------------------
# TFDS without TensorFlow: array_record through tfds.data_source, tfrecord by our reader.


def _tfds_builders():
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():
        class TinyCaptions(tfds.core.GeneratorBasedBuilder):
            """coco_captions' feature layout: captions as a sequence of {id, text}."""
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "image/id": np.int64,
                    "captions": tfds.features.Sequence({"id": np.int64,
                                                        "text": tfds.features.Text()}),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(6):
                    # Encoded bytes, not arrays: TFDS encodes arrays with TensorFlow.
                    yield i, {"image": io.BytesIO(jpeg_bytes(i)), "image/id": i,
                              "captions": {"id": [i, 100 + i],
                                           "text": [caption(i), caption(100 + i)]}}

        class TinyClasses(tfds.core.GeneratorBasedBuilder):
            """cifar10's feature layout."""
            VERSION = tfds.core.Version("3.0.2")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["airplane", "bird", "cat"]),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(9), "test": self._generate_examples(4)}

            def _generate_examples(self, n):
                for i in range(n):
                    yield i, {"id": f"e{i}", "label": i % 3,
                              "image": io.BytesIO(png_bytes(np.full((8, 8, 3), 10 * i, np.uint8)))}
    return TinyCaptions, TinyClasses


def _to_tfrecord(array_record_dir: str, out_dir: str) -> None:
    """The same dataset with its records in TFRecord files, as `tfds build` writes by default."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    shutil.copytree(array_record_dir, out_dir)
    for name in os.listdir(out_dir):
        if ".array_record-" in name:
            path = os.path.join(out_dir, name)
            records = ArrayRecordDataSource([path])
            with open(path.replace(".array_record-", ".tfrecord-"), "wb") as f:
                for i in range(len(records)):
                    data = records[i]
                    length = struct.pack("<Q", len(data))
                    f.write(length + struct.pack("<I", tfrecord.masked_crc32c(length)) + data
                            + struct.pack("<I", tfrecord.masked_crc32c(data)))
            os.remove(path)
    info_path = os.path.join(out_dir, "dataset_info.json")
    info = json.load(open(info_path))
    info["fileFormat"] = "tfrecord"
    json.dump(info, open(info_path, "w"))


def test_crc32c_matches_an_independent_implementation():
    from tensorboardX.crc32c import crc32c as reference  # its own table, pure Python

    assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    # Both of our paths (the byte loop below 2 KiB, NumPy lanes above) and their edges.
    lengths = [*range(70), 2047, 2048, 2049, 4097, 20_001, *rng.integers(0, 8_000, 20)]
    for n in lengths:
        data = rng.integers(0, 256, n, np.uint8).tobytes()
        assert tfrecord.crc32c(data) == reference(data), n


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    """(array_record data_dir, tfrecord data_dir) holding tiny_captions and tiny_classes."""
    import sys
    tiny_captions, tiny_classes = _tfds_builders()
    root = tmp_path_factory.mktemp("tfds")
    ar_dir, tfr_dir = str(root / "ar"), str(root / "tfr")
    for builder in (tiny_captions, tiny_classes):
        builder(data_dir=ar_dir, file_format="array_record").download_and_prepare()
        _to_tfrecord(os.path.join(ar_dir, builder.name, str(builder.VERSION)),
                     os.path.join(tfr_dir, builder.name, str(builder.VERSION)))
    assert "tensorflow" not in sys.modules
    return ar_dir, tfr_dir


def test_tfds_array_record_and_tfrecord_without_tensorflow(tfds_dirs):
    import sys
    ar_dir, tfr_dir = tfds_dirs
    results = {}
    for data_dir in (ar_dir, tfr_dir):
        src = sources.open_source(f"tfds:tiny_captions?data_dir={data_dir}")
        file_format = "array_record" if data_dir == ar_dir else "tfrecord"
        assert src.file_format == file_format
        assert (src.text_key, src.has_label) == ("captions/text", False)
        got, _ = read_all(src)  # evaluation reads the first caption of each image
        assert sorted(got) == [caption(i) for i in range(6)]
        # Training picks one of the captions per visit, from the sample's own generator.
        train = pipeline.make_iterator(src, global_batch_size=6, image_size=16, train=True,
                                       process_index=0, process_count=1, num_workers=0)
        seen = set()
        for _ in range(8):
            seen.update(captions_of(next(train)))
        assert seen == {caption(i) for i in range(6)} | {caption(100 + i) for i in range(6)}

        names, it = pipeline.classification_eval(
            f"tfds:tiny_classes:3.0.2?data_dir={data_dir}&split=train[:6]", global_batch_size=4,
            image_size=8)
        batches = list(it)
        labels = np.concatenate([b["label"] for b in batches])
        means = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
        assert names == ["airplane", "bird", "cat"]
        results[data_dir] = (sorted(got), labels.tolist(), means.tolist())
    # Both storage formats give the same samples.
    assert results[ar_dir] == results[tfr_dir]
    # Example i is a constant image of value 10 i with label i % 3 (TFDS stores them shuffled,
    # so train[:6] is some six of the nine).
    labels, means = results[ar_dir][1], results[ar_dir][2]
    ids = np.round((np.asarray(means) * CLIP_STD[0] + CLIP_MEAN[0]) * 255 / 10).astype(int)
    assert len(set(ids.tolist())) == 6 and set(ids.tolist()) <= set(range(9))
    assert [i % 3 for i in ids] == labels

    with pytest.raises(ValueError, match="split 'validation' is not available"):
        sources.open_source(f"tfds:tiny_classes?data_dir={ar_dir}&split=validation")
    with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset 'coco_captions'"):
        sources.open_source(f"tfds:coco_captions?data_dir={ar_dir}")
    # The split is an option; after a second colon comes a version, and the old form says so.
    with pytest.raises(ValueError, match=re.escape(
            f"give the split as an option: 'tfds:tiny_classes?data_dir={ar_dir}&split=test'.")):
        sources.open_source(f"tfds:tiny_classes:test?data_dir={ar_dir}")
    assert "tensorflow" not in sys.modules  # nothing above imported it


def test_tfrecord_data_that_fail_their_crc_are_skipped(tfds_dirs, tmp_path):
    """A byte flipped inside a record's data, its framing intact: the data CRC fails, so the
    record is skipped and counted, never read as it is."""
    data_dir = tmp_path / "tfr"
    shutil.copytree(tfds_dirs[1], data_dir)
    (path,) = (data_dir / "tiny_captions" / "1.0.0").glob("*.tfrecord-*")
    blob = bytearray(path.read_bytes())
    at = blob.index(caption(3).encode())  # example 3's first caption
    blob[at + len("sample ")] = ord("4")  # "sample 3" -> "sample 4": still a valid example
    path.write_bytes(bytes(blob))
    got, it = read_all(f"tfds:tiny_captions?data_dir={data_dir}")
    assert sorted(got) == [caption(i) for i in (0, 1, 2, 4, 5)]
    assert it.stats() == {"skipped/corrupt_record": 1}


# ---------------------------------------------------------------------------------------
# Conversion to ArrayRecord.


def test_convert_to_arrayrecord_keeps_every_good_sample(tmp_path, capsys):
    spec, _, expected = _bad_shards(tmp_path / "bad")
    dst = tmp_path / "ar"
    cli.main(["data", "convert", spec, str(dst)])
    out = capsys.readouterr().out
    # Header checks at conversion catch what needs no decoding; the rest is left to training.
    assert "Wrote 8 samples in 2 shards" in out  # the zero-byte shard gives no file
    meta = json.load(open(dst / arrayrecord.META_FILE))
    assert meta["skipped"] == {k: v for k, v in expected.items() if k != "truncated_image"}
    got, it = read_all(f"arrayrecord:{dst}")
    assert sorted(got) == sorted(caption(i) for i in range(7))
    assert it.stats() == {"skipped/truncated_image": 1}
    # The same pixels as reading the tars.
    pixels = []
    for s in (spec, f"arrayrecord:{dst}"):
        batch = next(pipeline.make_iterator(s, global_batch_size=7, image_size=16, train=False,
                                            process_index=0, process_count=1, num_workers=0))
        pixels.append({c: x.tobytes() for c, x in zip(captions_of(batch), batch["image"])})
    assert pixels[0] == pixels[1] and len(pixels[0]) == 7

    # Random-access sources are cut into shards of --shard-size records; classes carry over.
    for name in ("b", "a"):
        (tmp_path / "cls" / name).mkdir(parents=True)
        for i in range(3):
            pixels_HWC = np.full((4, 4, 3), i, np.uint8)
            (tmp_path / "cls" / name / f"{i}.png").write_bytes(png_bytes(pixels_HWC))
    meta = arrayrecord.convert(f"imagefolder:{tmp_path}/cls", str(tmp_path / "ar2"), shard_size=4,
                               verify=True, progress=False)
    assert [s["records"] for s in meta["shards"]] == [4, 2] and meta["class_names"] == ["a", "b"]
    names, it = pipeline.classification_eval(f"arrayrecord:{tmp_path}/ar2/*.array_record",
                                             global_batch_size=6, image_size=4)
    assert names == ["a", "b"] and next(it)["label"].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(SystemExit):
        cli.main(["data", "convert", f"imagefolder:{tmp_path}/cls", str(tmp_path / "ar2")])
    assert "is not empty" in capsys.readouterr().err
