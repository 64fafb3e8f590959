"""What the segmentation heads share with the loop: the GroupViT step sharded equals one
device, per-row Gumbel seeds that survive resumption, LSeg's held-out classes, and
GroupViT's prompts through the real data pipeline."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax import optim, sharding, train
from clipjax.heads import dense, get_task, groupvit, lseg
from clipjax.tokenizer import tokenize


def _groupvit_config(**extra):
    return ml_collections.ConfigDict(dict(
        model="GroupViT-tiny", dtype="float32", scan=False, remat="none", task="groupvit",
        loss="softmax", seed=0, loss_tile=4, global_batch=16,
        model_overrides=ml_collections.ConfigDict(),
        data=ml_collections.ConfigDict(dict(source="synthetic", image_size=32,
                                            context_length=16, num_workers=0)),
        head=ml_collections.ConfigDict(dict(multi_label=2, **extra))))


def _steps(cfg, mesh, accum: int, batches):
    task = get_task(cfg)
    model = task.build_models(cfg)[0]
    # Plain SGD: Adam's first step is lr x sign(gradient), which turns float noise in a
    # near-zero gradient into a full-size difference.
    opt = optim.create_optimizer(dict(name="sgd", momentum=0.0, lr=1e-2, warmup_steps=0,
                                      weight_decay=0.0, total_steps=10),
                                 train.clip.abstract_params(model))
    shardings = train.state_shardings(model, opt, mesh)
    state = train.create_train_state(model, opt, jax.random.key(0), mesh)
    keys = task.batch_keys(cfg)
    step = train.make_train_step(model, opt, mesh, shardings, batch_keys=keys, task=task,
                                 config=cfg, accum_steps=accum)
    losses = []
    for batch in batches:
        state, metrics = step(state, sharding.shard_batch({k: batch[k] for k in keys}, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


def test_groupvit_step_on_8_devices_equals_one_device():
    cfg = _groupvit_config()
    data = dense.build_data(groupvit, cfg, None)
    batches = [next(data)]
    assert set(batches[0]) == {"image", "text", "prompts", "rng"}
    loss1, params1 = _steps(cfg, sharding.create_mesh(devices=jax.devices()[:1]), 1, batches)
    loss8, params8 = _steps(cfg, sharding.create_mesh(data=4, fsdp=2), 1, batches)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params8, params1)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params1,
                         _steps(cfg, sharding.create_mesh(devices=jax.devices()[:1]), 1, [])[1])
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step did change the parameters


def test_row_seeds_are_per_row_per_batch_and_resume_exactly():
    cfg = _groupvit_config()
    it = dense.build_data(groupvit, cfg, None)
    first = next(it)
    state = it.get_state()
    second = next(it)
    assert len(set(first["rng"].tolist()) | set(second["rng"].tolist())) == 32  # all distinct
    again = dense.build_data(groupvit, cfg, state)
    resumed = next(again)
    for key in second:
        np.testing.assert_array_equal(resumed[key], second[key])


def test_held_out_classes_leave_the_label_list_and_their_pixels_are_ignored():
    cfg = ml_collections.ConfigDict(dict(
        model="ViT-tiny", dtype="float32", scan=False, remat="none", task="lseg",
        model_overrides=ml_collections.ConfigDict({"vision": {"layers": 1},
                                                   "text": {"layers": 1}}),
        data=ml_collections.ConfigDict(dict(source="synthetic", image_size=32,
                                            context_length=16)),
        head=ml_collections.ConfigDict(dict(features=8, held_out_classes=("diamond", "ring")))))
    model = lseg.build_models(cfg)[1]
    params = jax.jit(model.init)(jax.random.key(0), *model.example_inputs(1))["params"]
    params = lseg.layers.nn.meta.unbox(params)
    assert lseg.seen_classes(cfg, dense.train_classnames(cfg)) == [0, 1, 2, 3, 5]
    rng = np.random.default_rng(0)
    pix = jnp.asarray(rng.normal(size=(2, 32, 32, model.config.embed_dim)), jnp.float32)
    pix = pix / jnp.linalg.norm(pix, axis=-1, keepdims=True)
    mask = rng.integers(0, 7, (2, 32, 32)).astype(np.int32)
    loss, _ = lseg.loss(model, cfg, None)(params, pix, {"mask": jnp.asarray(mask)})
    # The reference: five labels, diamond (4) and ring (6) ignored, the rest renumbered.
    words = ["other", "circle", "square", "triangle", "cross"]
    labels = model.apply({"params": params}, jnp.asarray(tokenize(words, 16)),
                         method="label_embeddings")
    lut = np.array([0, 1, 2, 3, -1, 4, -1])
    ref, _ = lseg.cross_entropy(lseg.pixel_logits(pix, labels, (32, 32)),
                                jnp.asarray(lut[mask]))
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    cfg.head.held_out_classes = ("hexagon",)
    with pytest.raises(ValueError, match="'hexagon', which is not a class"):
        lseg.loss(model, cfg, None)


def test_groupvit_prompts_come_from_captions_through_the_pipeline(tmp_path):
    from PIL import Image

    from clipjax.data import pipeline

    rows = ["filepath,title"]
    for i, caption in enumerate(["a man riding a horse with two dogs", "a red circle"]):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'},{caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    it = pipeline.make_iterator(f"csv:{tmp_path / 'pairs.csv'}", global_batch_size=2,
                                image_size=32, train=True, seed=0, context_length=16,
                                num_workers=0, prompts=3)
    batch = next(it)
    assert batch["prompts"].shape == (2, 3, 16) and batch["prompts"].dtype == np.int32
    circle = tokenize("a red circle", 16)[0]
    row = next(i for i, t in enumerate(batch["text"]) if np.array_equal(t, circle))
    prompts_KL = batch["prompts"][row]
    # One word ("circle", the only one tagged) in an ImageNet template, then the caption.
    np.testing.assert_array_equal(prompts_KL[1], circle)
    np.testing.assert_array_equal(prompts_KL[2], circle)
    templates = groupvit.templates()
    assert any(np.array_equal(prompts_KL[0], tokenize(t.format("circle"), 16)[0])
               for t in templates)
    horse = batch["prompts"][1 - row]
    words = ("man", "riding", "horse", "dogs")  # nouns and verbs, as GroupViT keeps
    made = {tuple(tokenize(t.format(w), 16)[0]) for t in templates for w in words}
    assert all(tuple(p) in made for p in horse)
    assert len({tuple(p) for p in horse}) == 3


def test_a_pod_plan_needs_no_dataset_but_training_does(tmp_path):
    from clipjax.data import segmentation

    cfg = ml_collections.ConfigDict(dict(
        seed=0, global_batch=8, data=dict(source=f"ade20k:{tmp_path / 'none'}?split=training",
                                          image_size=32, num_workers=0),
        head=dict(base_size=64)))
    names = dense.train_classnames(cfg)  # what `clipjax compile` needs: the 150 classes
    assert names == tuple(segmentation.ADE20K_CLASSES) and len(names) == 150
    with pytest.raises(ValueError, match="does not exist"):
        dense.build_data(lseg, cfg, None)
