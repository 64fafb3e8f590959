"""Every paper recipe's `runlocal` runs its own code path (loss, bf16, scanned and
rematerialised blocks, FSDP, evaluation during training) at CPU size for 2 steps; LiT starts
from a CLIP run and keeps its image tower bit for bit; a ResNet is evaluated in eval mode."""

import contextlib
import io

import jax
import numpy as np
import pytest

from clipjax import config as config_lib, evals, train, weights

RECIPES = ["clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "clip_rn50", "siglip_vit_b16",
           "lit_vit_b16"]
EVALUATED = ("clip_vit_b32", "clip_rn50")  # the others skip the (shared) evaluation code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (config, workdir, final metrics, the encoders evaluation used)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        made = []
        make_encoders = evals.make_encoders
        mp.setattr(evals, "make_encoders", lambda model, *a, **k: made.append(
            make_encoders(model, *a, **k)) or made[-1])
        for name in RECIPES:
            overrides = ["total_steps=2"] + ([] if name in EVALUATED else ["eval.zeroshot="])
            if name == "lit_vit_b16":  # a CLIP run of the same (shrunk) architecture
                overrides.append(f"init_checkpoint={out['clip_vit_b16'][1]}")
            config = config_lib.load_config(f"{name}:runlocal", overrides)
            workdir = tmp_path_factory.mktemp(name)
            with contextlib.redirect_stdout(io.StringIO()):
                metrics = train.train_and_evaluate(config, workdir)
            out[name] = (config, workdir, metrics, made[-1])
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_runlocal_is_the_recipe_path_at_cpu_size(runs, name):
    full = config_lib.load_config(name)
    config, workdir, metrics, _ = runs[name]
    for key in ("model", "loss", "dtype", "scan", "remat"):
        assert config[key] == full[key], key
    assert config.optimizer.freeze == full.optimizer.freeze
    assert dict(config.mesh) == dict(full.mesh)  # FSDP over every device
    assert np.isfinite(metrics["loss"])
    assert ("zeroshot/top1" in metrics) == (name in EVALUATED)
    assert weights.saved_steps(workdir) == [2]


def test_lit_keeps_the_pretrained_image_tower_bit_for_bit(runs):
    clip_run, lit_run = runs["clip_vit_b16"][1], runs["lit_vit_b16"][1]
    pretrained, tuned = weights.load(clip_run).params, weights.load(lit_run).params
    for path, x in jax.tree_util.tree_leaves_with_path(pretrained["visual"]):
        np.testing.assert_array_equal(dict(jax.tree_util.tree_leaves_with_path(
            tuned["visual"]))[path], x, err_msg=jax.tree_util.keystr(path))
    # The text tower was trained from scratch: not the CLIP run's.
    assert not np.array_equal(tuned["text"]["ln_final"]["scale"],
                              pretrained["text"]["ln_final"]["scale"])


def test_a_resnet_is_evaluated_with_its_running_statistics(runs):
    """The loop used to hand its train-mode model (BatchNorm on batch statistics) to the
    evaluators: an image's embedding then depended on the other images in its batch."""
    config, workdir, _, encoders = runs["clip_rn50"]
    params = weights.fit_layout(weights.load(workdir).params, config.scan)
    size = encoders.image_size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, size, size, 3)).astype(np.float32)
    b = np.concatenate([a[:1], 3 * rng.standard_normal((7, size, size, 3))]).astype(np.float32)
    emb_a = np.asarray(encoders.encode_image(params, a))
    emb_b = np.asarray(encoders.encode_image(params, b))
    np.testing.assert_allclose(emb_a[0], emb_b[0], atol=1e-5)
