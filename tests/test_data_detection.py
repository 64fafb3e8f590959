"""Detection data: annotation checks on toy COCO and MDETR Flickr files written here, boxes
that move with the pixels, positive maps that point at the right tokens, the pipeline's
promises (exact resume, disjoint host shares) and the built-in shapes' held-out pairs."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from clipjax.data import detection as det
from clipjax.data import synthetic_det as sd
from clipjax.tokenizer import default_tokenizer

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "dog_(animal)"},
              {"id": 10, "name": "traffic light"}, {"id": 17, "name": "cat"}]


def write_coco(root, split: str, images: dict, annotations: list[dict],
               categories=CATEGORIES) -> str:
    """COCO layout; images {id: (file name, uint8 array | bytes | None = missing, w, h)}."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    entries = []
    for image_id, (name, pixels, w, h) in images.items():
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
        path = os.path.join(root, split, name)
        if isinstance(pixels, bytes):
            with open(path, "wb") as f:
                f.write(pixels)
        elif pixels is not None:
            Image.fromarray(pixels).save(path)
    anns = [{"id": k + 1, "iscrowd": 0, "area": 1.0, **a} for k, a in enumerate(annotations)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": entries, "annotations": anns, "categories": categories}, f)
    return f"coco:{root}?split={split}"


def flat(value: int, w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def toy_coco(root) -> str:
    images = {1: ("a.png", flat(50, 40, 30), 40, 30), 2: ("b.jpg", flat(90, 50, 40), 50, 40),
              3: ("missing.png", None, 20, 20), 4: ("corrupt.png", b"not an image", 20, 20),
              5: ("empty.png", flat(10, 20, 20), 20, 20)}
    anns = [dict(image_id=1, category_id=1, bbox=[5, 5, 10, 8]),
            dict(image_id=1, category_id=3, bbox=[30, 20, 20, 20]),       # clipped to 40x30
            dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], iscrowd=1),
            dict(image_id=1, category_id=1, bbox=[1, 1, 0, 5]),           # empty
            dict(image_id=2, category_id=3, bbox=[60, 0, 5, 5]),          # outside
            dict(image_id=2, category_id=99, bbox=[1, 1, 5, 5]),          # unknown category
            dict(image_id=999, category_id=1, bbox=[1, 1, 5, 5]),         # unknown image
            dict(image_id=2, category_id=10, bbox=[10, 10, 20, 20]),
            dict(image_id=3, category_id=1, bbox=[1, 1, 5, 5]),
            dict(image_id=4, category_id=1, bbox=[1, 1, 5, 5])]
    return write_coco(root, "val2017", images, anns)


def decode_rows(tokens_L: np.ndarray, map_ML: np.ndarray) -> list[str]:
    tok = default_tokenizer()
    return [tok.decode(tokens_L[row > 0]).strip() for row in map_ML]


# ---------------------------------------------------------------------------------------
# Sources and targets.


def test_coco_annotations_are_checked_by_reason_and_bad_images_skipped(tmp_path):
    spec = toy_coco(tmp_path)
    src = det.open_det_source(spec, require_boxes=True)
    assert src.stats() == {"clipped_boxes": 1, "crowd_boxes": 1, "skipped/no_boxes": 1,
                           "skipped_boxes/box_outside_image": 1, "skipped_boxes/empty_box": 1,
                           "skipped_boxes/unknown_category": 1,
                           "skipped_boxes/unknown_image": 1}
    assert src.keys == [1, 2, 3, 4] and src.category_ids == [1, 3, 10, 17]
    r = src.read(0)
    np.testing.assert_array_equal(r["boxes"], [[5, 5, 15, 13], [30, 20, 40, 30]])
    np.testing.assert_array_equal(r["classes"], [0, 1])  # crowd box not a training target
    np.testing.assert_array_equal(src.read(1)["boxes"], [[10, 10, 30, 30]])
    assert src.read(1)["classes"].tolist() == [2]
    # The evaluation ground truth keeps the crowd box, drops the bad ones.
    gt = det.open_det_source(spec).coco_gt
    assert sorted(a["id"] for a in gt["annotations"]) == [1, 2, 3, 8, 9, 10]
    assert [a["iscrowd"] for a in gt["annotations"] if a["id"] == 3] == [1]
    assert [a["bbox"] for a in gt["annotations"] if a["id"] == 2] == [[30, 20, 10, 10]]

    with det.make_det_iterator(spec, global_batch_size=1, image_size=64, context_length=16,
                               max_boxes=3, train=False, process_index=0,
                               process_count=1) as it:
        batches = list(it)
        stats = it.stats()
    assert [int(b["index"][0]) for b in batches] == [0, 1, 4]
    assert stats["skipped/missing_image"] == 1 and stats["skipped/corrupt_image"] == 1
    assert stats["skipped_boxes/unknown_category"] == 1
    # The evaluation view: the long side to 64 (scale 1.6 for 40x30), at the top left.
    b = batches[0]
    np.testing.assert_allclose(b["boxes"][0, :2], [[8, 8, 24, 20.8], [48, 32, 64, 48]],
                               atol=1e-4)
    assert b["box_mask"][0].tolist() == [True, True, False]
    assert (b["image"][0, :48, :64] == 50).all()
    assert (b["image"][0, 48:] == det.PAD_RGB).all()
    assert decode_rows(b["tokens"][0], b["positive_map"][0, :2]) == ["person", "dog"]
    np.testing.assert_allclose(b["positive_map"][0, :2].sum(1), 1.0)
    assert not b["positive_map"][0, 2].any()
    with det.make_det_iterator(spec, global_batch_size=3, image_size=64, context_length=16,
                               max_boxes=1, train=False, process_index=0,
                               process_count=1) as it:
        next(it)
        assert it.stats()["dropped_boxes/over_max_boxes"] == 1  # image 1's second box
        assert it.get_state()["dropped_boxes"] == {"over_max_boxes": 1}


