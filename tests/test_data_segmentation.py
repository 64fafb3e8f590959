"""Segmentation data: each dataset's mask decoding on tiny fake datasets written here, bad
pairs skipped by reason, the joint augmentation's one geometry, and the pipeline's promises
(exact resume, disjoint host shares)."""

import os

import numpy as np
import pytest
from PIL import Image

from clipjax.data import segmentation as seg
from clipjax.data.segmentation import IGNORE

# ---------------------------------------------------------------------------------------
# Writers of fake datasets.


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (VOCdevkit's labelcolormap), flat RGB for 256 indices."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_image(path, image_HWC: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image_HWC).save(path)


def save_mask(path, mask_HW: np.ndarray, mode: str = "P") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(mask_HW.astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("P")  # keeps the indices; the palette gives them VOC's colours
        image.putpalette(voc_palette())
    elif mode == "RGB":  # what a careless converter writes: colours, not indices
        image = image.convert("P")
        image.putpalette(voc_palette())
        image = image.convert("RGB")
    image.save(path)


def write_voc(root, split: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
              mask_mode: str = "P") -> str:
    """VOC2012 layout: ImageSets/Segmentation/<split>.txt, JPEGImages, SegmentationClass."""
    for key, (image_HWC, mask_HW) in pairs.items():
        save_image(os.path.join(root, "JPEGImages", key + ".jpg"), image_HWC)
        save_mask(os.path.join(root, "SegmentationClass", key + ".png"), mask_HW, mask_mode)
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
        f.write("".join(k + "\n" for k in pairs))
    return str(root)


def write_ade(root, split: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
              names: list[str] | None = None) -> str:
    """ADEChallengeData2016 layout, with objectInfo150.txt when `names` are given."""
    for key, (image_HWC, mask_HW) in pairs.items():
        save_image(os.path.join(root, "images", split, key + ".jpg"), image_HWC)
        save_mask(os.path.join(root, "annotations", split, key + ".png"), mask_HW, "L")
    if names is not None:
        with open(os.path.join(root, "objectInfo150.txt"), "w") as f:
            f.write("Idx\tRatio\tTrain\tVal\tName\n")
            f.write("".join(f"{i}\t0.01\t10\t1\t{n}\n" for i, n in enumerate(names, 1)))
    return str(root)


def write_segfolder(root, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                    classes: list[str]) -> str:
    for key, (image_HWC, mask_HW) in pairs.items():
        save_image(os.path.join(root, "images", key + ".png"), image_HWC)
        save_mask(os.path.join(root, "masks", key + ".png"), mask_HW, "L")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in classes))
    return str(root)


