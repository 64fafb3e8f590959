"""Evaluation maths on planted embeddings with known answers: prompt ensembling, top-k with
ties, recall@K with several captions per image, the sharded batching, the linear probe
against a SciPy solve, the shipped class-name and template data, and evaluation datasets
read through clipjax.data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from PIL import Image

from clipjax import sharding, tokenize
from clipjax.data import transforms
from clipjax.evals import data, linear_probe, prompts, retrieval, search, zeroshot
from clipjax.evals.encoders import Encoders, embed_images, embed_texts

E = 6


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _table():
    return np.random.default_rng(0).normal(size=(49408, E)).astype(np.float32)


def fake_encoders(batch_size: int = 8) -> Encoders:
    """A 'model' whose text embedding is the normalised sum of per-token vectors and whose
    image embedding is the normalised mean pixel of each channel pair; exact in NumPy too."""
    mesh = sharding.create_mesh()
    out = sharding.batch_sharding(mesh, 2)

    def text(p, tok_BL):
        x = jnp.where(tok_BL[..., None] > 0, p["table"][tok_BL], 0).sum(1)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def feats(p, img_BHWC):
        return img_BHWC.mean((1, 2)) @ p["proj"]

    def image(p, img_BHWC):
        x = feats(p, img_BHWC)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    return Encoders(jax.jit(image, out_shardings=out), jax.jit(text, out_shardings=out),
                    jax.jit(feats, out_shardings=out), 4, 12, mesh, batch_size)


PARAMS = {"table": _table(), "proj": np.random.default_rng(1).normal(size=(3, E)).astype(np.float32)}


def _ref_text(texts):
    tok = tokenize(texts, 12)
    return _unit(np.where(tok[..., None] > 0, PARAMS["table"][tok], 0).sum(1))


def test_embed_texts_pads_and_keeps_order():
    texts = [f"text number {i}" for i in range(13)]  # not a multiple of 8 devices or the batch
    got = embed_texts(fake_encoders(8), PARAMS, texts)
    np.testing.assert_allclose(got, _ref_text(texts), atol=1e-5)


def test_embed_images_regroups_batches_and_carries_labels():
    rng = np.random.default_rng(2)
    sizes = [3, 11, 1, 7]  # host batches of any size
    imgs = [rng.normal(size=(n, 4, 4, 3)).astype(np.float32) for n in sizes]
    labels = [rng.integers(0, 9, n) for n in sizes]
    out = embed_images(fake_encoders(16), PARAMS,
                       ({"image": x, "label": y} for x, y in zip(imgs, labels)))
    all_imgs = np.concatenate(imgs)
    np.testing.assert_allclose(out["embedding"], _unit(all_imgs.mean((1, 2)) @ PARAMS["proj"]),
                               atol=1e-5)
    np.testing.assert_array_equal(out["label"], np.concatenate(labels))


def test_classifier_is_the_renormalised_mean_of_normalised_prompts():
    classes = ["cat", ["dog", "puppy"], "bird"]  # a class with synonyms, as FER2013 has
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    w = zeroshot.classifier(fake_encoders(8), PARAMS, classes, templates)
    expected = []
    for c in classes:
        names = [c] if isinstance(c, str) else c
        emb = _ref_text([t.format(n) for n in names for t in templates])
        expected.append(_unit(emb.mean(0)))
    np.testing.assert_allclose(w, np.stack(expected), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1, atol=1e-6)
    # float32 end to end: the prompt counts must not promote the class embeddings.
    assert w.dtype == np.float32
    assert zeroshot.ensemble(np.ones((5, 3), np.float32), [2, 3]).dtype == np.float32
    # The ensemble maths on its own: unit rows averaged per class, then renormalised.
    t = np.array([[3.0, 0], [0, 2], [1, 0], [0, 5], [0, 1]])
    np.testing.assert_allclose(zeroshot.ensemble(t, [2, 3]),
                               [[0.5**0.5, 0.5**0.5], [1 / 5**0.5, 2 / 5**0.5]], atol=1e-12)


def test_top_k_with_ties_matches_a_stable_sort():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(500, 7)).astype(np.float32)  # many exact ties
    labels = rng.integers(0, 7, 500)
    ranks = zeroshot.true_class_rank(scores, labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    np.testing.assert_array_equal(ranks, np.argmax(order == labels[:, None], axis=1))
    # A planted case: class 2 ties with class 1 (which wins, lower index) and loses to 0.
    s = np.array([[5.0, 3, 3, 1]])
    assert zeroshot.true_class_rank(s, np.array([2]))[0] == 2
    assert zeroshot.true_class_rank(s, np.array([1]))[0] == 1
    topk, pred = zeroshot.score(np.eye(4)[[0, 1, 1, 2]] * 1.0, np.array([0, 1, 2, 3]),
                                np.eye(4), ks=(1, 2, 5))
    np.testing.assert_array_equal(pred, [0, 1, 1, 2])
    # Image 2 (label 2) scores 1 for class 1 and 0 for classes 0, 2, 3: rank 2 (class 1
    # above it, class 0 tied at a lower index); image 3 likewise ranks 3.
    assert topk == {1: 0.5, 2: 0.5, 5: 1.0}  # top-5 of 4 classes counts every image
    with pytest.raises(ValueError, match="label space disagree"):
        zeroshot.score(np.eye(3), np.array([0, 1, 3]), np.eye(3))


def test_zeroshot_result_confusion_and_per_class():
    r = zeroshot.Result({1: 0.5}, ["a", "b", "c"], np.array([0, 0, 1, 1]),
                        np.array([0, 1, 1, 1]), 1)
    np.testing.assert_array_equal(r.confusion(), [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    acc = r.per_class_accuracy()
    assert acc[0] == 0.5 and acc[1] == 1.0 and np.isnan(acc[2])
    assert r.to_json()["per_class"][2] == {"class": "c", "accuracy": None, "images": 0}


def _ref_ranks(img, txt, img_of):
    s = img @ txt.T
    i2t = [np.flatnonzero(img_of[np.argsort(-s[i], kind="stable")] == i)[0] for i in range(len(img))]
    t2i = [np.flatnonzero(np.argsort(-s[:, t], kind="stable") == img_of[t])[0]
           for t in range(len(txt))]
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("chunk", [8, 1000])
def test_recall_matches_a_full_sort_with_ties(chunk):
    rng = np.random.default_rng(4)
    n, t = 37, 150
    img = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)  # integer: exact, tied scores
    img_of = np.concatenate([np.arange(n), rng.integers(0, n, t - n)]).astype(np.int32)
    txt = (img[img_of] + rng.integers(-2, 3, size=(t, 4))).astype(np.float32)
    i2t, t2i = retrieval.ranks(img, txt, img_of, chunk=chunk)
    ref_i2t, ref_t2i = _ref_ranks(img, txt, img_of)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_recall_planted():
    # Three images; image 0 has captions 0, 1, image 1 has 2, image 2 has 3, 4.
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[0, 1, 0], [0.9, 0, 0], [0, 1, 0], [0.2, 0, 0.1], [0, 0, 0.5]], np.float32)
    i2t, t2i = retrieval.ranks(img, txt, np.array([0, 0, 1, 2, 2]))
    # Image 0's best caption (1, score 0.9) ranks first; image 1's caption 2 ties caption 0
    # at 1.0 and comes second; image 2's best (4, score 0.5) is first.
    np.testing.assert_array_equal(i2t, [0, 1, 0])
    # Caption 0 prefers image 1 (1.0 vs 0.0); caption 3 prefers image 0 (0.2 vs 0.1).
    np.testing.assert_array_equal(t2i, [1, 0, 0, 1, 0])
    m = retrieval.Result(i2t, t2i).metrics(ks=(1, 2))
    assert m == {"retrieval/i2t_R@1": 2 / 3, "retrieval/i2t_R@2": 1.0,
                 "retrieval/t2i_R@1": 0.6, "retrieval/t2i_R@2": 1.0}
    with pytest.raises(ValueError, match="no caption"):
        retrieval.ranks(img, txt, np.array([0, 0, 1, 1, 1]))


def _ref_objective(theta, x, y, lam, c):
    d, n = x.shape[1], len(x)
    w, b = theta[:d * c].reshape(d, c), theta[d * c:]
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    g = p.copy()
    g[np.arange(n), y] -= 1
    g /= n
    value = -np.log(p[np.arange(n), y]).mean() + lam / (2 * n) * (w**2).sum()
    return value, np.concatenate([(x.T @ g + lam / n * w).ravel(), g.sum(0)])


def test_linear_probe_fit_matches_scipy_lbfgs():
    rng = np.random.default_rng(5)
    n, d, c, lam = 160, 8, 4, 2.0  # the protocol test's shapes: one compilation serves both
    y = rng.integers(0, c, n)
    x = (rng.normal(size=(c, d))[y] + rng.normal(size=(n, d))).astype(np.float32)
    ref = scipy.optimize.minimize(_ref_objective, np.zeros(d * c + c), (x, y, lam, c), jac=True,
                                  method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-15})
    w = linear_probe.fit(x, y, c, lam, tol=1e-6, max_iter=200)
    ours = np.concatenate([w["kernel"].ravel(), w["bias"]])
    assert abs(_ref_objective(ours, x, y, lam, c)[0] - ref.fun) < 1e-6
    np.testing.assert_allclose(w["kernel"], ref.x[:d * c].reshape(d, c), atol=2e-4)
    # Only the bias's differences are identified (a shared shift leaves softmax unchanged).
    b_ref = ref.x[d * c:]
    np.testing.assert_allclose(w["bias"] - w["bias"].mean(), b_ref - b_ref.mean(), atol=2e-4)


def test_linear_probe_protocol(monkeypatch):
    rng = np.random.default_rng(6)
    c, d = 4, 8
    means = rng.normal(size=(c, d)) * 1.5

    def draw(n):
        y = rng.integers(0, c, n)
        return (means[y] + rng.normal(size=(n, d))).astype(np.float32), y

    calls = []
    real_fit = linear_probe.fit

    def spy(*args, **kwargs):
        calls.append(round(np.log10(args[3]), 6))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(linear_probe, "fit", spy)
    result = linear_probe.probe(draw(160), draw(200), num_classes=c, tol=1e-4, max_iter=200)
    # The paper's search: seven decades two apart, then halvings around the best down to
    # 1/8 of a decade (two new points a round at most), then one refit.
    assert calls[:7] == [-6, -4, -2, 0, 2, 4, 6]
    assert 7 < len(calls) - 1 <= 7 + 2 * 4
    assert calls[-1] == result.log10_lambda
    assert result.log10_lambda == max(result.val_scores, key=lambda k: (result.val_scores[k], k))
    assert (result.log10_lambda * 8) % 1 == 0
    bayes = 0.8  # well-separated Gaussians: a linear model is near-optimal
    assert result.top1 > bayes
    train, val = linear_probe.split_validation(10, 0.2)
    assert len(val) == 2 and sorted(np.concatenate([train, val])) == list(range(10))


def test_shipped_class_names_and_templates():
    assert len(prompts.classnames("imagenet1k")) == 1000
    assert prompts.classnames("imagenet1k")[:3] == ["tench", "goldfish", "great white shark"]
    assert prompts.classnames("imagenet1k")[-1] == "toilet paper"
    assert len(prompts.openai_imagenet_templates()) == 80
    short = prompts.short_imagenet_templates()
    assert short == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                     "a photo of the small {}."]
    assert set(short) <= set(prompts.openai_imagenet_templates())
    counts = {"cifar10": 10, "cifar100": 100, "food101": 101, "caltech101": 102,
              "stanford_cars": 196, "fgvc_aircraft": 100, "dtd": 47, "oxford_pets": 37,
              "flowers102": 102, "sun397": 397, "eurosat": 10, "country211": 211,
              "birdsnap": 500, "gtsrb": 43, "resisc45": 45, "ucf101": 101, "mnist": 10,
              "stl10": 10, "fer2013": 7, "pcam": 2, "rendered_sst2": 2, "voc2007": 20,
              "clevr_counts": 8, "kitti_distance": 4, "hateful_memes": 2}
    for name, n in counts.items():
        names = prompts.classnames(name)
        assert len(names) == n, name
        assert all("{}" in t for t in prompts.templates(name)), name
    assert len(prompts.templates("cifar100")) == 18
    assert prompts.classnames("cifar100")[:2] == ["apple", "aquarium fish"]
    assert prompts.classnames("fer2013")[3] == ["happy", "smiling"]


def test_class_list_and_label_space(tmp_path):
    # Label names in another order (tfds sorts "cheesecake" before "cheese_plate") are
    # matched by spelling, not position.
    food = prompts.classnames("food101")
    labels = [n.replace(" ", "_") for n in food]
    i, j = labels.index("cheese_plate"), labels.index("cheesecake")
    labels[i], labels[j] = labels[j], labels[i]
    aligned = prompts.resolve_classnames(labels, 101, None, "food101", "tfds:food101")
    assert [a.replace(" ", "_") for a in aligned] == labels
    assert aligned.index("cheesecake") < aligned.index("cheese plate")
    # tfds's SUN397 labels are paths ("/j/jail/indoor" sorts before "/j/jail_cell").
    import importlib.resources
    sun = (importlib.resources.files("tensorflow_datasets") / "image_classification" /
           "sun397_labels.txt").read_text().split()
    aligned = prompts.resolve_classnames(sun, 397, None, "sun397", "tfds:sun397")
    assert aligned[sun.index("/j/jail/indoor")] == "jail indoor"
    assert sorted(aligned) == sorted(prompts.classnames("sun397"))
    # ImageNet's WordNet ids cannot be matched by spelling; their sorted order is the list's.
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert prompts.resolve_classnames(wnids, 1000, None, "imagenet1k", "x")[0] == "tench"
    with pytest.raises(ValueError, match="has 10 classes but .* has 12 labels"):
        prompts.resolve_classnames([f"c{i}" for i in range(12)], 12, "cifar10", None, "folder x")
    with pytest.raises(ValueError, match="cannot be checked"):
        prompts.resolve_classnames([f"c{i}" for i in range(10)], 10, None, "cifar10", "tfds:x")
    # Folder names become class names when no list is given.
    assert prompts.resolve_classnames(["red_circle", "b"], 2, None, None, "f") == ["red circle", "b"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match="no {}"):
        prompts.load_templates(str(tmp_path / "t.txt"))


def test_search_ranking_and_model_check(tmp_path):
    emb = _unit(np.array([[1.0, 0], [0.6, 0.8], [1.0, 0], [0, 1]], np.float32))
    index = search.Index(emb, ["a", "b", "c", "d"], "ViT-tiny", "f00", "ckpt")
    # a and c tie: index order decides.
    assert search.query(index, np.array([1.0, 0]), 3) == [("a", 1.0), ("c", 1.0),
                                                          ("b", pytest.approx(0.6))]
    search.save_index(index, tmp_path / "i.npz")
    back = search.load_index(tmp_path / "i.npz")
    np.testing.assert_array_equal(back.embeddings, emb)
    assert back.paths == index.paths and back.meta() == index.meta()
    search.check_model(back, "ViT-tiny", "f00", "ckpt")
    with pytest.raises(ValueError, match="built with ViT-tiny weights f00"):
        search.check_model(back, "ViT-tiny", "beef", "other.safetensors")


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(path)


def test_labelled_images_split_rows_between_hosts(tmp_path):
    for i in range(7):
        _png(tmp_path / "cls" / "ab"[i % 2] / f"{i}.png", 30 * i)
    images = data.labelled(str(tmp_path / "cls"))  # a bare folder path: imagefolder:PATH
    assert images.description == f"imagefolder:{tmp_path / 'cls'}"
    assert images.classnames == ["a", "b"] and len(images) == 7
    labels = [0, 0, 0, 0, 1, 1, 1]  # a/0 a/2 a/4 a/6 b/1 b/3 b/5
    for host in range(3):  # host h reads rows h, h + 3, ..., each row once, in order
        batches = list(images.batches(4, batch_size=2, process_index=host, process_count=3))
        index = np.concatenate([b["index"] for b in batches])
        assert index.tolist() == list(range(host, 7, 3))
        assert np.concatenate([b["label"] for b in batches]).tolist() == [labels[i] for i in index]
    with pytest.raises(ValueError, match="must be a whole number"):
        data.labelled("synthetic:many")


def test_caption_files_read_through_the_data_layer(tmp_path):
    for i in range(3):
        _png(tmp_path / "val" / f"{i}.png", 50 * i)
    splits = ["test", "restval", "test"]
    (tmp_path / "k.json").write_text(json.dumps({"images": [
        {"filepath": "val", "filename": f"{i}.png", "split": s,
         "sentences": [{"raw": f"c{i}a"}, {"raw": f"c{i}b"}]} for i, s in enumerate(splits)]}))
    images, captions = data.captioned(tmp_path / "k.json")  # Karpathy's split file
    assert captions == [["c0a", "c0b"], ["c2a", "c2b"]]
    (batch,) = images.batches(4, batch_size=8)
    assert set(batch) == {"image", "index"} and batch["index"].tolist() == [0, 1]
    np.testing.assert_array_equal(batch["image"][1],
                                  transforms.eval_transform(tmp_path / "val" / "2.png", 4))
    assert data.captioned(tmp_path / "k.json", split="train")[1] == [["c1a", "c1b"]]  # + restval
    (tmp_path / "l.json").write_text(json.dumps([{"image": "val/1.png", "captions": ["p", "q"]}]))
    assert data.captioned(tmp_path / "l.json")[1] == [["p", "q"]]
    # CSV: one row per caption. Retrieval needs every image: a missing one is an error.
    (tmp_path / "c.csv").write_text("image,caption\nval/0.png,x\nval/0.png,y\nval/9.png,z\n")
    images, captions = data.captioned(tmp_path / "c.csv")
    assert captions == [["x", "y"], ["z"]]
    with pytest.raises(ValueError, match=r"9.png cannot be used \(missing_image"):
        list(images.batches(4))
