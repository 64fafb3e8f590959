"""Detection evaluation against hand-built cases whose AP and recall are known by
construction, checked with an independent NumPy transcription of 101-point interpolated AP."""

import json

import numpy as np
import pytest
from PIL import Image

from clipjax.evals import detection

IOU_T = np.linspace(0.5, 0.95, 10)


def ap101(tp_ranked: list[int], n_gt: int) -> float:
    """COCO AP: precision made monotone from the right, read at recall 0, 0.01, ..., 1."""
    tp = np.cumsum(tp_ranked)
    recall = tp / n_gt
    precision = tp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in idx]))


def iou_xywh(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax1, bx1) - max(a[0], b[0])) * max(0, min(ay1, by1) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


SMALL, MEDIUM, LARGE = [10, 10, 10, 10], [60, 60, 50, 50], [40, 40, 120, 120]
CROWD = [0, 100, 100, 100]
SHIFT = 28  # x-shift of the large cat-1 box: IoU (120-28)/(120+28) ~ 0.62


def coco_gt() -> dict:
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)]
    cats = [{"id": c, "name": n} for c, n in ((1, "cat"), (5, "dog"), (9, "bird"))]
    anns = [(1, 1, SMALL, 0), (1, 5, MEDIUM, 0), (2, 1, LARGE, 0), (2, 9, CROWD, 1),
            (3, 5, MEDIUM, 0), (3, 9, LARGE, 0)]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": crowd} for k, (i, c, b, crowd) in enumerate(anns)]
    return {"images": images, "categories": cats, "annotations": anns}


def perfect_results() -> list[dict]:
    gt = coco_gt()
    out = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 0.9 - 0.01 * a["id"]} for a in gt["annotations"] if not a["iscrowd"]]
    # a confident bird inside the crowd region: matched to the crowd, so neither TP nor FP
    out.append({"image_id": 2, "category_id": 9, "bbox": [10, 110, 40, 40], "score": 0.99})
    return out


def test_coco_perfect_predictions_score_one(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_gt()))
    m = detection.coco_evaluate(str(path), perfect_results())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100"):
        assert m[key] == pytest.approx(1.0), key
    assert m["precision"].shape == (10, 101, 3, 4, 3)
    assert m["AP_per_category"] == pytest.approx({1: 1.0, 5: 1.0, 9: 1.0})
    assert "Average Precision" in m["summary"]


def shifted_results() -> list[dict]:
    out = perfect_results()
    for r in out:
        if r["image_id"] == 2 and r["category_id"] == 1:
            r["bbox"] = [LARGE[0] + SHIFT, *LARGE[1:]]
    return out


def test_coco_shifted_box_matches_numpy_ap():
    results = shifted_results()
    m = detection.coco_evaluate(coco_gt(), results)
    iou = iou_xywh(LARGE, [LARGE[0] + SHIFT, *LARGE[1:]])
    assert 0.6 < iou < 0.65
    # cat 1: the small box (score .89) is right; the shifted large one (.87) is a TP only
    # at thresholds <= its IoU. Cats 5 and 9 stay perfect.
    cat1_T = np.array([ap101([1, int(iou >= t)], 2) for t in IOU_T])
    ap_TK = np.stack([cat1_T, np.ones(10), np.ones(10)], 1)
    assert m["AP"] == pytest.approx(ap_TK.mean())
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(ap_TK[5].mean()) and m["AP75"] < 1
    assert m["AP_per_category"][1] == pytest.approx(cat1_T.mean())
    # large area: cat 1's only large box found at 3 thresholds of 10, bird perfect, dog absent
    large_cat1 = np.array([float(iou >= t) for t in IOU_T]).mean()
    assert m["APl"] == pytest.approx((large_cat1 + 1.0) / 2)
    assert m["APs"] == pytest.approx(1.0) and m["APm"] == pytest.approx(1.0)
    assert results[0]["bbox"] == SMALL and "area" not in results[0]  # inputs left untouched


def test_coco_keys_match_library_stats_and_faster_agrees():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib, io  # noqa: E401
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt()
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(shifted_results()), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    ours = detection.coco_evaluate(coco_gt(), shifted_results())
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs",
            "ARm", "ARl"]
    np.testing.assert_allclose([ours[k] for k in keys], ev.stats, atol=1e-12)
    fast = detection.coco_evaluate(coco_gt(), shifted_results(), use_faster=True)
    np.testing.assert_allclose([fast[k] for k in keys], [ours[k] for k in keys], atol=1e-9)
    np.testing.assert_allclose(fast["precision"], ours["precision"], atol=1e-9)


