"""Model properties: parameter counts, causality, pooling, scan/remat/bf16 equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import convert
from clipjax.models import clip
from clipjax.models.clip import count_params

# Trainable parameters of OpenCLIP's torch models of the same names (the image tower;
# everything else: text tower + logit_scale), counted with torch on the meta device.
REFERENCE_COUNTS = {
    "RN50": (38316896, 63690241),
    "RN101": (56259936, 63428097),
    "RN50x4": (87137080, 91163521),
    "RN50x16": (167328912, 123650305),
    "RN50x64": (420380352, 202877953),
    "ViT-B-32": (87849216, 63428097),
    "ViT-B-16": (86192640, 63428097),
    "ViT-L-14": (303966208, 123650305),
    "ViT-L-14-336": (304293888, 123650305),
    "ViT-H-14": (632076800, 354032641),
    "ViT-g-14": (1012645632, 354032641),
    "ViT-bigG-14": (1844907264, 694659841),
}
# The issue's rounded figures, in millions.
ISSUE_MILLIONS = {"RN50": 102.01, "RN101": 119.69, "RN50x4": 178.30, "ViT-B-32": 151.28,
                  "ViT-B-16": 149.62, "ViT-L-14": 427.62, "ViT-H-14": 986.11}


@pytest.mark.parametrize("arch", list(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(arch):
    params = clipjax.abstract_params(clipjax.create_model(arch))  # eval_shape: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    visual, rest = REFERENCE_COUNTS[arch]
    assert count_params(params, "visual") == visual
    assert count_params(params) == visual + rest
    if arch in ISSUE_MILLIONS:
        assert round(count_params(params) / 1e6, 2) == ISSUE_MILLIONS[arch]


def _inputs(model, batch=3, seed=0):
    c = model.config
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((batch, c.vision.image_size, c.vision.image_size, 3)).astype(np.float32)
    tok = np.zeros((batch, c.text.context_length), np.int32)
    for i in range(batch):
        n = 2 + i
        tok[i, 0], tok[i, n] = 49406, 49407
        tok[i, 1:n] = rng.integers(1, 49405, n - 1)
    return img, tok


@pytest.fixture(scope="module")
def vit():
    model = clipjax.create_model("ViT-tiny")
    return model, clipjax.init_params(model, jax.random.key(0))


def test_text_is_causal(vit):
    model, params = vit
    _, tok = _inputs(model)
    changed = tok.copy()
    changed[:, 5] = 1234  # a later token must not affect earlier positions
    _, a = model.apply({"params": params}, tok, method="text_features")
    _, b = model.apply({"params": params}, changed, method="text_features")
    np.testing.assert_allclose(a["tokens"][:, :5], b["tokens"][:, :5], atol=1e-6)
    assert np.abs(np.asarray(a["tokens"][:, 5:] - b["tokens"][:, 5:])).max() > 1e-3


def test_text_pools_at_end_of_text(vit):
    model, params = vit
    _, tok = _inputs(model)
    emb, feats = model.apply({"params": params}, tok, method="text_features")
    eot = tok.argmax(-1)
    pooled = feats["tokens"][np.arange(len(tok)), eot] @ params["text"]["text_projection"]
    np.testing.assert_allclose(emb, pooled, atol=1e-5)
    padded = tok.copy()
    padded[0, eot[0] + 1:] = 7  # tokens after end-of-text cannot reach it (causal mask)
    np.testing.assert_allclose(model.apply({"params": params}, padded, method="encode_text")[0],
                               emb[0], atol=1e-5)


@pytest.mark.parametrize("scan,remat", [(False, "none"), (False, "full"), (True, "none")])
def test_pooled_last_block_equals_the_full_stack(vit, scan, remat):
    """encode_* computes only the pooled token in the last block; the features path all."""
    model, params = vit
    model = model.clone(scan=scan, remat=remat)
    if scan:
        params = convert._unflatten(convert.stack_layers(convert._flatten(params)))
    img, tok = _inputs(model)

    def embeddings(p, pooled: bool):
        if pooled:
            return (model.apply({"params": p}, img, method="encode_image"),
                    model.apply({"params": p}, tok, method="encode_text"))
        return (model.apply({"params": p}, img, method="image_features")[0],
                model.apply({"params": p}, tok, method="text_features")[0])

    def loss(p, pooled):
        i, t = embeddings(p, pooled)
        return jnp.sum(jnp.sin(i @ t.T))

    @jax.jit  # one compile for both paths and their gradients
    def both(p):
        return ([embeddings(p, pooled) for pooled in (True, False)],
                [jax.grad(loss)(p, pooled) for pooled in (True, False)])

    (ea, eb), (ga, gb) = both(params)
    for a, b in zip(ea, eb):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(gb))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * largest)


def test_vit_features_reach_the_embedding(vit):
    model, params = vit
    img, _ = _inputs(model)
    emb, feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_features"))(
        params, img)
    v = model.config.vision
    n = (v.image_size // v.patch_size) ** 2 + 1
    assert feats["blocks"].shape == (v.layers, len(img), n, v.width)
    np.testing.assert_allclose(emb, feats["tokens"][:, 0] @ params["visual"]["proj"], atol=1e-5)
    np.testing.assert_allclose(emb, model.apply({"params": params}, img, method="encode_image"),
                               atol=1e-6)


def test_normalize_and_call(vit):
    model, params = vit
    img, tok = _inputs(model)
    img_BE, txt_BE, scale, bias = model.apply({"params": params}, img, tok)
    np.testing.assert_allclose(np.linalg.norm(img_BE, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt_BE, axis=-1), 1.0, atol=1e-5)
    assert bias is None
    np.testing.assert_allclose(scale, np.log(1 / 0.07), rtol=1e-6)
    siglip = clipjax.create_model("ViT-tiny", init_logit_scale=np.log(10.0), init_logit_bias=-10.0)
    p = clipjax.init_params(siglip, jax.random.key(1))
    assert float(p["logit_bias"]) == -10.0 and np.isclose(float(np.exp(p["logit_scale"])), 10.0)


def test_resnet_features_and_batchnorm_modes():
    model = clipjax.create_model("RN-tiny")
    params = clipjax.init_params(model, jax.random.key(0))
    img, _ = _inputs(model, batch=4)
    emb, feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_features"))(
        params, img)
    w, s = model.config.vision.width, model.config.vision.image_size
    assert feats["stem"].shape == (4, s // 4, s // 4, w)
    for i in range(1, 5):
        assert feats[f"layer{i}"].shape == (4, s // 2 ** (i + 1), s // 2 ** (i + 1), w * 2 ** (i + 1))
    assert emb.shape == (4, model.config.embed_dim)
    # Training mode normalises with the batch's statistics and reports them.
    train = model.clone(train=True)
    _, state = jax.jit(lambda p, x: train.apply({"params": p}, x, method="encode_image",
                                                mutable=["batch_stats"]))(params, img)
    x = np.asarray(jax.lax.conv_general_dilated(
        img, params["visual"]["conv1"]["kernel"], (2, 2), [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    np.testing.assert_allclose(state["batch_stats"]["visual"]["bn1"]["mean"][0], x.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    # The variance reported for the running average is unbiased, as torch's BatchNorm folds it.
    np.testing.assert_allclose(state["batch_stats"]["visual"]["bn1"]["var"][0],
                               x.var((0, 1, 2), ddof=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["ViT-tiny", "RN-tiny"])
def test_scan_and_remat_match_the_plain_stack(arch):
    plain = clipjax.create_model(arch)
    params = clipjax.init_params(plain, jax.random.key(0))
    img, tok = _inputs(plain)
    scanned = clipjax.create_model(arch, scan=True, remat="full")
    stacked = convert._unflatten(convert.stack_layers(convert._flatten(params)))
    assert jax.tree.structure(stacked) == jax.tree.structure(
        clipjax.abstract_params(scanned))

    def loss(model, p):
        i, t, scale, _ = model.apply({"params": p}, img, tok)
        return jnp.sum(i @ t.T) * scale

    a, ga = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    b, gb = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    gb = convert._unflatten(convert.unstack_layers(convert._flatten(gb)))
    # Some leaves are float32 noise 1e5 times below the largest gradient (RN's attention-pool
    # key bias should be exactly 0), so their own scale alone is no yardstick.
    largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(ga))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5 * np.abs(x).max() + 1e-8 * largest)


def test_bf16_compute_keeps_float32_params_and_close_outputs(vit):
    model, params = vit
    img, tok = _inputs(model)
    low = clipjax.create_model("ViT-tiny", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(clipjax.abstract_params(low)))
    for method, x in (("encode_image", img), ("encode_text", tok)):
        ref = model.apply({"params": params}, x, method=method, normalize=True)
        out = low.apply({"params": params}, x, method=method, normalize=True)
        assert out.dtype == jnp.float32  # normalised embeddings come back in float32
        cos = np.sum(np.asarray(ref) * np.asarray(out), -1)
        assert cos.min() > 0.995, cos


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
    for arch in ("ViT-tiny", "RN-tiny"):
        model = clipjax.create_model(arch, scan=scan)
        specs = clipjax.logical_axes(model)
        shapes = clipjax.abstract_params(model)
        flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        flat_shapes = jax.tree.leaves(shapes)
        assert len(flat_specs) == len(flat_shapes)
        for spec, shape in zip(flat_specs, flat_shapes):
            assert len(spec) == len(shape.shape), (spec, shape)
            assert all(isinstance(n, str) for n in spec), spec
            # A mesh axis can shard one dimension only, so names must not repeat (the
            # kernel's two spatial dims are never sharded).
            named = [n for n in spec if n != "conv_spatial"]
            assert len(set(named)) == len(named), (spec, shape)
        if scan and arch == "ViT-tiny":
            assert ("layers", "embed", "qkv", "heads", "kv") in [tuple(s) for s in flat_specs]


def test_bad_inputs_have_clear_errors(vit):
    model, params = vit
    with pytest.raises(ValueError, match="Unknown architecture .ViT-X-99.*RN50, .*ViT-B-32"):
        clipjax.create_model("ViT-X-99")
    with pytest.raises(ValueError, match="32x32 images but got 64x64"):
        model.apply({"params": params}, np.zeros((1, 64, 64, 3), np.float32), method="encode_image")
    with pytest.raises(ValueError, match="context length is 16"):
        model.apply({"params": params}, np.zeros((1, 77), np.int32), method="encode_text")
    with pytest.raises(ValueError, match="Unknown model option.*bogus.*init_logit_bias"):
        clipjax.create_model("ViT-tiny", bogus=1)
    with pytest.raises(ValueError, match="remat policy"):
        clipjax.create_model("ViT-tiny", remat="sometimes")


def _vit_matmul_flops(model, batch: int) -> float:
    """Forward matmul FLOPs of a ViT CLIP, counted by hand from its config."""
    c, v, t = model.config, model.config.vision, model.config.text

    def tower(n, d, depth, mlp):  # qkv, scores and values, out projection, MLP
        # The last block computes one query (the pooled token) over keys and values of all n.
        last = 2 * n * 2 * d * d + 2 * (d * d + 2 * n * d + d * d + 2 * d * mlp)
        return (depth - 1) * 2 * n * (3 * d * d + 2 * n * d + d * d + 2 * d * mlp) + last

    patches = (v.image_size // v.patch_size) ** 2
    image = (2 * patches * v.patch_size**2 * 3 * v.width
             + tower(patches + 1, v.width, v.layers, v.mlp_dim) + 2 * v.width * c.embed_dim)
    text = tower(t.context_length, t.width, t.layers, 4 * t.width) + 2 * t.width * c.embed_dim
    return batch * (image + text) + 2 * batch * batch * c.embed_dim


@pytest.mark.parametrize("name", ["ViT-B-32"])
def test_train_flops_counts_every_layer(name):
    """3 x the hand count (XLA adds elementwise work); a scanned model counts the same."""
    expected = 3 * _vit_matmul_flops(clip.create_model(name), 256)
    for scan in (False, True):
        got = clip.train_flops(clip.create_model(name, scan=scan, remat="full"), 256)
        assert 1.0 <= got / expected <= 1.03, (scan, got / expected)