def test_eval_set_maps_canvas_pixels_back(tmp_path):
    spec = toy_coco(tmp_path)
    ds = det.det_eval_set(spec, image_size=64, max_examples=2)
    assert ds.kind == "coco" and ds.classnames == ("person", "dog_(animal)", "traffic light",
                                                   "cat")
    assert [im["id"] for im in ds.coco_gt["images"]] == [1, 2]
    examples = list(ds)
    assert [e.image_id for e in examples] == [1, 2]
    ex = examples[1]  # 50x40 -> 64x51
    assert ex.image.shape == (40, 50, 3) and ex.canvas.shape == (64, 64, 3)
    assert ex.scale == pytest.approx(64 / 50)
    assert (ex.canvas[:51, :64] == 90).all() and (ex.canvas[52:] == det.PAD_RGB).all()
    np.testing.assert_array_equal(ex.boxes, [[10, 10, 30, 30]])
    whole = det.det_eval_set(spec, image_size=64)
    assert len(whole.coco_gt["images"]) == 5
    assert [e.image_id for e in whole] == [1, 2, 5]
    assert whole.skipped == {"missing_image": 1, "corrupt_image": 1}
    # Unreadable images leave the ground truth, so they do not score as missed.
    assert [im["id"] for im in whole.coco_gt["images"]] == [1, 2, 5]
    assert {a["image_id"] for a in whole.coco_gt["annotations"]} == {1, 2}


def test_lvis_finds_coco_images_by_url_and_keeps_its_evaluation_fields(tmp_path):
    os.makedirs(tmp_path / "val2017")
    Image.fromarray(flat(30, 32, 24)).save(tmp_path / "val2017" / "000000000007.jpg")
    image = {"id": 7, "width": 32, "height": 24, "neg_category_ids": [2],
             "not_exhaustive_category_ids": [], "file_name": "000000000007.jpg",
             "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg"}
    cats = [{"id": 1, "name": "aerosol_can", "synonyms": ["spray_can"], "frequency": "c"},
            {"id": 2, "name": "bow_(weapon)", "synonyms": ["bow"], "frequency": "r"}]
    anns = [{"id": 5, "image_id": 7, "category_id": 1, "bbox": [2, 3, 8, 6], "area": 40}]
    with open(tmp_path / "lvis.json", "w") as f:
        json.dump({"images": [image], "annotations": anns, "categories": cats}, f)
    ds = det.det_eval_set(f"lvis:{tmp_path}?json=lvis.json", image_size=64)
    assert ds.kind == "lvis" and ds.category_ids == [1, 2]
    assert ds.coco_gt["images"][0]["neg_category_ids"] == [2]
    assert ds.coco_gt["annotations"][0]["iscrowd"] == 0
    assert [c["frequency"] for c in ds.coco_gt["categories"]] == ["c", "r"]
    ex, = ds
    assert ex.scale == 2.0 and ex.canvas.shape == (64, 64, 3)
    with det.make_det_iterator(f"lvis:{tmp_path}?json=lvis.json", global_batch_size=1,
                               image_size=64, context_length=16, train=False,
                               process_index=0, process_count=1) as it:
        b = next(it)
    assert decode_rows(b["tokens"][0], b["positive_map"][0, :1]) == ["aerosol can"]
    np.testing.assert_allclose(b["boxes"][0, 0], [4, 6, 20, 18])