def rgb(height: int, width: int, value: int = 100) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def decoded(spec: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    data = seg.eval_set(spec)
    masks = {key: mask_HW for key, image_HWC, mask_HW in data}
    return masks, data.skipped


# ---------------------------------------------------------------------------------------
# Decoding per dataset.


def test_voc_palette_masks_decode_to_indices_and_colour_masks_are_refused(tmp_path):
    mask_HW = np.arange(6 * 8).reshape(6, 8) % 21
    mask_HW[0, :] = 255  # VOC's object borders
    write_voc(tmp_path / "good", "val", {"a": (rgb(6, 8), mask_HW)})
    masks, skipped = decoded(f"voc:{tmp_path / 'good'}?split=val")
    expected = np.where(mask_HW == 255, IGNORE, mask_HW)
    assert skipped == {}
    np.testing.assert_array_equal(masks["a"], expected)
    assert masks["a"].dtype == np.int32

    write_voc(tmp_path / "rgb", "val", {"a": (rgb(6, 8), mask_HW)}, mask_mode="RGB")
    masks, skipped = decoded(f"voc:{tmp_path / 'rgb'}?split=val")
    assert masks == {} and skipped == {"mask_not_indexed": 1}
    assert seg.classnames(f"voc:{tmp_path / 'good'}?split=val")[11] == "diningtable"


def test_ade20k_reduces_zero_label_and_reads_object_info(tmp_path):
    mask_HW = (np.arange(10 * 16).reshape(10, 16) % 151).astype(np.uint8)  # 0..150
    names = [f"class{i}, synonym" for i in range(150)]
    spec = f"ade20k:{write_ade(tmp_path, 'validation', {'x': (rgb(10, 16), mask_HW)}, names)}"
    masks, skipped = decoded(spec + "?split=validation")
    assert skipped == {}
    np.testing.assert_array_equal(masks["x"], np.where(mask_HW == 0, IGNORE,
                                                       mask_HW.astype(np.int32) - 1))
    assert seg.classnames(spec + "?split=validation") == tuple(f"class{i}" for i in range(150))
    os.remove(tmp_path / "objectInfo150.txt")
    builtin = seg.classnames(spec + "?split=validation")
    assert len(builtin) == 150 and builtin[:3] == ("wall", "building", "sky")
    with pytest.raises(ValueError, match="training"):
        seg.eval_set(spec + "?split=train")


def test_coco_object_follows_groupvit_conversion(tmp_path):
    # COCO-Stuff ids (0-based): person 0, bicycle 1, stop sign 12 (COCO 13), dining table 66,
    # toothbrush 89; stuff 91 and 181; unlabelled 255.
    raw = np.array([[0, 1, 12, 66, 89, 91, 181, 255]], np.uint8)
    root = tmp_path / "coco"
    save_image(os.path.join(root, "images", "val2017", "000001.jpg"), rgb(1, 8))
    save_mask(os.path.join(root, "annotations", "val2017", "000001.png"), raw, "L")
    masks, skipped = decoded(f"coco_object:{root}?split=val2017")
    assert skipped == {}
    np.testing.assert_array_equal(masks["000001"], [[1, 2, 12, 61, 80, 0, 0, 0]])
    names = seg.classnames(f"coco_object:{root}?split=val2017")
    assert [names[c] for c in masks["000001"][0, :5]] == ["person", "bicycle", "stop sign",
                                                          "dining table", "toothbrush"]
    lut = seg.coco_stuff_to_object()
    assert sorted(lut[:91][lut[:91] > 0]) == list(range(1, 81))  # each thing class once

    # GroupViT's converted maps, when present, are read as they are.
    save_mask(os.path.join(root, "annotations", "val2017", "000001_instanceTrainIds.png"),
              np.array([[0, 80, 255]], np.uint8), "L")
    save_image(os.path.join(root, "images", "val2017", "000001.jpg"), rgb(1, 3))
    masks, _ = decoded(f"coco_object:{root}?split=val2017")
    np.testing.assert_array_equal(masks["000001"], [[0, 80, IGNORE]])


def test_bad_pairs_are_skipped_by_reason_and_good_ones_kept(tmp_path):
    good = np.array([[0, 1], [2, 255]]).repeat(3, 0).repeat(3, 1)
    pairs = {f"g{i}": (rgb(6, 6, 10 * i), good) for i in range(4)}
    pairs["size"] = (rgb(6, 7), good)                      # mask 6x6, image 7 wide
    pairs["range"] = (rgb(6, 6), np.where(good == 2, 7, good))  # 7 is no class of 3
    spec = f"segfolder:{write_segfolder(tmp_path, pairs, ['a', 'b', 'c'])}"
    masks, skipped = decoded(spec)
    assert sorted(masks) == ["g0", "g1", "g2", "g3"]
    assert skipped == {"mask_size_mismatch": 1, "mask_out_of_range": 1}
    np.testing.assert_array_equal(masks["g0"], np.where(good == 255, IGNORE, good))

    with seg.make_seg_iterator(spec, global_batch_size=2, crop_size=4, base_size=6,
                               train=False, process_index=0, process_count=1) as it:
        rows = sum(len(b["mask"]) for b in it)
        assert rows == 4
        assert it.stats() == {"skipped/mask_size_mismatch": 1, "skipped/mask_out_of_range": 1}
        assert it.class_names == ["a", "b", "c"]


def test_missing_folder_and_split_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        seg.eval_set(f"voc:{tmp_path / 'nowhere'}")
    write_voc(tmp_path, "train", {"a": (rgb(2, 2), np.zeros((2, 2), np.uint8))})
    with pytest.raises(ValueError, match=r"val\.txt.*split=train, val or trainval"):
        seg.eval_set(f"voc:{tmp_path}?split=val")
    with pytest.raises(ValueError, match="Unknown segmentation data kind"):
        seg.eval_set(f"cityscapes:{tmp_path}")


# ---------------------------------------------------------------------------------------
# Augmentation.


def encoded(mask_HW: np.ndarray) -> np.ndarray:
    """An image whose pixels say the mask's class: 30 (class + 1), IGNORE's padding 0."""
    return np.repeat((30 * (mask_HW + 1)).astype(np.uint8)[..., None], 3, axis=2)


def test_augment_moves_image_and_mask_together():
    mask_HW = np.arange(10 * 13).reshape(10, 13) % 5
    mask_HW[:, 0] = IGNORE  # an asymmetric column, so that a lone flip would show
    flips = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        image_HWC, out_HW = seg.augment(encoded(mask_HW), mask_HW, rng, crop=12, base_size=13,
                                        scale=(1.0, 1.0))
        assert image_HWC.shape == (12, 12, 3) and out_HW.shape == (12, 12)
        assert image_HWC.dtype == np.uint8 and out_HW.dtype == np.int32
        np.testing.assert_array_equal(image_HWC[..., 0].astype(np.int32) // 30 - 1, out_HW)
        assert (out_HW[10:] == IGNORE).all()  # rows 10 and 11 are padding
        flips.add(bool((out_HW[:10, -1] == IGNORE).all()))  # the IGNORE column went right
    assert flips == {True, False}


def test_augment_resizes_the_mask_by_nearest_into_the_same_frame():
    # Neighbouring classes 3 apart: blending them (bilinear) would make classes in between.
    mask_HW = np.kron(np.array([[0, 3, 6], [6, 0, 3]]), np.ones((12, 12), int))  # 24 x 36
    checked = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        image_HWC, out_HW = seg.augment(encoded(mask_HW), mask_HW, rng, crop=24, base_size=36)
        assert image_HWC.shape == (24, 24, 3) and out_HW.shape == (24, 24)
        assert set(np.unique(out_HW)) <= {IGNORE, 0, 3, 6}  # nearest: no new values
        from_image = image_HWC[..., 0].astype(np.int32)
        # Away from block edges bilinear pixels are the block's own value: the same class.
        padded = np.pad(out_HW, 3, constant_values=-99)  # what lies beyond the crop is unknown
        windows = np.lib.stride_tricks.sliding_window_view(padded, (7, 7))
        interior = (windows == out_HW[..., None, None]).all(axis=(-1, -2))
        np.testing.assert_array_equal(from_image[interior] // 30 - 1, out_HW[interior])
        checked += interior.sum()
    assert checked > 0.2 * 8 * 24 * 24


# ---------------------------------------------------------------------------------------
# The pipeline.


def constant_set(tmp_path, n: int, bad: bool) -> str:
    """Record i's mask is class i everywhere, so that rows name their records."""
    pairs = {f"r{i}": (rgb(10, 12, 20 * i), np.full((10, 12), i, np.uint8)) for i in range(n)}
    if bad:
        pairs["r_bad"] = (rgb(10, 12), np.full((10, 12), 200, np.uint8))  # out of range
    return f"segfolder:{write_segfolder(tmp_path, pairs, [f'c{i}' for i in range(n)])}"


def records(batch) -> list[int]:
    return [int(np.max(m)) for m in batch["mask"]]


def test_resume_reads_the_batches_an_uninterrupted_run_reads(tmp_path):
    spec = constant_set(tmp_path, 7, bad=True)  # the bad pair makes worker batches short
    settings = dict(global_batch_size=3, crop_size=8, base_size=12, train=True, seed=3,
                    process_index=0, process_count=1)
    with seg.make_seg_iterator(spec, **settings) as it:
        whole = [next(it) for _ in range(6)]
        whole_stats = it.stats()
    with seg.make_seg_iterator(spec, **settings) as it:
        for _ in range(2):
            next(it)
        state = it.get_state()
    with seg.make_seg_iterator(spec, **settings) as it:
        it.set_state(state)
        rest = [next(it) for _ in range(4)]
        assert it.stats() == whole_stats
        assert whole_stats["skipped/mask_out_of_range"] >= 2
    for a, b in zip(whole[2:], rest):
        assert a.keys() == b.keys() == {"image", "mask"}
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    first_epoch = sorted(r for b in whole[:2] for r in records(b)) + records(whole[2])[:1]
    assert sorted(first_epoch) == list(range(7))  # every record once in the first epoch


def test_two_hosts_read_disjoint_records(tmp_path):
    spec = constant_set(tmp_path, 6, bad=False)
    seen = []
    for host in (0, 1):
        with seg.make_seg_iterator(spec, global_batch_size=2, crop_size=8, base_size=12,
                                   train=True, seed=0, process_index=host,
                                   process_count=2) as it:
            seen.append(sorted(r for _ in range(3) for r in records(next(it))))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(6))