def test_coco_max_dets_and_empty_results():
    # max_dets=1: per image and category only the best-scored detection counts. A wrong
    # confident dog in image 3 then hides the right one.
    results = perfect_results() + [{"image_id": 3, "category_id": 5, "bbox": [150, 0, 30, 30],
                                    "score": 0.999}]
    m1 = detection.coco_evaluate(coco_gt(), results, max_dets=1)
    dog = ap101([0, 1], 2)  # image 3's kept dog is wrong (.999), then image 1's right (.88)
    assert m1["AP_per_category"][5] == pytest.approx(dog)
    assert m1["precision"].shape == (10, 101, 3, 4, 3)
    assert m1["AR@1"] == pytest.approx((1 + 0.5 + 1) / 3)
    m100 = detection.coco_evaluate(coco_gt(), results)
    assert m100["AR@100"] == pytest.approx(1.0)
    empty = detection.coco_evaluate(coco_gt(), [])
    assert empty["AP"] == 0.0 and empty["AR@100"] == 0.0
    assert empty["precision"].shape == (10, 101, 3, 4, 3)


def lvis_gt() -> dict:
    images = [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [2],
               "not_exhaustive_category_ids": []},
              {"id": 2, "width": 100, "height": 100, "neg_category_ids": [1],
               "not_exhaustive_category_ids": [3]},
              {"id": 3, "width": 100, "height": 100, "neg_category_ids": [],
               "not_exhaustive_category_ids": []}]
    cats = [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "c"},
            {"id": 3, "name": "c", "frequency": "f"}]
    boxes = [(1, 1, [10, 10, 20, 20]), (1, 3, [40, 40, 30, 30]), (2, 2, [10, 10, 50, 50]),
             (2, 3, [60, 60, 20, 20]), (3, 3, [5, 5, 40, 40])]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3]}
            for k, (i, c, b) in enumerate(boxes)]
    return {"images": images, "categories": cats, "annotations": anns}


def lvis_results() -> list[dict]:
    det = lambda i, c, b, s: {"image_id": i, "category_id": c, "bbox": b, "score": s}  # noqa
    return [det(1, 1, [10, 10, 20, 20], .9),
            det(1, 2, [50, 50, 20, 20], .95),  # b is a negative of image 1: a real FP
            det(2, 2, [10, 10, 50, 50], .8),
            det(3, 2, [0, 0, 9, 9], .99),  # b neither present nor negative in image 3: unscored
            det(1, 3, [40, 40, 30, 30], .9), det(2, 3, [60, 60, 20, 20], .5),
            det(2, 3, [0, 0, 10, 10], .99),  # c is not exhaustive in image 2: not an FP
            det(3, 3, [5, 5, 40, 40], .4)]


def test_lvis_frequency_groups_as_constructed(tmp_path):
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(lvis_gt()))
    m = detection.lvis_evaluate(str(path), lvis_results())
    apr, apc, apf = 1.0, ap101([0, 1], 1), 1.0
    assert (m["APr"], m["APf"]) == (pytest.approx(apr), pytest.approx(apf))
    assert m["APc"] == pytest.approx(apc) and apc == pytest.approx(0.5)
    assert m["AP"] == pytest.approx((apr + apc + apf) / 3)
    assert m["AR@300"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="frequency"):
        detection.lvis_evaluate(coco_gt(), perfect_results())


def test_lvis_keeps_best_300_per_image_over_all_categories():
    # 300 confident unscored detections in image 3 push its one true "c" box (.4) past the cut.
    flood = [{"image_id": 3, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.9}] * 300
    results = lvis_results() + flood
    cut = detection.lvis_evaluate(lvis_gt(), results, max_dets=300)
    assert cut["APf"] == pytest.approx(ap101([1, 1], 3))  # image 3's box lost: recall 2/3
    kept = detection.lvis_evaluate(lvis_gt(), results, max_dets=302)
    assert kept["APf"] == pytest.approx(1.0) and "AR@302" in kept


def test_results_json_converts_boxes_and_ids(tmp_path):
    path = tmp_path / "res.json"
    out = detection.results_json(
        [7, 8], [np.array([[10., 20., 30., 60.], [0., 0., 5., 5.]]), np.zeros((0, 4))],
        [np.array([0.9, 0.2]), np.zeros(0)], [np.array([1, 0]), np.zeros(0, int)],
        category_ids=[3, 11], path=path)
    assert out == [{"image_id": 7, "category_id": 11, "bbox": [10., 20., 20., 40.], "score": 0.9},
                   {"image_id": 7, "category_id": 3, "bbox": [0., 0., 5., 5.], "score": 0.2}]
    assert json.loads(path.read_text()) == out
    with pytest.raises(ValueError, match="outside"):
        detection.results_json([1], [np.zeros((1, 4))], [[1.0]], [[2]], category_ids=[3, 11])


