"""Conversion from and to OpenAI / OpenCLIP / Hugging Face checkpoints, against the references.

Parity models are the tiny sizes, randomly initialised and then perturbed (every weight,
bias and BatchNorm statistic), so a wrong transpose, head split or q/k/v order shows up.
"""

import copy
import functools

import jax
import numpy as np
import pytest
import torch

import clipjax
import reference
from clipjax import convert, files, weights
from clipjax.models import variants

TOL = 1e-4
SOT, EOT = 49406, 49407
ALL_ARCHS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14",
             "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"]
# Keys OpenCLIP's state dict carries that hold no parameters.
NON_PARAMS = ("attn_mask", "num_batches_tracked")


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its init (zero biases, unit LN scales) and give BN real stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return module.eval()


@functools.cache
def openclip_model(arch: str) -> torch.nn.Module:
    """OpenCLIP's CLIP with the sizes of the clipjax variant `arch` (do not mutate)."""
    oc = reference.open_clip()
    c = variants.get_config(arch)
    v, t = c.vision, c.text
    vision = dict(image_size=v.image_size, layers=list(v.layers) if v.is_resnet else v.layers,
                  width=v.width, patch_size=v.patch_size, head_width=v.head_width,
                  mlp_ratio=v.mlp_ratio)
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                heads=t.heads, layers=t.layers)
    torch.manual_seed(0)
    model = oc.model.CLIP(embed_dim=c.embed_dim, vision_cfg=vision, text_cfg=text,
                          quick_gelu=c.activation == "quick_gelu")
    return _perturb(model, seed=1)


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(NON_PARAMS)}


