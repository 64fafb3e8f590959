"""End to end: a tiny CLIP trained here on the built-in synthetic data classifies and
retrieves well above chance through the evaluators and the `clipjax eval | embed | search`
commands, which agree with each other; bad input gets one clear error each."""

import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import clipjax
from clipjax import cli, convert, files
from clipjax.data import synthetic
from clipjax.evals import (config_evaluators, embed_images, embed_texts, make_encoders, run_all,
                           synthetic_evaluators)
from clipjax.weights import fingerprint, load_model

CHANCE = 1 / len(synthetic.CLASSNAMES)
N_EVAL = 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ViT-tiny after 250 AdamW steps of symmetric InfoNCE on 64-image batches."""
    model = clipjax.create_model("ViT-tiny")
    params = clipjax.init_params(model, jax.random.key(0))
    steps = 250
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 5e-3, 25, steps, 5e-4), b2=0.98,
                     weight_decay=0.1)

    def loss_fn(p, img, tok):
        img_BE, txt_BE, scale, _ = model.apply({"params": p}, img, tok)
        logits_BB = jnp.exp(scale) * img_BE @ txt_BE.T
        labels = jnp.arange(len(img))
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits_BB, labels).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits_BB.T, labels).mean())

    # This loop is bound by execution, not compilation: optimise it fully, whatever the
    # suite's XLA flags say (3x faster here).
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 3})
    def step(p, o, img, tok):
        loss, g = jax.value_and_grad(loss_fn)(p, img, tok)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    opt = tx.init(params)
    it = synthetic.SyntheticIterator(64, context_length=16, seed=1)
    for _ in range(steps):
        b = next(it)
        params, opt, _ = step(params, opt, b["image"], b["text"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    files.save_params(path, params, "ViT-tiny")
    return model, jax.tree.map(np.asarray, params), path


@pytest.fixture(scope="module")
def evaluated(trained):
    model, params, _ = trained
    return run_all(synthetic_evaluators(N_EVAL), make_encoders(model), params)


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `clipjax ARGV`, in this process."""
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trained_tiny_model_beats_chance(evaluated):
    assert evaluated["zeroshot/top1"] > 4 * CHANCE
    assert evaluated["zeroshot/top5"] > 4 * 5 * CHANCE
    for key in ("retrieval/i2t_R@1", "retrieval/t2i_R@1"):
        assert evaluated[key] > 4 / N_EVAL, key  # 4x chance
    assert evaluated["retrieval/t2i_R@10"] > evaluated["retrieval/t2i_R@1"]


def _class_folder(root, num):
    """The first `num` held-out images as PNGs in one folder per class ("red_circle")."""
    ex = synthetic.render(0, "held_out", np.arange(num), 32)
    for i in range(num):
        d = root / synthetic.CLASSNAMES[ex.label_B[i]].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ex.image_BHWC[i]).save(d / f"{i:04d}.png")
    return ex


def test_cli_zeroshot_on_a_class_folder_matches_the_evaluator(trained, evaluated, tmp_path, capsys):
    _, _, ckpt = trained
    ex = _class_folder(tmp_path / "images", N_EVAL)
    assert len(np.unique(ex.label_B)) == 36  # every class has a folder
    (tmp_path / "templates.txt").write_text("\n".join(synthetic.TEMPLATES))
    out_json = tmp_path / "out" / "zs.json"
    code, out, err = run_cli(["eval", "zeroshot", "--checkpoint", ckpt, "--dataset",
                              tmp_path / "images", "--templates", tmp_path / "templates.txt",
                              "--out", out_json], capsys)
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["num_images"] == N_EVAL and res["num_classes"] == 36 and res["num_templates"] == 4
    # Same images (PNG is lossless), same class names and templates, labels in folder order:
    # the command and the in-process evaluator agree to within one image.
    assert abs(res["top1"] - evaluated["zeroshot/top1"]) <= 1 / N_EVAL
    assert re.search(r"top-1\s+\d+\.\d\d%", out)
    per_class = {c["class"]: c for c in res["per_class"]}
    assert sum(c["images"] for c in per_class.values()) == N_EVAL
    for png in ("zs_per_class.png", "zs_confusion.png"):
        with Image.open(tmp_path / "out" / png) as im:
            assert im.format == "PNG" and min(im.size) > 200

    # A class list that disagrees with the folder's 36 labels, and an empty folder.
    code, _, err = run_cli(["eval", "zeroshot", "--checkpoint", ckpt, "--dataset",
                            tmp_path / "images", "--classes", "cifar10"], capsys)
    assert code == 2 and "has 10 classes but" in err and "36 labels" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["eval", "zeroshot", "--checkpoint", ckpt, "--dataset",
                            tmp_path / "empty"], capsys)
    assert code == 2 and "holds no class subfolders" in err


