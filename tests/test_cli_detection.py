"""The detection commands on a GLIP file: `eval detection` gives what the training loop's
evaluator computes (and writes COCO results, a PR curve), `detect` draws and lists the
boxes the model finds, and a bad input gets one sentence."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from clipjax import cli, weights
from clipjax import config as config_lib
from clipjax.data import detection as det_data
from clipjax.data import synthetic_det
from clipjax.heads import detection


@pytest.fixture(scope="module")
def glip_file(tmp_path_factory):
    """GLIP runlocal's initialisation with bias0 at 0, so that token probabilities sit
    near 1/2 and every image has detections to compare, saved as `clipjax export` does."""
    import flax.linen as nn

    from clipjax.heads import glip

    config = config_lib.load_config("glip_synthetic:runlocal")
    model = glip.build_models(config)[1]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *model.example_inputs(1))[
        "params"])
    params = jax.tree.map(np.asarray, dict(params, bias0=np.zeros((), np.float32)))
    path = tmp_path_factory.mktemp("glip") / "glip.safetensors"
    weights.write(weights.from_params(params, config, "test"), path)
    return path


def _run(argv, capsys) -> tuple[str, str]:
    cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return out.out, out.err


def test_eval_detection_gives_the_evaluator_and_writes_results(glip_file, tmp_path, capsys):
    out_json = tmp_path / "det.json"
    out, _ = _run(["eval", "detection", "--checkpoint", glip_file, "--dataset", "synthetic:8",
                   "--out", out_json], capsys)
    result = json.loads(out_json.read_text())
    head, model, params, config = detection.load(str(glip_file))
    config.eval.detection, config.eval.num_examples = "synthetic:8", 8
    logged = detection.build_evaluators(head, config)["det"](
        detection.make_encoders(head, model, None), params)
    for key in ("AP", "AP50", "AP75"):
        assert result["metrics"]["all"][key] == pytest.approx(logged[f"det/{key}"], abs=1e-9)
        assert result["metrics"]["unseen"][key] == pytest.approx(logged[f"det/unseen_{key}"],
                                                                 abs=1e-9)
    results = json.loads((tmp_path / "det_results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert {r["category_id"] for r in results} <= set(synthetic_det.CATEGORY_IDS)
    assert len({r["image_id"] for r in results}) == 8
    assert Image.open(tmp_path / "det_pr.png").size[0] > 100
    assert "AP50" in out and "[unseen]" in out


def test_detect_draws_and_lists_the_models_boxes(glip_file, tmp_path, capsys):
    images = synthetic_det.render(0, "held_out", np.arange(2), 64).image_BHWC
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"shape{i}.png")
        Image.fromarray(np.repeat(np.repeat(image, 2, 0), 2, 1)).save(paths[-1])  # 128 px
    out, _ = _run(["detect", *paths, "--checkpoint", glip_file, "--prompt",
                   "red circle. blue ring", "--threshold", "0.2", "--out-dir", tmp_path / "o"],
                  capsys)
    found = json.loads((tmp_path / "o" / "boxes.json").read_text())
    assert found["prompt"] == ["red circle", "blue ring"]
    head, model, params, config = detection.load(str(glip_file))
    encoders = detection.make_encoders(head, model, None)
    prompt = detection.prompts(["red circle", "blue ring"], encoders.context_length)
    for path in paths:
        # The 128-px file is letterboxed onto the 64-px canvas; boxes come back x2.
        canvas, scale = det_data.letterbox(np.asarray(Image.open(path).convert("RGB")), 64)
        assert scale == 0.5
        (bx, sc, lb), = encoders.detect(params, canvas[None], prompt, 2)
        keep = sc >= 0.2
        got = found["images"][str(path)]["boxes"]
        assert keep.any() and len(got) == keep.sum()
        np.testing.assert_allclose([b["box_xyxy"] for b in got],
                                   np.clip(2 * bx[keep], 0, 128), atol=0.051)
        np.testing.assert_allclose([b["score"] for b in got], sc[keep], atol=5e-5)
        assert [b["phrase"] for b in got] == [["red circle", "blue ring"][k] for k in lb[keep]]
        drawn = Image.open(tmp_path / "o" / f"{path.stem}_boxes.png")
        assert drawn.size == (128, 128)
        assert str(path) in out


@pytest.mark.parametrize("argv,says", [
    (["detect", "{missing}", "{image}", "--checkpoint", "{glip}", "--prompt", "a. b",
      "--out-dir", "{out}"], "does not exist"),
    (["detect", "{image}", "--checkpoint", "{glip}", "--prompt", "a. b. a"], "twice"),
    (["detect", "{image}", "--checkpoint", "{glip}", "--prompt", " . "], "names nothing"),
    (["eval", "detection", "--checkpoint", "{glip}"], "Name one evaluation split"),
    (["eval", "detection", "--checkpoint", "{glip}", "--coco", "{missing}"], "{missing}"),
])
def test_a_bad_input_gets_one_sentence(glip_file, tmp_path, capsys, argv, says):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    fill = dict(missing=tmp_path / "nope", glip=glip_file, image=image, out=tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        _run([a.format(**fill) for a in argv], capsys)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says.format(**fill) in err, err
    assert "Traceback" not in err
    if argv[1] == "{missing}":  # a line for the file, one to sum up; the other is done
        assert len(err.splitlines()) == 2 and "1 of 2 images could not be read" in err
        assert (tmp_path / "out" / "x_boxes.png").is_file()
    else:
        assert len(err.splitlines()) == 1


def _flickr(root, count: int = 2) -> None:
    """A Flickr30k Entities folder in miniature: built-in images with two shapes, MDETR's
    JSON (one entry a sentence) and the Entities XML and sentences."""
    ex = synthetic_det.render(0, "held_out", np.arange(12), 64)
    two = [i for i in range(12) if (ex.labels_BS[i] >= 0).sum() == 2][:count]
    for sub in ("flickr30k-images", "mdetr_annotations", "flickr30k_entities/Annotations",
                "flickr30k_entities/Sentences"):
        (root / sub).mkdir(parents=True)
    images, anns = [], []
    for n, i in enumerate(two):
        names = [synthetic_det.CLASSNAMES[c] for c in ex.labels_BS[i][:2]]
        caption = f"a {names[0]} beside a {names[1]} ."
        spans = [(0, 2 + len(names[0])), (caption.index(" a ", 2) + 1, len(caption) - 2)]
        Image.fromarray(ex.image_BHWC[i]).save(root / "flickr30k-images" / f"{i}.png")
        images.append({"id": n, "file_name": f"{i}.png", "height": 64, "width": 64,
                       "caption": caption, "sentence_id": 0, "original_img_id": i,
                       "tokens_positive_eval": [[list(s)] for s in spans]})
        xml = "".join(f"<object><name>{k + 1}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                      f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                      for k, b in enumerate(ex.boxes_BS4[i][:2].round().astype(int)))
        (root / "flickr30k_entities" / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><size><width>64</width><height>64</height><depth>3</depth></size>"
            f"{xml}</annotation>")
        (root / "flickr30k_entities" / "Sentences" / f"{i}.txt").write_text(
            f"[/EN#1/other a {names[0]}] beside [/EN#2/other a {names[1]}] .\n")
        for k, (s, b) in enumerate(zip(spans, ex.boxes_BS4[i][:2].round())):
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                  float(b[3] - b[1])], "area": 1.0, "tokens_positive": [list(s)]})
    (root / "mdetr_annotations" / "final_flickr_separateGT_val.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))


def test_eval_flickr_recall_counts_the_phrases_the_model_grounds(glip_file, tmp_path, capsys):
    from clipjax.heads import boxes

    _flickr(tmp_path / "flickr")
    out_json = tmp_path / "flickr.json"
    _run(["eval", "detection", "--checkpoint", glip_file, "--flickr", tmp_path / "flickr",
          "--split", "val", "--out", out_json], capsys)
    got = json.loads(out_json.read_text())["metrics"]["all"]
    head, model, params, config = detection.load(str(glip_file))
    dataset = detection.eval_set(f"flickr:{tmp_path / 'flickr'}?split=val", config)
    preds = detection.ground_phrases(detection.make_encoders(head, model, None), params, dataset)
    hits = {1: 0, 5: 0, 10: 0}
    phrases = 0
    for ex in dataset:
        for ranked, truth in zip(preds[(ex.original_img_id, 0)], ex.phrase_boxes):
            phrases += 1
            iou = boxes.pairwise_iou(np.asarray(ranked, np.float32).reshape(-1, 4), truth)
            for k in hits:
                hits[k] += bool((iou[:k] >= 0.5).any())
    assert phrases == 4
    for k, h in hits.items():
        assert got[f"R@{k}"] == pytest.approx(h / phrases), k
