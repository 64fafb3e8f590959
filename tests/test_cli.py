"""The `clipjax` command: info figures, conversion both ways, errors that leave nothing behind."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import clipjax
from clipjax import cli, convert, files


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "clipjax.cli", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for command in ("train", "eval", "export", "embed", "search", "convert", "compile", "info"):
        assert command in out
    assert "later releases" not in out


def test_info_prints_parameter_counts_at_once(capsys):
    """Without --flops nothing is compiled: rows appear as fast as shapes are traced."""
    cli.main(["info", "ViT-B-32", "RN50"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["arch", "image", "params", "image", "params", "text", "total"]
    assert out[1].split()[:2] == ["ViT-B-32", "224"] and out[1].split()[4] == "151.28M"
    assert out[2].split()[4] == "102.01M"


def test_compile_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
    from jax._src import xla_bridge

    def missing(*args, **kwargs):  # what jax raises when libtpu is not installed
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See "
                           "https://github.com/jax-ml/jax#installation")

    monkeypatch.setattr(xla_bridge, "make_pjrt_tpu_topology", missing)
    with pytest.raises(SystemExit) as e:
        cli.main(["compile", "--topology", "v5e-4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ('clipjax compile: compiling for a TPU topology needs libtpu, which is not '
                   'installed: pip install "clipjax[tpu]".')


def test_info_counts_and_flops(capsys):
    info = cli.model_info("ViT-tiny")
    params = clipjax.init_params(clipjax.create_model("ViT-tiny"), jax.random.key(0))
    n_visual = sum(x.size for x in jax.tree.leaves(params["visual"]))
    n_text = sum(x.size for x in jax.tree.leaves(params["text"]))
    assert (info["params_image"], info["params_text"]) == (n_visual, n_text)
    assert info["params_total"] == n_visual + n_text + 1  # + logit_scale
    # The matmuls alone, counted by hand, bound XLA's count from below (2 FLOPs per MAC).
    c = clipjax.get_config("ViT-tiny")
    v = c.vision
    n = (v.image_size // v.patch_size) ** 2 + 1
    d = v.width
    per_block = 2 * n * (4 * d * d + 2 * d * v.mlp_dim) + 4 * n * n * d
    # The last block computes the class token only, over keys and values of all n.
    last = 2 * n * 2 * d * d + 2 * (2 * d * d + 2 * d * v.mlp_dim) + 4 * n * d
    patch = 2 * (n - 1) * v.patch_size**2 * 3 * d
    matmuls = (v.layers - 1) * per_block + last + patch + 2 * d * c.embed_dim
    assert matmuls / 1e9 <= info["gflops_image"] < 1.2 * matmuls / 1e9
    cli.main(["info", "ViT-tiny", "--flops"])
    assert "ViT-tiny" in capsys.readouterr().out


def test_unknown_arch_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "ViT-Z-99"])
    err = capsys.readouterr().err
    assert "Unknown architecture 'ViT-Z-99'" in err and "ViT-B-32" in err and "RN50x64" in err


def test_convert_round_trip_through_files(tmp_path):
    params = clipjax.init_params(clipjax.create_model("ViT-tiny"), jax.random.key(0))
    torch_file = tmp_path / "model.safetensors"
    files.save_torch(torch_file, convert.to_torch(params, "ViT-tiny"))
    cli.main(["convert", str(torch_file), str(tmp_path / "clipjax.safetensors")])
    arch, loaded = files.load_params(tmp_path / "clipjax.safetensors")
    assert arch == "ViT-tiny"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    cli.main(["convert", str(tmp_path / "clipjax.safetensors"), str(tmp_path / "back.safetensors")])
    back, _ = files.read_state_dict(tmp_path / "back.safetensors")
    original, _ = files.read_state_dict(torch_file)
    assert back.keys() == original.keys()
    for k in back:
        np.testing.assert_array_equal(back[k], original[k])


def test_convert_with_a_bad_checkpoint_writes_nothing(tmp_path, capsys):
    params = clipjax.init_params(clipjax.create_model("ViT-tiny"), jax.random.key(0))
    sd = convert.to_torch(params, "ViT-tiny")
    del sd["visual.proj"]
    sd["visual.extra"] = np.zeros(3, np.float32)
    sd["ln_final.bias"] = np.zeros(5, np.float32)
    bad = tmp_path / "bad.safetensors"
    files.save_torch(bad, sd)
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(bad), str(out), "--arch", "ViT-tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "visual.proj" in err and "visual.extra" in err and "ln_final.bias" in err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())
