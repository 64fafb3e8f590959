"""A trained run is usable everywhere: every kind of checkpoint loads the same weights, export
writes files OpenCLIP and Hugging Face load with the same embeddings, init_checkpoint works
across layouts, and the run itself shows what it does."""

import contextlib
import functools
import io
import os
import shutil

import jax
import numpy as np
import pytest
import torch

import clipjax
import reference
from clipjax import cli, config as config_lib, convert, files, train, weights

# The multi-positive loss (which needs labels in the batch) and an architecture field set from
# the command line: both broke the loop before.
OVERRIDES = ["total_steps=4", "global_batch=32", "optimizer.warmup_steps=1", "log_every_steps=1",
             "checkpoint.every_steps=2", "eval.every_steps=4", "eval.num_examples=32",
             "loss=multi_positive", "model_overrides.embed_dim=48"]


def _train(overrides, workdir) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = train.train_and_evaluate(config_lib.load_config("default", overrides), workdir)
    return metrics, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    metrics, printed = _train(OVERRIDES, workdir)
    return workdir, metrics, printed


def _flat(params) -> dict:
    return convert._flatten(params)


def assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_multi_positive_loss_and_model_overrides_train(run):
    workdir, metrics, _ = run
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["i2t_accuracy"] <= 1
    w = weights.load(workdir)
    assert w.model_config.embed_dim == 48 and w.arch == "ViT-tiny"
    assert w.params["visual"]["proj"].shape == (64, 48)
    assert w.description == "ViT-tiny (embed_dim=48)"


def test_the_run_shows_its_evaluations_and_a_summary(run):
    workdir, metrics, printed = run
    assert "step 4: evaluation" in printed
    assert f"zeroshot   top1 {100 * metrics['zeroshot/top1']:.2f}%" in printed
    assert "Finished step 4 of 4: 4 steps in" in printed
    assert "model.safetensors (the final parameters), checkpoints/ (steps 2, 4)" in printed
    assert f"next: clipjax eval zeroshot --checkpoint {workdir}" in printed
    assert "{" not in printed  # no raw JSON


