"""The optimizer against NumPy and torch.optim.AdamW: decay mask, schedule, clipping,
freezing, learning-rate multipliers, the logit-scale clamp and sharded use."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import clipjax
from clipjax import optim, sharding

# Hand-built trees with the real names: a ViT-like and a ResNet-like slice of CLIP, one
# leaf of each kind (compilation, which dominates these tests, grows with the leaf count).
VIT_SHAPES = {
    "logit_scale": (),
    "visual": {"class_embedding": (4,), "proj": (4, 3), "ln_post": {"bias": (4,)}},
    "text": {"token_embedding": (10, 4), "text_projection": (4, 3)},
}
VIT_DECAYED = {"visual/proj", "text/text_projection"}
RN_SHAPES = {
    "visual": {
        "conv1": {"kernel": (3, 3, 3, 4)},
        "bn1": {"scale": (4,), "bias": (4,), "mean": (4,), "var": (4,)},
        "attnpool": {"positional_embedding": (5, 4), "q_proj": {"kernel": (4, 4)}},
    },
}
BN_STATS = {"visual/bn1/mean", "visual/bn1/var"}


def _is_shape(x):
    return isinstance(x, tuple)


def make_tree(shapes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), shapes,
                        is_leaf=_is_shape)


def flat(tree) -> dict[str, np.ndarray]:
    return dict(zip(jax.tree.leaves(optim.param_paths(tree)), map(np.asarray,
                                                                   jax.tree.leaves(tree))))


def config(**overrides):
    base = dict(lr=1e-2, warmup_steps=2, total_steps=6, end_lr_ratio=0.1, weight_decay=0.2,
                grad_clip_norm=None)
    return {**base, **overrides}


def run(opt, params, grads_seq):
    """Params, state and updates after applying each gradient in turn (one compiled step)."""
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: _step(opt, p, s, g))
    for grads in grads_seq:
        params, state, updates = step(params, state, grads)
    return params, state, updates


def _step(opt, params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optim.apply_updates(params, updates), state, updates


def np_schedule(k, lr=1e-2, warmup=2, total=6, end_ratio=0.1):
    if k < warmup:
        return lr * k / warmup
    end = lr * end_ratio
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * min(k - warmup, total - warmup)
                                                   / (total - warmup)))


@pytest.fixture(scope="module")
def real_trees():
    return {name: clipjax.abstract_params(clipjax.create_model(name))
            for name in ("ViT-tiny", "RN-tiny")}


def test_adamw_steps_equal_numpy():
    b1, b2, eps, wd = 0.9, 0.95, 0.1, 0.2  # a large eps: sqrt(v) + eps, not sqrt(v + eps)
    params = make_tree(VIT_SHAPES)
    grads_seq = [make_tree(VIT_SHAPES, seed=s) for s in range(1, 5)]
    opt = optim.create_optimizer(config(b1=b1, b2=b2, eps=eps), params)
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: _step(opt, p, s, g))
    p_ref = {k: v.astype(np.float64) for k, v in flat(params).items()}
    m = {k: 0.0 for k in p_ref}
    v = {k: 0.0 for k in p_ref}
    for t, grads in enumerate(grads_seq, start=1):
        params, state, _ = step(params, state, grads)
        lr = np_schedule(t - 1)
        for k, g in flat(grads).items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            decay = wd * p_ref[k] if k in VIT_DECAYED else 0.0
            p_ref[k] = p_ref[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
        p_ref["logit_scale"] = np.clip(p_ref["logit_scale"], 0, math.log(100))
        for k, x in flat(params).items():
            np.testing.assert_allclose(x, p_ref[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} step {t}")


def test_matches_torch_adamw_with_clipping_freezing_and_multipliers():
    cfg = config(grad_clip_norm=1.0, freeze=["^visual/ln_post/"],
                 lr_multipliers={"^visual/": 0.5})
    params = make_tree(VIT_SHAPES)
    params["logit_scale"] = np.float32(4.6)  # clamped at log(100) = 4.605 in the first steps
    grads_seq = [make_tree(VIT_SHAPES, seed=s, scale=3.0) for s in range(1, 6)]
    for g in grads_seq:
        g["logit_scale"] = np.float32(-1.0)
    opt = optim.create_optimizer(cfg, params, arch="ViT-B-32")
    state = opt.init(params)
    jax_step = jax.jit(lambda p, s, g: _step(opt, p, s, g))

    tparams = {k: torch.tensor(x, requires_grad=True) for k, x in flat(params).items()}
    trainable = {k: p for k, p in tparams.items() if not k.startswith("visual/ln_post/")}
    groups = {}
    for k, p in trainable.items():
        key = (k in VIT_DECAYED, 0.5 if k.startswith("visual/") else 1.0)
        groups.setdefault(key, []).append(p)
    topt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.2 if decay else 0.0, "mult": mult}
         for (decay, mult), ps in groups.items()], lr=0.0, betas=(0.9, 0.98), eps=1e-6)
    for step, grads in enumerate(grads_seq):
        params, state, _ = jax_step(params, state, grads)
        for k, g in flat(grads).items():
            tparams[k].grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        for group in topt.param_groups:
            group["lr"] = np_schedule(step) * group["mult"]
        topt.step()
        with torch.no_grad():
            tparams["logit_scale"].clamp_(0, math.log(100))
        for k, x in flat(params).items():
            np.testing.assert_allclose(x, tparams[k].detach().numpy(), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{k} step {step}")
    assert float(params["logit_scale"]) == pytest.approx(math.log(100), abs=1e-6)


def test_weight_decay_mask_on_real_trees(real_trees):
    decayed = {name: {p for p, d in zip(jax.tree.leaves(optim.param_paths(tree)),
                                        jax.tree.leaves(optim.weight_decay_mask(tree))) if d}
               for name, tree in real_trees.items()}
    blocks = lambda tower: {f"{tower}/transformer/resblocks_{i}/{n}"  # noqa: E731
                            for i in range(2) for n in ("attn/in_proj_kernel",
                                                        "attn/out_proj_kernel",
                                                        "mlp/c_fc/kernel", "mlp/c_proj/kernel")}
    text = blocks("text") | {"text/text_projection"}
    assert decayed["ViT-tiny"] == text | blocks("visual") | {"visual/conv1_kernel", "visual/proj"}
    convs = {f"visual/conv{i}/kernel" for i in (1, 2, 3)} | {
        f"visual/layer{s}_0/{c}/kernel" for s in range(1, 5)
        for c in ("conv1", "conv2", "conv3", "downsample_0")}
    pool = {f"visual/attnpool/{n}_proj/kernel" for n in "qkvc"}
    assert decayed["RN-tiny"] == text | convs | pool
    # BatchNorm statistics are never trained; everything else is by default.
    frozen = {k for k, keep in flat(optim.trainable_mask(real_trees["RN-tiny"])).items()
              if not keep}
    assert len(frozen) == 2 * 19 and all(k.endswith(("/mean", "/var")) for k in frozen)
    assert {"visual/bn1/mean", "visual/layer1_0/downsample_1/var"} <= frozen


def test_weight_decay_mask_on_scanned_blocks():
    # Scanning stacks a layer axis: LayerNorm gains become 2-D and still get no decay.
    tree = {"resblocks": {"ln_1": {"scale": (2, 8), "bias": (2, 8)},
                          "attn": {"in_proj_bias": (2, 3, 2, 4)},
                          "mlp": {"c_fc": {"kernel": (2, 8, 32)}}}}
    tree = make_tree(tree)
    assert flat(optim.weight_decay_mask(tree)) == {
        "resblocks/ln_1/scale": False, "resblocks/ln_1/bias": False,
        "resblocks/attn/in_proj_bias": False, "resblocks/mlp/c_fc/kernel": True}


def test_schedule_warmup_then_cosine():
    cfg = dict(lr=5e-4, warmup_steps=100, total_steps=1100, end_lr_ratio=0.1)
    expect = {0: 0.0, 50: 2.5e-4, 100: 5e-4, 600: 5e-5 + 4.5e-4 * 0.5, 1100: 5e-5, 2000: 5e-5}
    got = jax.jit(jax.vmap(optim.lr_schedule(cfg)))(np.array(list(expect)))
    np.testing.assert_allclose(got, list(expect.values()), rtol=1e-5, atol=1e-12)


def test_multistep_schedule_is_glips():
    # maskrcnn_benchmark's WarmupMultiStepLR with milestones at 0.67 and 0.89 of training
    # (warmup here from 0, the other schedules' convention).
    cfg = dict(lr=1e-4, warmup_steps=20, total_steps=100, schedule="steps", steps_at=(0.67, 0.89))
    expect = {0: 0.0, 10: 5e-5, 20: 1e-4, 66: 1e-4, 67: 1e-5, 88: 1e-5, 89: 1e-6, 100: 1e-6}
    got = jax.jit(jax.vmap(optim.lr_schedule(cfg)))(np.array(list(expect)))
    np.testing.assert_allclose(got, list(expect.values()), rtol=1e-5, atol=1e-14)
    with pytest.raises(ValueError, match="steps_at"):
        optim.lr_schedule(dict(cfg, steps_at=(67,)))


def test_clipping_measures_only_trainable_gradients():
    params = make_tree(VIT_SHAPES)
    grads = jax.tree.map(np.zeros_like, params)
    grads["visual"]["proj"] = np.full((4, 3), 10 / math.sqrt(12), np.float32)  # norm 10
    grads["text"]["token_embedding"] = np.full((10, 4), 1e3, np.float32)  # frozen below
    opt = optim.create_optimizer(config(grad_clip_norm=1.0, freeze=["^text/"]), params)
    _, state, _ = run(opt, params, [grads])
    mu = flat(optax.tree.get(state, "mu"))
    # The first moment is (1 - b1) times the clipped gradient.
    np.testing.assert_allclose(mu["visual/proj"], 0.1 * grads["visual"]["proj"] / 10, rtol=1e-6)
    clipped_norm = math.sqrt(sum(float(np.sum(x**2)) for x in mu.values())) / 0.1
    assert clipped_norm == pytest.approx(1.0, rel=1e-6)


def test_frozen_leaves_are_unchanged_and_hold_no_state():
    params = make_tree(VIT_SHAPES)
    grads_seq = [make_tree(VIT_SHAPES, seed=s) for s in range(1, 4)]
    opt = optim.create_optimizer(config(freeze=["^visual/"]), params)  # LiT
    new, state, _ = run(opt, params, grads_seq)
    before, after = flat(params), flat(new)
    for k in before:
        if k.startswith("visual/"):
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        else:
            assert not np.array_equal(after[k], before[k]), k
    for name in ("mu", "nu"):  # frozen leaves have a MaskedNode in place of moments
        assert set(flat(optax.tree.get(state, name))) == {k for k in before
                                                          if not k.startswith("visual/")}


def test_lr_multiplier_scales_the_update():
    params = make_tree(VIT_SHAPES)
    grads = [make_tree(VIT_SHAPES, seed=1)]
    cfg = config(warmup_steps=0)  # the first step runs at the peak lr
    _, _, base = run(optim.create_optimizer(cfg, params), params, grads)
    rules = [("^visual/proj", 1.0), ("^visual/", 0.1)]  # first match wins
    _, _, scaled = run(optim.create_optimizer({**cfg, "lr_multipliers": rules}, params),
                       params, grads)
    base, scaled = flat(base), flat(scaled)
    for k in base:
        factor = 0.1 if k.startswith("visual/") and k != "visual/proj" else 1.0
        np.testing.assert_allclose(scaled[k], factor * base[k], rtol=1e-6, err_msg=k)
    assert np.abs(base["visual/ln_post/bias"]).min() > 0.5e-2  # Adam's first step: ~lr * sign


def test_lr_multipliers_in_a_config_dict_must_not_overlap():
    params = make_tree(VIT_SHAPES)
    cfg = ml_collections.ConfigDict(config())
    cfg.lr_multipliers = {"^visual/": 0.1, "^text/": 0.5}
    optim.create_optimizer(cfg, params)  # disjoint keys: order does not matter
    cfg.lr_multipliers = {"^visual/proj": 1.0, "^visual/": 0.1}
    with pytest.raises(ValueError, match="ConfigDict does not keep key order"):
        optim.create_optimizer(cfg, params)


def test_logit_scale_clamp():
    params = {"logit_scale": jnp.float32(5.0), "visual": {"proj": jnp.full((2, 2), 9.0)}}
    out = optim.clamp_logit_scale(params)
    assert float(out["logit_scale"]) == pytest.approx(math.log(100))
    np.testing.assert_array_equal(out["visual"]["proj"], params["visual"]["proj"])
    assert float(optim.clamp_logit_scale({"logit_scale": jnp.float32(2.0)})["logit_scale"]) == 2.0
    assert float(optim.clamp_logit_scale({"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0


def test_batchnorm_statistics_are_untouched():
    params = make_tree(RN_SHAPES)
    params["visual"]["bn1"]["var"] = np.abs(params["visual"]["bn1"]["var"])
    grads_seq = [make_tree(RN_SHAPES, seed=s) for s in range(1, 4)]  # even if they had gradients
    opt = optim.create_optimizer(config(), params)
    new, state, _ = run(opt, params, grads_seq)
    before, after, decay = flat(params), flat(new), flat(optim.weight_decay_mask(params))
    for k in before:
        assert np.array_equal(after[k], before[k]) == (k in BN_STATS), k
    assert {k for k, d in decay.items() if d} == {"visual/conv1/kernel",
                                                   "visual/attnpool/q_proj/kernel"}
    assert set(flat(optax.tree.get(state, "mu"))) == set(before) - BN_STATS


def test_adam_defaults_follow_the_architecture():
    assert optim.defaults_for("ViT-B-32") == (0.9, 0.98, 1e-6)
    assert optim.defaults_for("RN50-quickgelu") == (0.9, 0.999, 1e-8)
    # A first Adam step is g / (|g| + eps): with |g| = 1e-6 it tells eps 1e-6 from 1e-8.
    params = {"visual": {"attnpool": {"q_proj": {"kernel": np.ones((2, 2), np.float32)}}}}
    grads = [jax.tree.map(lambda x: np.full_like(x, 1e-6), params)]
    cfg = config(warmup_steps=0, weight_decay=0.0, lr=1.0)
    for arch, expect in ((None, 1e-6 / (1e-6 + 1e-8)), ("ViT-B-16", 0.5)):
        _, _, updates = run(optim.create_optimizer(cfg, params, arch=arch), params, grads)
        assert float(updates["visual"]["attnpool"]["q_proj"]["kernel"][0, 0]) == pytest.approx(
            -expect, rel=1e-5), arch


def test_errors_name_the_problem():
    params = make_tree(VIT_SHAPES)
    with pytest.raises(ValueError, match=r"freeze pattern 'visual/\(' is not a valid regular"):
        optim.create_optimizer(config(freeze=["visual/("]), params)
    with pytest.raises(ValueError, match=r"lr_multipliers pattern '\[' is not a valid"):
        optim.create_optimizer(config(lr_multipliers={"[": 0.1}), params)
    with pytest.raises(ValueError, match=r"freeze pattern '\^vision/' matches no parameter; "
                                         r"paths look like 'logit_scale', "):
        optim.create_optimizer(config(freeze=["^vision/"]), params)
    with pytest.raises(ValueError, match=r"lr_multipliers pattern 'ln_pre' matches no"):
        optim.create_optimizer(config(lr_multipliers={"ln_pre": 0.1}), params)
    with pytest.raises(ValueError, match="Unknown optimizer config field.*learning_rate.*the "
                                         "fields are lr, warmup_steps"):
        optim.create_optimizer({**config(), "learning_rate": 1e-3}, params)
    with pytest.raises(ValueError, match="needs total_steps"):
        optim.create_optimizer(dict(lr=1e-3), params)
    with pytest.raises(ValueError, match="warmup_steps=10 must be >= 0 and below total_steps=6"):
        optim.create_optimizer(config(warmup_steps=10), params)


def test_moments_follow_the_parameter_shardings_of_a_real_tree(real_trees):
    abstract = real_trees["ViT-tiny"]
    mesh = sharding.create_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.param_shardings(clipjax.create_model("ViT-tiny"), mesh)
    opt = optim.create_optimizer(config(freeze=["^visual/"]), abstract, arch="ViT-tiny")
    state_sh = sharding.optimizer_shardings(opt, abstract, shardings, mesh)
    expect = {k: s for k, s in flat_shardings(shardings).items() if k.startswith("text/")}
    expect["logit_scale"] = shardings["logit_scale"]
    for name in ("mu", "nu"):
        assert flat_shardings(optax.tree.get(state_sh, name)) == expect


def flat_shardings(tree) -> dict:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    return dict(zip(jax.tree.leaves(optim.param_paths(tree)), leaves))


def test_sharded_step_equals_unsharded():
    mesh = sharding.create_mesh(data=2, fsdp=2, tensor=2)
    specs = {"logit_scale": P(), "visual": {"proj": P("fsdp", "tensor"), "ln_post": {"bias": P(
        "fsdp")}}, "text": {"token_embedding": P("tensor", "fsdp")}}
    shapes = {"logit_scale": (), "visual": {"proj": (8, 4), "ln_post": {"bias": (8,)}},
              "text": {"token_embedding": (12, 8)}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))
    host, grads = make_tree(shapes), make_tree(shapes, seed=1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    opt = optim.create_optimizer(config(freeze=["^visual/ln_post/"], warmup_steps=0), abstract)
    state_sh = sharding.optimizer_shardings(opt, abstract, shardings, mesh)
    params = jax.device_put(host, shardings)
    state = sharding.init_sharded(lambda _: opt.init(params), jax.random.key(0), state_sh)
    mu = flat(optax.tree.get(state, "mu"))
    assert set(mu) == {"logit_scale", "visual/proj", "text/token_embedding"}
    assert optax.tree.get(state, "mu")["visual"]["proj"].sharding.spec == P("fsdp", "tensor")

    step = jax.jit(lambda p, s, g: _step(opt, p, s, g),
                   in_shardings=(shardings, state_sh, shardings),
                   out_shardings=(shardings, state_sh, shardings), donate_argnums=(0, 1))
    new, _, _ = step(params, state, jax.device_put(grads, shardings))
    ref, _, _ = run(opt, host, [grads])
    assert new["visual"]["proj"].sharding.spec == P("fsdp", "tensor")
    for k, a in flat(new).items():
        np.testing.assert_allclose(a, flat(ref)[k], rtol=1e-6, atol=1e-7, err_msg=k)
    frozen = host["visual"]["ln_post"]["bias"]
    np.testing.assert_array_equal(new["visual"]["ln_post"]["bias"], frozen)