def test_prompts_drop_negatives_then_positives_to_fit_the_context():
    names = ["person", "traffic light", "dog", "cat", "red fire hydrant", "car", "bus"] * 3
    names = [f"{n} {i}" for i, n in enumerate(names)]
    lengths = np.asarray([len(default_tokenizer().encode(n + ". ")) for n in names])
    boxes = np.asarray([[0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]], np.float32)
    classes = np.asarray([1, 2, 1])
    for seed in range(10):
        out = det.class_targets(np.random.default_rng(seed), boxes, classes, names, lengths,
                                context_length=77, max_boxes=2, max_negatives=85)
        caption = default_tokenizer().decode(out["tokens"][1:out["tokens"].argmax()])
        said = [s.strip() for s in caption.replace(" .", ".").split(".")]
        assert {"traffic light 1", "dog 2"} <= set(said)  # the positives
        assert len(said) > 2 and len(out["tokens"]) == 77
        assert decode_rows(out["tokens"], out["positive_map"]) == ["traffic light 1", "dog 2"]
        assert out["dropped"].tolist() == [1, 0]  # the third box is over max_boxes
    # Room for one positive only: 9 tokens, "traffic light 1." takes 4, "dog 2." 3.
    dropped = set()
    for seed in range(10):
        out = det.class_targets(np.random.default_rng(seed), boxes, classes, names, lengths,
                                context_length=6, max_boxes=3, max_negatives=85)
        rows = decode_rows(out["tokens"], out["positive_map"][out["box_mask"]])
        assert len(set(rows)) == 1 and out["dropped"][1] == 3 - len(rows)
        dropped.add(rows[0])
    assert dropped == {"traffic light 1", "dog 2"}  # positives are kept in random order


def write_flickr(root) -> str:
    caption = "A man in a red shirt throws a frisbee to a dog ."
    spans = {"a man": (0, 5), "red shirt": (11, 20), "frisbee": (30, 37), "dog": (43, 46)}
    assert [caption[a:b] for a, b in spans.values()] == ["A man", "red shirt", "frisbee", "dog"]
    os.makedirs(os.path.join(root, "flickr30k-images"))
    os.makedirs(os.path.join(root, "mdetr_annotations"))
    Image.fromarray(flat(70, 50, 40)).save(os.path.join(root, "flickr30k-images", "42.jpg"))
    image = {"id": 0, "file_name": "42.jpg", "height": "40", "width": "50", "caption": caption,
             "dataset_name": "flickr", "tokens_negative": [[0, len(caption)]],
             "sentence_id": 3, "original_img_id": 42,
             "tokens_positive_eval": [[list(spans["a man"])], [list(spans["red shirt"])],
                                      [list(spans["frisbee"])]]}
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 100,
             "bbox": [1, 2, 10, 10], "tokens_positive": [list(spans["a man"])]},
            {"id": 2, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 100,
             "bbox": [20, 5, 10, 10], "tokens_positive": [list(spans["red shirt"])]},
            {"id": 3, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 100,
             "bbox": [30, 20, 10, 10],
             "tokens_positive": [list(spans["frisbee"]), list(spans["dog"])]},
            {"id": 4, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 100,
             "bbox": [30, 20, 10, 10], "tokens_positive": []}]
    with open(os.path.join(root, "mdetr_annotations", "final_flickr_separateGT_val.json"),
              "w") as f:
        json.dump({"images": [image], "annotations": anns,
                   "categories": [{"id": 1, "name": "object"}]}, f)
    return f"flickr:{root}?split=val"


def test_flickr_positive_maps_come_from_tokens_positive(tmp_path):
    spec = write_flickr(tmp_path)
    with det.make_det_iterator(spec, global_batch_size=1, image_size=50, context_length=24,
                               max_boxes=4, train=False, process_index=0,
                               process_count=1) as it:
        b = next(it)
        assert it.stats()["skipped_boxes/no_phrase"] == 1
    rows = decode_rows(b["tokens"][0], b["positive_map"][0, b["box_mask"][0]])
    assert rows == ["a man", "red shirt", "frisbee dog"]  # the third box: both its phrases
    np.testing.assert_allclose(b["positive_map"][0, 2][b["positive_map"][0, 2] > 0], 0.5)
    np.testing.assert_allclose(b["boxes"][0, :3], [[1, 2, 11, 12], [20, 5, 30, 15],
                                                   [30, 20, 40, 30]])
    ex, = det.det_eval_set(spec, image_size=100, context_length=24)
    assert (ex.original_img_id, ex.sentence_id, ex.scale) == ("42", 3, 2.0)
    assert decode_rows(ex.tokens, ex.phrase_maps) == ["a man", "red shirt", "frisbee"]
    np.testing.assert_array_equal(ex.phrase_boxes[2], [[30, 20, 40, 30]])
    np.testing.assert_array_equal(ex.phrase_boxes[0], [[1, 2, 11, 12]])


