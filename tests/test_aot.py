"""`clipjax compile`: the real train step compiled ahead of time for a TPU topology."""

import math

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="TPU ahead-of-time compiles need the tpu extra (libtpu)")

from clipjax import aot, config as config_lib, train  # noqa: E402
from clipjax.models import clip  # noqa: E402

TINY = ["global_batch=64", "eval.zeroshot=''"]


@pytest.mark.parametrize("name, expected", [
    ("v5e-256", "v5e:16x16"), ("v5litepod-16", "v5e:4x4"), ("v5p-128", "v5p:4x4x4"),
    ("v4-32", "v4:2x2x4"), ("v6e-8", "v6e:2x4"), ("v5e:2x2", "v5e:2x2")])
def test_slice_names(name, expected):
    assert aot.topology_name(name) == expected


def test_unknown_slice_names_the_choices():
    with pytest.raises(ValueError, match="v5p-16"):
        aot.topology_name("v5p-12")
    with pytest.raises(ValueError, match="slice name such as"):
        aot.topology_name("tpu-big")


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def test_compile_reports_per_chip_memory_and_flops():
    """Arguments per chip are the state and batch shards; FLOPs are the model's."""
    config = config_lib.load_config("default", TINY)
    r = aot.compile_train_step(config, "v5e:2x2")
    assert (r["chips"], r["device_kind"], r["hbm_gib"], r["fits"]) == (4, "TPU v5 lite", 16, True)

    model, _, _, state, batch = aot.abstract_step(config, aot.topology_devices("v5e:2x2"))
    expected = _shard_bytes((state, batch))
    # XLA:TPU counts its padded tile layouts, so a little more than the logical bytes.
    assert expected <= r["arguments_gib"] * 2**30 <= 1.15 * expected, (r, expected)
    assert r["temporaries_gib"] > 0 and r["total_gib"] < 1
    assert r["tflops_per_step"] * 1e12 == clip.train_flops(model, 64)


def test_a_step_that_cannot_fit_is_reported_not_raised():
    """A batch far past a 16 GiB v5e chip: 'does not fit', with XLA's figure."""
    config = config_lib.load_config("default", TINY)
    size = train.build_models(config)[1].config.vision.image_size
    rows = (20 * 2**30 // (size * size * 3)) // 64 * 64 * 4  # ~20 GiB of images per chip
    config = config_lib.load_config("default", [f"global_batch={rows}", "eval.zeroshot=''"])
    r = aot.compile_train_step(config, "v5e:2x2")
    assert r["fits"] is False and r["total_gib"] > 16, r
    assert "DOES NOT FIT" in aot.format_report(r)
