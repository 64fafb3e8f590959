"""The segmentation commands: `eval segmentation` gives the figures a run logged (one step
of LSeg's runlocal config, most of the time here) and the evaluator's on a GroupViT file,
`segment` writes a label map, an overlay and the areas, and a bad input gets one sentence."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from clipjax import cli, weights
from clipjax import config as config_lib
from clipjax.data import synthetic_seg
from clipjax.evals import segmentation as seg_evals
from clipjax.heads import dense
from clipjax.models import clip


def _train(name: str, workdir) -> None:
    from clipjax import train

    config = config_lib.load_config(f"{name}:runlocal",
                                    ["total_steps=1", "eval.num_examples=8"])
    train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The LSeg workdir a run trained, and a GroupViT .safetensors (its initialisation,
    with its config, as `clipjax export` writes a run's parameters)."""
    from clipjax.heads import groupvit
    from clipjax.models.layers import nn

    lseg_dir = tmp_path_factory.mktemp("lseg_synthetic")
    _train("lseg_synthetic", lseg_dir)
    config = config_lib.load_config("groupvit_synthetic:runlocal")
    model = groupvit.build_models(config)[1]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *model.example_inputs(1))[
        "params"])
    path = tmp_path_factory.mktemp("groupvit") / "groupvit.safetensors"
    weights.write(weights.from_params(jax.tree.map(np.asarray, params), config, "test"), path)
    return {"lseg_synthetic": lseg_dir, "groupvit_synthetic": path}


def _run(argv, capsys) -> tuple[str, str]:
    cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return out.out, out.err


def _logged(workdir) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if "seg/miou" in r)


@pytest.mark.parametrize("name", ["lseg_synthetic", "groupvit_synthetic"])
def test_eval_segmentation_gives_what_the_run_logged(runs, name, tmp_path, capsys):
    out_json = tmp_path / "seg.json"
    out, _ = _run(["eval", "segmentation", "--checkpoint", runs[name], "--dataset", "synthetic:8",
                   "--out", out_json], capsys)
    result = json.loads(out_json.read_text())
    if name == "lseg_synthetic":
        logged = _logged(runs[name])
    else:  # what the training loop's evaluator computes for this checkpoint
        module, model, params, config = dense.load(str(runs[name]))
        config.eval.segmentation, config.eval.num_examples = "synthetic", 8
        logged = dense.build_evaluators(module, config)["seg"](
            dense.make_encoders(module, model, None), params)
    for key in ("miou", "miou_zeros", "pixel_accuracy"):
        assert result[key] == pytest.approx(logged[f"seg/{key}"], abs=1e-6), key
    assert "absent classes skipped" in out and "absent classes as 0" in out  # both conventions named
    assert len(result["iou"]) == len(synthetic_seg.CLASSES)


def test_segment_writes_the_label_map_overlay_and_areas(runs, tmp_path, capsys):
    folder = synthetic_seg.write_dataset(tmp_path / "data", 2, image_size=64)
    images = sorted((tmp_path / "data" / "images").iterdir())
    labels = ["other", "circle", "square"]
    out, _ = _run(["segment", *images, "--checkpoint", runs["lseg_synthetic"], "--labels",
                   ", ".join(labels), "--out-dir", tmp_path / "out"], capsys)
    areas = json.loads((tmp_path / "out" / "areas.json").read_text())
    assert folder and areas["labels"] == labels
    module, model, params, config = dense.load(str(runs["lseg_synthetic"]))
    encoders = dense.make_encoders(module, model, None)
    logits_fn = encoders.logits_fn(params, encoders.embed_labels(params, labels))
    for path in images:
        label_png = Image.open(tmp_path / "out" / f"{path.stem}_labels.png")
        assert label_png.mode == "P"
        pred = np.asarray(label_png)
        image = np.asarray(Image.open(path).convert("RGB"))
        assert pred.shape == image.shape[:2] and pred.max() < len(labels)
        options = dense.predict_options(module, config, "image")
        expect = np.argmax(seg_evals.predict(logits_fn, image, **options), -1)
        np.testing.assert_array_equal(pred, expect)
        share = areas["images"][str(path)]["areas"]
        assert sum(share.values()) == pytest.approx(1.0)
        assert share["other"] == pytest.approx(np.mean(pred == 0))
        overlay = Image.open(tmp_path / "out" / f"{path.stem}_overlay.png")
        assert overlay.size[0] > image.shape[1]  # the legend beside the image
        assert str(path) in out


def test_groupvit_segments_with_background_first(runs, tmp_path, capsys):
    synthetic_seg.write_dataset(tmp_path / "data", 1, image_size=32)
    image = next((tmp_path / "data" / "images").iterdir())
    _run(["segment", image, "--checkpoint", runs["groupvit_synthetic"], "--labels",
          "circle, ring", "--bg-thresh", "0.5", "--out-dir", tmp_path / "out"], capsys)
    areas = json.loads((tmp_path / "out" / "areas.json").read_text())
    assert areas["labels"] == ["background", "circle", "ring"]
    assert np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_labels.png")).max() <= 2


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    config = config_lib.load_config("default")
    params = jax.tree.map(np.asarray, clip.init_params(clip.create_model("ViT-tiny"),
                                                       jax.random.key(0)))
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    weights.write(weights.from_params(params, config, "test"), path)
    return path


@pytest.mark.parametrize("argv,says", [
    (["segment", "{missing}", "{image}", "--checkpoint", "{lseg}", "--labels", "a, b",
      "--out-dir", "{out}"], "does not exist"),
    (["segment", "{image}", "--checkpoint", "{lseg}", "--labels", "a, b, a"], "given twice"),
    (["segment", "{image}", "--checkpoint", "{clip}", "--labels", "a, b"], "holds a clip model"),
    (["segment", "{image}", "--checkpoint", "{lseg}", "--labels", "a", "--bg-thresh", "0.5"],
     "applies to GroupViT"),
    (["segment", "{image}", "--checkpoint", "{lseg}", "--labels", "a", "--scales", "1,x"],
     "numbers separated by commas"),
    (["eval", "segmentation", "--checkpoint", "{lseg}", "--dataset", "synthetic:4", "--labels",
      "a, b"], "one name a class"),
    (["eval", "segmentation", "--checkpoint", "{lseg}", "--dataset", "voc:{missing}"], "{missing}"),
])
def test_a_bad_input_gets_one_sentence(runs, clip_file, tmp_path, capsys, argv, says):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    fill = dict(missing=tmp_path / "nope", lseg=runs["lseg_synthetic"], clip=clip_file,
                image=image, out=tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        _run([a.format(**fill) for a in argv], capsys)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says.format(**fill) in err, err
    assert "Traceback" not in err
    if "{missing}" in argv and argv[0] == "segment":  # a line for the file, one to sum up
        assert len(err.splitlines()) == 2 and "1 of 2 images could not be read" in err
        assert (tmp_path / "out" / "x_labels.png").is_file()  # the readable one is done
    else:
        assert len(err.splitlines()) == 1