# ---------------------------------------------------------------------------------------
# Augmentation.


def red_bbox(canvas: np.ndarray) -> np.ndarray:
    red = (canvas[..., 0] > 150) & (canvas[..., 1] < 100)
    ys, xs = np.nonzero(red)
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_augment_moves_boxes_with_the_pixels_and_flip_mirrors_them():
    image = np.full((60, 80, 3), 128, np.uint8)
    image[20:35, 10:40] = (230, 20, 20)  # a red patch and its box, off centre
    box = np.asarray([[10, 20, 40, 35]], np.float32)
    sides = set()
    for seed in range(24):
        rng = np.random.default_rng(seed)
        canvas, boxes, keep = det.augment(image, box, rng, size=48, scale=(0.5, 1.0),
                                          crop_prob=0.5 if seed % 2 else 0.0)
        assert canvas.shape == (48, 48, 3)
        if not keep[0]:
            continue
        drawn = red_bbox(canvas)
        # Bilinear edges blur by at most a pixel; the box follows the pixels exactly.
        assert (drawn[:2] >= boxes[0, :2] - 1).all() and (drawn[2:] <= boxes[0, 2:] + 1).all()
        np.testing.assert_allclose(drawn, boxes[0], atol=1.5)
        sides.add(bool((boxes[0, 0] + boxes[0, 2]) / 2 > canvas.shape[1] / 2 * 0.8))
    assert sides == {True, False}  # some flipped (patch on the right), some not
    # Flip alone at scale 1: the box's x is mirrored about the resized width.
    for seed in range(8):
        canvas, boxes, _ = det.augment(image, box, np.random.default_rng(seed), size=80,
                                       scale=(1.0, 1.0))
        flipped = not (canvas[:60, :80] == image).all()
        if flipped:
            np.testing.assert_array_equal(canvas[:60, :80], image[:, ::-1])
        expected = [80 - 40, 20, 80 - 10, 35] if flipped else [10, 20, 40, 35]
        np.testing.assert_allclose(boxes[0], expected)


# ---------------------------------------------------------------------------------------
# Resume and hosts.


def numbered_coco(root, n: int, missing: bool) -> str:
    """n images, image i filled with 10 * (i + 1) and one box, and maybe a missing file."""
    images = {i + 1: (f"{i}.png", flat(10 * (i + 1), 24, 16), 24, 16) for i in range(n)}
    if missing:  # it makes worker batches short
        images[n + 1] = ("gone.png", None, 24, 16)
    anns = [dict(image_id=i, category_id=CATEGORIES[i % 4]["id"], bbox=[2, 2, 8, 8])
            for i in images]
    return write_coco(root, "train2017", images, anns)