def inputs(arch: str, batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Images NHWC and token ids of different lengths, each SOT ... EOT then zeros."""
    c = variants.get_config(arch)
    rng = np.random.default_rng(0)
    img_BHWC = rng.standard_normal((batch, c.vision.image_size, c.vision.image_size, 3))
    tokens_BL = np.zeros((batch, c.text.context_length), np.int64)
    for i in range(batch):
        n = 3 + 3 * i
        tokens_BL[i, 0], tokens_BL[i, n] = SOT, EOT
        tokens_BL[i, 1:n] = rng.integers(1, SOT, n - 1)
    return img_BHWC.astype(np.float32), tokens_BL


@functools.cache
def _encoders(arch: str, scan: bool):
    model = clipjax.create_model(arch, scan=scan)
    return (jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image")),
            jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text")))


def max_diffs(params, arch: str, scan: bool, ref_image, ref_text) -> tuple[float, float]:
    """Max abs differences of clipjax's image and text embeddings from the reference's."""
    img_BHWC, tokens_BL = inputs(arch)
    encode_image, encode_text = _encoders(arch, scan)
    with torch.no_grad():
        want_img = ref_image(torch.from_numpy(img_BHWC).permute(0, 3, 1, 2)).numpy()
        want_txt = ref_text(torch.from_numpy(tokens_BL)).numpy()
    got_img = np.asarray(encode_image(params, img_BHWC))
    got_txt = np.asarray(encode_text(params, tokens_BL.astype(np.int32)))
    assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
    return float(np.abs(got_img - want_img).max()), float(np.abs(got_txt - want_txt).max())


def _load_torch(path, arch=None):
    """(architecture, params) of a PyTorch checkpoint, through what every command uses."""
    w = weights.load(path, arch)
    return w.arch, w.params


def assert_trees_equal(a, b):
    fa, fb = convert._flatten(a), convert._flatten(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k, strict=True)


def assert_state_dicts_equal(got, want):
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v.numpy(), err_msg=k, strict=True)


# ---------------------------------------------------------------------------------------
# OpenCLIP parity.

@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("arch", ["ViT-tiny", "RN-tiny", "ViT-tiny-quickgelu"])
def test_openclip_parity(arch, scan):
    ref = openclip_model(arch)
    # The activation is not in the weights: the base name converts, the full name builds.
    params = convert.from_torch(ref.state_dict(), arch.removesuffix("-quickgelu"), scan=scan)
    d_img, d_txt = max_diffs(params, arch, scan, ref.encode_image, ref.encode_text)
    assert d_img < TOL and d_txt < TOL, f"{arch} scan={scan}: image {d_img:.2e}, text {d_txt:.2e}"


def test_quickgelu_matters():
    """The QuickGELU test above would pass vacuously if the activation changed nothing."""
    ref = openclip_model("ViT-tiny-quickgelu")
    params = convert.from_torch(ref.state_dict(), "ViT-tiny")
    d_img, d_txt = max_diffs(params, "ViT-tiny", False, ref.encode_image, ref.encode_text)
    assert d_img > 10 * TOL and d_txt > 10 * TOL, (d_img, d_txt)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_torch_shapes_match_openclip(arch):
    oc = reference.open_clip()
    with torch.device("meta"):  # allocates nothing, even for ViT-bigG-14
        ref = oc.model.CLIP(**oc.factory.get_model_config(arch))
    want = {k: tuple(v.shape) for k, v in state_dict(ref).items()}
    got = convert.torch_shapes(arch)
    assert got == want, sorted(set(got.items()) ^ set(want.items()))[:10]


# ---------------------------------------------------------------------------------------
# Hugging Face.

HF_ARCH = "ViT-tiny-quickgelu"


@pytest.fixture(scope="module")
def hf_model():
    CLIPModel, CLIPConfig = reference.hf_clip()
    c = variants.get_config(HF_ARCH)
    v, t = c.vision, c.text
    config = CLIPConfig(
        text_config=dict(hidden_size=t.width, num_attention_heads=t.heads,
                         num_hidden_layers=t.layers, intermediate_size=4 * t.width,
                         max_position_embeddings=t.context_length, vocab_size=t.vocab_size,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=v.width, num_attention_heads=v.heads,
                           num_hidden_layers=v.layers, intermediate_size=v.mlp_dim,
                           patch_size=v.patch_size, image_size=v.image_size,
                           hidden_act="quick_gelu"),
        projection_dim=c.embed_dim)
    torch.manual_seed(0)
    return _perturb(CLIPModel(config), seed=2)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected feature.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_parity(hf_model):
    params = convert.from_torch(hf_model.state_dict(), HF_ARCH)
    d_img, d_txt = max_diffs(
        params, HF_ARCH, False,
        lambda x: _pooled(hf_model.get_image_features(pixel_values=x)),
        lambda x: _pooled(hf_model.get_text_features(input_ids=x)))
    assert d_img < TOL and d_txt < TOL, f"HF {HF_ARCH}: image {d_img:.2e}, text {d_txt:.2e}"


def test_hf_folder_loads_with_its_activation(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)  # model.safetensors + config.json naming quick_gelu
    assert (tmp_path / "model.safetensors").exists()
    arch, params = _load_torch(tmp_path)
    assert arch == HF_ARCH
    assert_trees_equal(params, convert.from_torch(hf_model.state_dict(), HF_ARCH))


def test_hf_round_trip(hf_model):
    sd = state_dict(hf_model)
    assert convert.infer_arch(sd) == "ViT-tiny"  # the weights alone do not say QuickGELU
    params = convert.from_torch(sd, HF_ARCH)
    assert_state_dicts_equal(convert.to_torch(params, HF_ARCH, layout="hf"), sd)
    assert convert.torch_shapes(HF_ARCH, layout="hf") == {k: tuple(v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------
# Round trips, inference and files.

@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("arch", ["ViT-tiny", "RN-tiny"])
def test_round_trip_is_exact(arch, scan):
    sd = state_dict(openclip_model(arch))
    assert convert.infer_arch(sd) == arch
    params = convert.from_torch(sd, arch, scan=scan)
    want = clipjax.abstract_params(clipjax.create_model(arch, scan=scan))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
    assert_state_dicts_equal(convert.to_torch(params, arch), sd)


def _openai_style(sd: dict) -> dict:
    """OpenAI's archives carry three scalar metadata entries next to the weights."""
    return {**sd, "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
            "vocab_size": torch.tensor(49408)}


def test_openai_state_dict_is_quickgelu(tmp_path):
    ref = openclip_model("ViT-tiny-quickgelu")
    sd = _openai_style(ref.state_dict())
    assert convert.infer_arch(sd) == "ViT-tiny-quickgelu"
    torch.save(sd, tmp_path / "openai.pt")
    arch, params = _load_torch(tmp_path / "openai.pt")
    assert arch == "ViT-tiny-quickgelu"
    assert_trees_equal(params, convert.from_torch(ref.state_dict(), "ViT-tiny"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                            "ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_archive(tmp_path):
    ref = copy.deepcopy(openclip_model("ViT-tiny-quickgelu"))
    del ref.context_length, ref.vocab_size  # plain attributes in OpenCLIP, buffers in OpenAI's
    for name, value in _openai_style({}).items():
        ref.register_buffer(name, value)
    img_BHWC, tokens_BL = inputs("ViT-tiny-quickgelu", batch=2)
    with torch.no_grad():
        traced = torch.jit.trace(ref, (torch.from_numpy(img_BHWC).permute(0, 3, 1, 2),
                                       torch.from_numpy(tokens_BL)), check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    arch, params = _load_torch(tmp_path / "ViT-tiny.pt")
    assert arch == "ViT-tiny-quickgelu"
    d_img, d_txt = max_diffs(params, arch, False, ref.encode_image, ref.encode_text)
    assert d_img < TOL and d_txt < TOL, f"TorchScript: image {d_img:.2e}, text {d_txt:.2e}"


def test_openclip_training_checkpoint(tmp_path):
    sd = openclip_model("RN-tiny").state_dict()
    ckpt = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    arch, params = _load_torch(tmp_path / "epoch_3.pt")
    assert arch == "RN-tiny"
    assert_trees_equal(params, convert.from_torch(sd, "RN-tiny"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_torch_files(tmp_path, suffix):
    params = convert.from_torch(state_dict(openclip_model("ViT-tiny")), "ViT-tiny")
    path = tmp_path / f"open_clip_model{suffix}"
    files.save_torch(path, convert.to_torch(params, "ViT-tiny"))
    arch, loaded = _load_torch(path)
    assert arch == "ViT-tiny"
    assert_trees_equal(loaded, params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_safetensors(tmp_path, dtype):
    """Hub checkpoints often ship in bf16 or fp16; they load as the float32 of those values."""
    from safetensors.torch import save_file
    sd = state_dict(openclip_model("ViT-tiny"))
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, tmp_path / "half.safetensors")
    arch, params = _load_torch(tmp_path / "half.safetensors")
    assert arch == "ViT-tiny"
    rounded = {k: v.to(dtype).float() for k, v in sd.items()}
    assert_trees_equal(params, convert.from_torch(rounded, "ViT-tiny"))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_openclip_hub_folder_loads_with_its_activation(tmp_path):
    sd = state_dict(openclip_model("ViT-tiny-quickgelu"))
    files.save_torch(tmp_path / "open_clip_model.safetensors",
                       {k: v.numpy() for k, v in sd.items()})
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}}')
    arch, params = _load_torch(tmp_path)
    assert arch == "ViT-tiny-quickgelu"
    assert_trees_equal(params, convert.from_torch(sd, "ViT-tiny"))


def test_params_file(tmp_path):
    params = convert.from_torch(state_dict(openclip_model("ViT-tiny")), "ViT-tiny")
    files.save_params(tmp_path / "params.safetensors", params, "ViT-tiny-quickgelu")
    arch, loaded = files.load_params(tmp_path / "params.safetensors")
    assert arch == "ViT-tiny-quickgelu"
    assert_trees_equal(loaded, params)


# ---------------------------------------------------------------------------------------
# Errors a user can act on.

def test_all_mismatches_reported_together():
    sd = dict(state_dict(openclip_model("ViT-tiny")))
    del sd["ln_final.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    sd["visual.proj"] = torch.zeros(5, 7)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_torch(sd, "ViT-tiny")
    msg = str(e.value)
    for part in ("1 missing: ln_final.bias", "1 unexpected: visual.extra.weight",
                 "1 mis-shaped: visual.proj (5, 7) (expected (64, 32))"):
        assert part in msg, msg


def test_unknown_arch_lists_valid_names(tmp_path):
    sd = state_dict(openclip_model("ViT-tiny"))
    torch.save(sd, tmp_path / "m.pt")
    for call in (lambda: convert.from_torch(sd, "ViT-Q-99"),
                 lambda: convert.torch_shapes("ViT-Q-99"),
                 lambda: _load_torch(tmp_path / "m.pt", arch="ViT-Q-99")):
        with pytest.raises(ValueError, match="ViT-Q-99") as e:
            call()
        for name in ("RN50", "ViT-B-32", "ViT-bigG-14", "quickgelu"):
            assert name in str(e.value), str(e.value)


def test_unrecognised_checkpoint_lists_valid_names():
    with pytest.raises(convert.ConversionError, match="ViT-B-32"):
        convert.infer_arch({"positional_embedding": np.zeros((5, 8)),
                            "text_projection": np.zeros((8, 4))})


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save_file)
    params = convert.from_torch(state_dict(openclip_model("ViT-tiny")), "ViT-tiny")
    with pytest.raises(OSError, match="disk full"):
        files.save_params(tmp_path / "params.safetensors", params, "ViT-tiny")
    assert list(tmp_path.iterdir()) == []


def test_load_params_rejects_other_files(tmp_path):
    files.save_torch(tmp_path / "torch.safetensors", {"w": np.zeros(3, np.float32)})
    with pytest.raises(convert.ConversionError, match="not a clipjax parameter file"):
        files.load_params(tmp_path / "torch.safetensors")
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    with pytest.raises(convert.ConversionError, match="not a readable .safetensors file"):
        files.load_params(tmp_path / "text.safetensors")


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.pt"
    for call in (_load_torch, files.load_params, files.read_state_dict):
        with pytest.raises(FileNotFoundError, match="nowhere.pt"):
            call(missing)