XML = """<annotation><filename>100.jpg</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>40</xmax><ymax>40</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>50</xmin><ymin>0</ymin><xmax>70</xmax><ymax>20</ymax></bndbox></object>
<object><name>2</name><name>3</name><bndbox><xmin>80</xmin><ymin>0</ymin><xmax>100</xmax><ymax>20</ymax></bndbox></object>
<object><name>4</name><nobndbox>1</nobndbox><scene>0</scene></object>
<object><name>5</name><nobndbox>0</nobndbox><scene>1</scene></object>
</annotation>"""
SENTENCES = ("[/EN#1/people A man] walks [/EN#2/animals two dogs] past "
             "[/EN#5/scene a park] .\n"
             "[/EN#3/animals/other A dog] looks at [/EN#4/other the sky] and "
             "[/EN#0/notvisual something] .\n"
             "Nothing [/EN#4/other here] .\n")


def flickr_dir(tmp_path):
    for sub in ("Annotations", "Sentences"):
        (tmp_path / sub).mkdir()
    (tmp_path / "Annotations" / "100.xml").write_text(XML)
    (tmp_path / "Sentences" / "100.txt").write_text(SENTENCES)
    (tmp_path / "test.txt").write_text("100\n")
    return tmp_path


def test_flickr_parsers(tmp_path):
    root = flickr_dir(tmp_path)
    ann = detection.parse_entities_xml(root / "Annotations" / "100.xml")
    assert (ann["width"], ann["height"], ann["depth"]) == (100, 80, 3)
    assert ann["boxes"] == {"1": [[0, 0, 40, 40]], "2": [[50, 0, 70, 20], [80, 0, 100, 20]],
                            "3": [[80, 0, 100, 20]]}
    assert (ann["nobox"], ann["scene"]) == (["4"], ["5"])
    sents = detection.parse_sentences(root / "Sentences" / "100.txt")
    assert sents[0]["sentence"] == "A man walks two dogs past a park ."
    assert [(p["phrase_id"], p["phrase"], p["first_word_index"], p["phrase_type"])
            for p in sents[1]["phrases"]] == [("3", "A dog", 0, ["animals", "other"]),
                                              ("4", "the sky", 4, ["other"]),
                                              ("0", "something", 7, ["notvisual"])]
    targets = detection.flickr_targets(root, "test")
    assert list(targets) == [("100", 0), ("100", 1)]  # sentence 2 has no boxed phrase
    assert [p["phrase_id"] for p in targets["100", 0]] == ["1", "2"]
    merged = detection.flickr_targets(root, ["100"], merge_boxes=True)
    assert merged["100", 0][1]["boxes"] == [[50, 0, 100, 20]]


def test_flickr_recall_known_values(tmp_path):
    root = flickr_dir(tmp_path)
    miss, man, dog2, dogs_all = [0, 60, 10, 70], [0, 0, 40, 40], [80, 0, 100, 20], [50, 0, 100, 20]
    predictions = {
        ("100", 0): [[man, miss],  # man found at rank 1
                     [miss, miss, miss, miss, miss, dog2]],  # dogs: the 2nd GT box at rank 6
        (100, 1): [[miss, miss, dog2]],  # the dog at rank 3
    }
    r = detection.flickr_recall(predictions, root, "test", k=(1, 5, 10, -1))
    assert (r["R@1"], r["R@5"], r["R@10"]) == (1 / 3, 2 / 3, 1.0)
    assert r["R@5/animals"] == 0.5 and r["R@1/people"] == 1.0 and r["upper_bound"] == 1.0
    assert (r["phrases"], r["sentences"]) == (3, 2)
    # merged GT: the enclosing box of the dogs is not hit by either single dog box
    merged = detection.flickr_recall(predictions, root, "test", merge_boxes=True)
    assert merged["R@10"] == pytest.approx(2 / 3)
    predictions["100", 0][1][0] = dogs_all
    assert detection.flickr_recall(predictions, root, "test", merge_boxes=True)["R@1"] == 2 / 3
    with pytest.raises(ValueError, match="no prediction"):
        detection.flickr_recall({("100", 0): predictions["100", 0]}, root, "test")
    with pytest.raises(ValueError, match="per phrase"):
        detection.flickr_recall({**predictions, ("100", 1): []}, root, "test")


def test_pr_curve_png_and_table(tmp_path):
    m = detection.coco_evaluate(coco_gt(), shifted_results())
    path = tmp_path / "pr.png"
    detection.pr_curve_png(m["precision"], path, "toy")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    table = detection.format_table(m)
    lines = table.splitlines()
    assert lines[1].split() == ["AP", f"{100 * m['AP']:.1f}"]
    assert "AP50" in lines[2] and "100.0" in lines[2]
    assert "precision" not in table and "summary" not in table