def records(batch) -> list[int]:
    return [int(image[0, 0, 0]) // 10 - 1 for image in batch["image"]]


def test_coco_resume_reads_the_batches_an_uninterrupted_run_reads(tmp_path):
    spec = numbered_coco(tmp_path, 7, missing=True)
    settings = dict(global_batch_size=3, image_size=32, context_length=16, max_boxes=2,
                    train=True, seed=3, process_index=0, process_count=1)
    with det.make_det_iterator(spec, **settings) as it:
        whole = [next(it) for _ in range(6)]
        whole_stats = it.stats()
    with det.make_det_iterator(spec, **settings) as it:
        next(it), next(it)
        state = json.loads(json.dumps(it.get_state()))
    with det.make_det_iterator(spec, **settings) as it:
        it.set_state(state)
        rest = [next(it) for _ in range(4)]
        assert it.stats() == whole_stats and whole_stats["skipped/missing_image"] >= 2
    for a, b in zip(whole[2:], rest):
        assert a.keys() == b.keys() == {"image", "tokens", "boxes", "box_mask", "positive_map"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    first_epoch = sorted(r for b in whole[:2] for r in records(b)) + records(whole[2])[:1]
    assert sorted(first_epoch) == list(range(7))  # every record once in the first epoch
    with pytest.raises(ValueError, match="seed"):
        with det.make_det_iterator(spec, **{**settings, "seed": 4}) as it:
            it.set_state(state)


def test_coco_hosts_read_disjoint_records(tmp_path):
    spec = numbered_coco(tmp_path, 6, missing=False)
    seen = []
    for host in (0, 1):
        with det.make_det_iterator(spec, global_batch_size=2, image_size=32, context_length=16,
                                   train=True, seed=0, process_index=host,
                                   process_count=2) as it:
            seen.append([r for _ in range(3) for r in records(next(it))])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(6))


# ---------------------------------------------------------------------------------------
# The built-in shapes.


def test_synthetic_resume_and_hosts():
    kw = dict(image_size=32, context_length=24, seed=1, max_shapes=2)
    it = sd.SyntheticDetIterator(4, **kw)
    first, second = next(it), next(it)
    whole = next(sd.SyntheticDetIterator(8, **kw))
    assert whole["positive_map"].shape == (8, 2, 24) and whole["boxes"].shape == (8, 2, 4)
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[k])
    parts = [next(sd.SyntheticDetIterator(8, process_index=p, process_count=2, **kw))
             for p in range(2)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    resumed = sd.SyntheticDetIterator(4, **kw)
    resumed.set_state(state)
    for k, v in next(resumed).items():
        np.testing.assert_array_equal(v, expected[k])
    with pytest.raises(ValueError, match="written with seed=1, this run has seed=2"):
        sd.SyntheticDetIterator(4, **{**kw, "seed": 2}).set_state(state)


def test_held_out_pairs_form_a_latin_square_and_never_train():
    colours, shapes = zip(*sd.HELD_OUT)
    assert sorted(colours) == sorted(sd.COLOURS) and sorted(shapes) == sorted(sd.SHAPES)
    names = [f"{c} {s}" for c, s in sd.HELD_OUT]
    assert sorted(sd.CLASSNAMES[c] for c in sd.UNSEEN) == sorted(names)
    train = sd.render(0, "train", np.arange(3000), 16).labels_BS
    assert not np.isin(train, sd.UNSEEN).any()
    assert set(train[train >= 0].tolist()) == set(sd.SEEN)  # every seen pair is trained
    held = sd.render(0, "held_out", np.arange(800), 16).labels_BS
    assert set(held[held >= 0].tolist()) == set(range(36))
    it = sd.SyntheticDetIterator(16, image_size=16, context_length=40, max_shapes=3)
    tok = default_tokenizer()
    for _ in range(8):
        for tokens in next(it)["tokens"]:
            text = tok.decode(tokens[1:tokens.argmax()]).replace(" .", ".")
            said = {s.strip() for s in text.split(".")}
            assert said and not said & set(names)


def test_synthetic_ground_truth_boxes_are_tight_and_write_coco_round_trips(tmp_path):
    ds = sd.SyntheticDetSet(24, seed=5, image_size=64)
    gt = ds.coco_gt
    assert len(gt["categories"]) == 36 and len(gt["images"]) == 24
    assert ds.unseen_category_ids == [c + 1 for c in sd.UNSEEN]
    by_image = {}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        assert a["iscrowd"] == 0 and a["area"] == w * h
    unseen = sum(a["category_id"] in ds.unseen_category_ids for a in gt["annotations"])
    assert 0 < unseen < len(gt["annotations"])
    for ex in ds:
        spread = ex.image.max(-1).astype(int) - ex.image.min(-1)
        # The background is grey; a pixel half covered by a shape (the box's edge) has a
        # spread of at least 56 (the greenest green, jittered), a quarter covered about 30.
        colourful = spread > 40
        boxes = np.asarray(by_image[ex.image_id])
        np.testing.assert_array_equal(ex.boxes, boxes)
        inside = np.zeros_like(colourful)
        for x0, y0, x1, y1 in boxes.astype(int):
            ys, xs = np.nonzero(colourful[y0:y1, x0:x1])
            # Tight: the shape's pixels reach every side of its box.
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 0, x1 - x0 - 1, y1 - y0 - 1)
            inside[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True  # and edge pixels
        assert not (colourful & ~inside).any()  # no shape pixel outside every box
        assert colourful.any()
    folder = sd.write_coco(tmp_path / "shapes", 6, image_size=64, seed=5)
    with det.make_det_iterator(f"coco:{folder}?split=val", global_batch_size=6, image_size=64,
                               context_length=77, max_boxes=3, train=False,
                               process_index=0, process_count=1) as it:
        b = next(it)
    examples = list(sd.SyntheticDetSet(6, seed=5, image_size=64))
    for i, ex in enumerate(examples):
        np.testing.assert_array_equal(b["image"][i], ex.canvas)
        n = len(ex.boxes)
        np.testing.assert_array_equal(b["boxes"][i, :n], ex.boxes)
        names = [sd.CLASSNAMES[c] for c in ex.classes]
        assert decode_rows(b["tokens"][i], b["positive_map"][i, :n]) == names