def _png(pixels_HWC) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels_HWC).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shapes_tfds(tmp_path_factory):
    """The first N_EVAL held-out images as a prepared TFDS dataset `shapes` (split "test"),
    whose label order is a permutation of the class list; returns its data_dir."""
    import tensorflow_datasets as tfds

    ex = synthetic.render(0, "held_out", np.arange(N_EVAL), 32)
    order = np.random.default_rng(0).permutation(36)  # tfds label j is class order[j]
    label_names = [synthetic.CLASSNAMES[c].replace(" ", "_") for c in order]
    label_B = np.argsort(order)[ex.label_B]

    with tfds.core.registered.skip_registration():
        class Shapes(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(names=label_names)}))

            def _split_generators(self, dl_manager):
                return {"test": self._generate_examples()}

            def _generate_examples(self):
                for i in range(N_EVAL):  # encoded bytes: TFDS encodes arrays with TensorFlow
                    yield i, {"image": io.BytesIO(_png(ex.image_BHWC[i])), "label": int(label_B[i])}

    data_dir = tmp_path_factory.mktemp("tfds")
    Shapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_cli_zeroshot_on_tfds_matches_labels_by_name(trained, evaluated, shapes_tfds, tmp_path,
                                                     capsys):
    """A tfds dataset whose label order differs from the class list: names decide."""
    _, _, ckpt = trained
    (tmp_path / "classes.txt").write_text("\n".join(synthetic.CLASSNAMES))
    (tmp_path / "templates.txt").write_text("\n".join(synthetic.TEMPLATES))
    out_json = tmp_path / "zs.json"
    # --data-dir joins the spec as data_dir=; without split= it reads validation, else test.
    code, out, err = run_cli(["eval", "zeroshot", "--checkpoint", ckpt, "--dataset",
                              "tfds:shapes", "--data-dir", shapes_tfds, "--classes",
                              tmp_path / "classes.txt", "--templates", tmp_path / "templates.txt",
                              "--out", out_json, "--no-plots"], capsys)
    assert code == 0, err
    assert f"tfds:shapes?data_dir={shapes_tfds}&split=test" in out
    assert abs(json.loads(out_json.read_text())["top1"] - evaluated["zeroshot/top1"]) <= 1 / N_EVAL
    code, _, err = run_cli(["eval", "zeroshot", "--checkpoint", ckpt, "--dataset",
                            "tfds:shapes:test", "--data-dir", shapes_tfds], capsys)
    assert code == 2 and "give the split as an option: 'tfds:shapes?data_dir=" in err