def test_a_resumed_run_says_so_and_continues_exactly(run, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(run[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    (workdir / "model.safetensors").unlink()
    metrics, printed = _train(OVERRIDES, workdir)
    assert "Resumed from step 2 of 4" in printed
    np.testing.assert_allclose(metrics["loss"], run[1]["loss"], rtol=1e-6)
    assert_same_params(weights.load(workdir / "model.safetensors").params,
                       weights.load(run[0] / "model.safetensors").params)


def test_resuming_with_another_global_batch_is_refused(run, tmp_path):
    workdir = tmp_path / "other-batch"
    shutil.copytree(run[0], workdir)
    with pytest.raises(ValueError, match="written with global_batch=32, this run has "
                                         "global_batch=64"):
        _train(OVERRIDES + ["global_batch=64", "total_steps=6"], workdir)


def test_every_kind_of_checkpoint_gives_the_same_weights(run, tmp_path, monkeypatch):
    workdir = run[0]
    latest = weights.load(workdir)
    assert latest.source == f"{workdir} step 4"
    monkeypatch.chdir(workdir.parent)  # relative paths, as users type them
    assert_same_params(weights.load(workdir.name).params, latest.params)
    assert_same_params(weights.load(f"{workdir.name}/checkpoints/4").params, latest.params)
    assert_same_params(weights.load(workdir / "model.safetensors").params, latest.params)
    step2 = weights.load(workdir, step=2).params
    assert not np.array_equal(step2["visual"]["proj"], latest.params["visual"]["proj"])
    out = tmp_path / "exported.safetensors"
    cli.main(["export", str(workdir), str(out), "--step", "2"])
    exported = weights.load(out)
    assert_same_params(exported.params, step2)
    assert exported.model_config == latest.model_config
    assert exported.config["loss"] == "multi_positive"  # the training config travels along
    assert weights.fingerprint(exported.params) == weights.fingerprint(step2)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("path, message", [
    ("nowhere", "Checkpoint .*nowhere does not exist"),
    ("empty-workdir", "holds no finished checkpoint yet"),
])
def test_bad_checkpoints_are_one_clear_error(tmp_path, path, message):
    (tmp_path / "empty-workdir").mkdir()
    (tmp_path / "empty-workdir" / "run.json").write_text('{"model": "ViT-tiny"}')
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        weights.load(tmp_path / path)


def test_missing_step_lists_the_saved_ones(run):
    with pytest.raises(ValueError, match="has no checkpoint of step 3; it has steps 2, 4"):
        weights.load(run[0], step=3)


def _embeddings(w: weights.Weights):
    model = w.model()
    c = w.model_config
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, c.vision.image_size, c.vision.image_size, 3)).astype(np.float32)
    tokens = clipjax.tokenize(["a red circle", "a small blue square at the top"],
                              c.text.context_length)
    return (img, tokens,
            np.asarray(model.apply({"params": w.params}, img, method="encode_image")),
            np.asarray(model.apply({"params": w.params}, tokens, method="encode_text")))


def test_hf_export_loads_in_transformers_with_the_same_embeddings(run, tmp_path):
    w = weights.load(run[0])
    cli.main(["export", str(run[0]), str(tmp_path / "hf"), "--to", "hf"])
    CLIPModel, _ = reference.hf_clip()
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    img, tokens, want_img, want_txt = _embeddings(w)
    with torch.no_grad():
        got_img = hf.get_image_features(pixel_values=torch.from_numpy(img).permute(0, 3, 1, 2))
        got_txt = hf.get_text_features(input_ids=torch.from_numpy(np.asarray(tokens)).long())
    got_img = getattr(got_img, "pooler_output", got_img)
    got_txt = getattr(got_txt, "pooler_output", got_txt)
    np.testing.assert_allclose(got_img.numpy(), want_img, atol=1e-5)
    np.testing.assert_allclose(got_txt.numpy(), want_txt, atol=1e-5)
    # ... and it comes back to clipjax with its architecture and fields.
    assert_same_params(weights.load(tmp_path / "hf").params, w.params)


def test_openclip_export_loads_in_open_clip_with_the_same_embeddings(run, tmp_path):
    w = weights.load(run[0])
    out = tmp_path / "openclip.safetensors"
    cli.main(["export", str(run[0]), str(out), "--to", "openclip"])
    oc = reference.open_clip()
    c = w.model_config
    v, t = c.vision, c.text
    model = oc.model.CLIP(
        embed_dim=c.embed_dim,
        vision_cfg=dict(image_size=v.image_size, layers=v.layers, width=v.width,
                        patch_size=v.patch_size, head_width=v.head_width, mlp_ratio=v.mlp_ratio),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                      heads=t.heads, layers=t.layers))
    state, _ = files.read_state_dict(out)
    model.load_state_dict({k: torch.from_numpy(np.array(x)) for k, x in state.items()},
                          strict=False)  # attn_mask buffers are not parameters
    model.eval()
    img, tokens, want_img, want_txt = _embeddings(w)
    with torch.no_grad():
        got_img = model.encode_image(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
        got_txt = model.encode_text(torch.from_numpy(np.asarray(tokens)).long()).numpy()
    np.testing.assert_allclose(got_img, want_img, atol=1e-5)
    np.testing.assert_allclose(got_txt, want_txt, atol=1e-5)
    assert_same_params(weights.load(out).params, w.params)


@functools.cache
def _fresh_state(overrides: tuple[str, ...]):
    config = config_lib.load_config("default", list(overrides))
    train_model, _ = train.build_models(config)
    mesh = clipjax.sharding.mesh_from_config(config.mesh)
    optimizer = clipjax.optim.create_optimizer(
        dict(config.optimizer, total_steps=1000), clipjax.abstract_params(train_model),
        arch=config.model)
    return train.create_train_state(train_model, optimizer, jax.random.key(1), mesh)


def _init_into(overrides: list[str], init: str | None = None, keep: str | None = None):
    """What `init_checkpoint` puts into a fresh state of the config (scanned or not)."""
    state = _fresh_state(tuple(overrides))
    if init is None:
        return state.params
    extra = [f"init_checkpoint={init}"] + ([f"init_checkpoint_keep=('{keep}',)"] if keep else [])
    return weights.load_init(state, config_lib.load_config("default", overrides + extra))[0].params


def test_init_checkpoint_loads_every_kind_into_a_scanned_model(run, tmp_path):
    """A scanned config used to fail on every init_checkpoint (unscanned paths compared
    with stacked ones), which is how the LiT recipe starts."""
    workdir = run[0]
    want = weights.fit_layout(weights.load(workdir).params, scan=True)
    clipjax_file = tmp_path / "p.safetensors"
    openclip_file = tmp_path / "p_openclip.safetensors"
    weights.write(weights.load(workdir), clipjax_file)
    weights.write(weights.load(workdir), openclip_file, to="openclip")
    scanned = [o for o in OVERRIDES if not o.startswith("loss")] + ["scan=True"]
    for source in (workdir, workdir / "checkpoints" / "4", clipjax_file, openclip_file):
        got = _init_into(scanned, source)
        assert got["text"]["transformer"]["resblocks"]["ln_1"]["scale"].ndim == 2  # stacked
        assert_same_params(got, want)
    # A PyTorch checkpoint of a plain architecture, taking only the image tower.
    plain = clipjax.init_params(clipjax.create_model("ViT-tiny"), jax.random.key(3))
    torch.save({k: torch.from_numpy(np.array(x)) for k, x in
                convert.to_torch(plain, "ViT-tiny").items()}, tmp_path / "plain.pt")
    got = _flat(_init_into(["scan=True"], tmp_path / "plain.pt", keep="^visual/"))
    want_visual = _flat(weights.fit_layout(plain, scan=True))
    fresh = _flat(_init_into(["scan=True"]))
    for k, x in got.items():
        np.testing.assert_array_equal(x, want_visual[k] if k.startswith("visual/") else fresh[k],
                                      err_msg=k)


def test_init_checkpoint_of_another_model_names_what_is_missing(run):
    with pytest.raises(ValueError, match=r"lacks \d+ parameter\(s\) of this model or has them "
                                         r"in other shapes: .*visual/proj \(64, 32\)"):
        _init_into(["scan=True"], run[0])  # embed_dim 32 here, 48 there


def test_a_resnet_run_cannot_go_to_hugging_face(tmp_path):
    from clipjax.models import variants
    w = weights.Weights({}, "RN-tiny", variants.get_config("RN-tiny"), "a run")
    with pytest.raises(ValueError, match="ResNet image tower, which Hugging Face's CLIPModel "
                                         "does not have; write it --to openclip"):
        weights.write(w, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_clipjax_eval_reads_the_workdir_training_left(run, tmp_path, monkeypatch, capsys):
    """What `train` leaves, `eval` reads: the same held-out images give the same top-1."""
    workdir, metrics, _ = run
    monkeypatch.chdir(workdir.parent)
    cli.main(["eval", "zeroshot", "--checkpoint", workdir.name, "--dataset", "synthetic:32",
              "--out", str(tmp_path / "z.json"), "--no-plots"])
    out = capsys.readouterr().out
    assert f"top-1          {100 * metrics['zeroshot/top1']:.2f}%" in out
    assert "ViT-tiny (embed_dim=48)" in out