def test_config_evaluators_from_a_spec_string(trained, shapes_tfds, tmp_path):
    """A training config's eval.zeroshot: a source spec with options, checked when built."""
    model, params, _ = trained
    evaluators = config_evaluators(f"tfds:shapes?data_dir={shapes_tfds}&split=test",
                                   batch_size=64)
    assert list(evaluators) == ["zeroshot"]
    # Class names from tfds's labels, in tfds's order, with OpenAI's 80 templates (the
    # default for a dataset clipjax ships no list for): right names on the right labels.
    metrics = run_all(evaluators, make_encoders(model), params)
    assert set(metrics) == {"zeroshot/top1", "zeroshot/top5"}
    assert metrics["zeroshot/top1"] > 4 * CHANCE
    assert config_evaluators("") == {}
    assert set(config_evaluators("synthetic", num_examples=8)) == {"zeroshot", "retrieval"}
    with pytest.raises(ValueError, match="split 'validation' is not available"):
        config_evaluators(f"tfds:shapes?data_dir={shapes_tfds}&split=validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_evaluators(f"imagefolder:{tmp_path}/missing")
    with pytest.raises(ValueError, match="holds no class subfolders"):
        config_evaluators(str(tmp_path))


def test_cli_retrieval_matches_the_evaluator(trained, evaluated, tmp_path, capsys):
    _, _, ckpt = trained
    code, _, err = run_cli(["eval", "retrieval", "--checkpoint", ckpt, "--dataset",
                            f"synthetic:{N_EVAL}", "--out", tmp_path / "r.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num_images"] == N_EVAL and res["num_captions"] == 5 * N_EVAL
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10"):
        assert res[key] == pytest.approx(evaluated[f"retrieval/{key}"], abs=1e-9)
    assert res["curve"]["i2t"][0] == res["i2t_R@1"] and res["curve"]["k"][-1] == 50
    with Image.open(tmp_path / "r_recall.png") as im:
        assert im.format == "PNG"


def test_cli_linear_probe_beats_chance(trained, tmp_path, capsys):
    _, _, ckpt = trained
    code, out, err = run_cli(["eval", "linear-probe", "--checkpoint", ckpt, "--train",
                              "synthetic-train:256", "--test", "synthetic:128", "--max-iter", 20,
                              "--out", tmp_path / "lp.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "lp.json").read_text())
    assert res["top1"] > 4 * CHANCE
    assert (res["log10_lambda"] * 8) % 1 == 0 and "scikit-learn C" in out


def test_cli_embed_and_search(trained, tmp_path, capsys):
    model, params, ckpt = trained
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    ex = synthetic.render(0, "held_out", np.arange(12), 32)
    paths = []
    for i in range(12):
        f = folder / ("nested" if i % 2 else "") / f"{i:02d}.png"
        Image.fromarray(ex.image_BHWC[i]).save(f)
        paths.append(f)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, ignored")
    index = tmp_path / "index.npz"
    code, out, err = run_cli(["embed", folder, "--checkpoint", ckpt, "--out", index], capsys)
    assert code == 0, err
    assert "Embedded 12 images" in out and "skipped 1 unreadable" in out
    assert "broken.jpg" in err

    query = "a red circle"
    code, out, err = run_cli(["search", query, "--index", index, "-k", 5, "--html",
                              tmp_path / "page.html"], capsys)
    assert code == 0, err
    hits = [line.split(maxsplit=2) for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [int(h[0]) for h in hits] == [1, 2, 3, 4, 5]
    # The ranking is the one the encoders give in this process.
    enc = make_encoders(model)
    img = embed_images(enc, params, [{"image": synthetic.normalize(ex.image_BHWC)}])["embedding"]
    s = img @ embed_texts(enc, params, [query])[0]
    best = np.argsort(-s, kind="stable")[:5]
    assert [h[2] for h in hits] == [str(paths[i].resolve()) for i in best]
    np.testing.assert_allclose([float(h[1]) for h in hits], s[best], atol=1e-4)
    page = (tmp_path / "page.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and query in page

    # An index searched with other weights.
    other = tmp_path / "other.safetensors"
    files.save_params(other, clipjax.init_params(model, jax.random.key(7)), "ViT-tiny")
    code, _, err = run_cli(["search", query, "--index", index, "--checkpoint", other], capsys)
    assert code == 2 and "was built with ViT-tiny weights" in err
    # The same weights in OpenCLIP's layout load to the same fingerprint, so an index built
    # from the clipjax file serves a converted checkpoint and vice versa.
    torch_layout = tmp_path / "open_clip_layout.safetensors"
    files.save_torch(torch_layout, convert.to_torch(params, "ViT-tiny"))
    _, converted, arch = load_model(torch_layout)
    assert arch == "ViT-tiny" and fingerprint(converted) == fingerprint(load_model(ckpt)[1])
    (tmp_path / "none").mkdir()
    code, _, err = run_cli(["embed", tmp_path / "none", "--checkpoint", ckpt, "--out",
                            tmp_path / "x.npz"], capsys)
    assert code == 2 and "holds no image files" in err
