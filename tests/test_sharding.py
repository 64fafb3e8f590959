"""Mesh construction, the rule table, sharded init and batch sharding on 8 simulated devices."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import clipjax
from clipjax import sharding


def test_mesh_fills_one_axis_and_uses_auto_axes():
    mesh = sharding.create_mesh(data=2, fsdp=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sharding.batch_size(mesh) == 8
    assert dict(sharding.mesh_from_config({"data": -1, "fsdp": 2, "tensor": 2}).shape) == {
        "data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("sizes, message", [
    ((3, -1, 1), "cannot be split"),
    ((2, 2, 1), "needs 4 devices but 8"),
    ((-1, -1, 1), "at most one -1"),
])
def test_bad_mesh_sizes_are_one_clear_error(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.create_mesh(*sizes)


def test_spec_for_replicates_what_does_not_divide_and_uses_an_axis_once():
    mesh = sharding.create_mesh(data=2, fsdp=4)
    assert sharding.spec_for(("embed", "joint"), (64, 32), mesh) == P("fsdp", "tensor")
    assert sharding.spec_for(("embed",), (6,), mesh) == P(None)  # 6 % 4 != 0
    assert sharding.spec_for(("embed", "conv_in"), (8, 8), mesh) == P("fsdp", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.spec_for(("nonsense",), (8,), mesh)


@pytest.fixture(scope="module")
def sharded():
    mesh = sharding.create_mesh(data=2, fsdp=4)
    model = clipjax.create_model("ViT-tiny")
    params = sharding.init_params(model, jax.random.key(0), mesh)
    return mesh, model, params


def test_params_are_created_sharded_on_a_2x4_mesh(sharded):
    mesh, model, params = sharded
    specs = {jax.tree_util.keystr(k): v.sharding.spec
             for k, v in jax.tree_util.tree_leaves_with_path(params)}
    expect = {
        "['visual']['conv1_kernel']": P(None, None, None, "fsdp"),  # out = width
        "['visual']['class_embedding']": P("fsdp"),
        "['visual']['positional_embedding']": P(None, "fsdp"),
        "['visual']['proj']": P("fsdp", "tensor"),
        "['visual']['transformer']['resblocks_0']['attn']['in_proj_kernel']":
            P("fsdp", None, "tensor", None),
        "['visual']['transformer']['resblocks_0']['mlp']['c_fc']['kernel']": P("fsdp", "tensor"),
        "['visual']['transformer']['resblocks_0']['mlp']['c_proj']['kernel']":
            P("tensor", "fsdp"),
        "['text']['token_embedding']": P("tensor", "fsdp"),
        "['logit_scale']": P(),
    }
    for name, spec in expect.items():
        assert specs[name] == spec, name
    # Each device holds a quarter of every matrix (fsdp=4), replicated over data=2.
    kernel = params["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 256)}
    full = sum(x.size for x in jax.tree.leaves(params))
    on_device0 = sum(s.data.size for x in jax.tree.leaves(params)
                     for s in x.addressable_shards if s.device == jax.devices()[0])
    assert on_device0 < full / 3.5


def test_sharded_init_equals_single_device_init(sharded):
    _, model, params = sharded
    ref = clipjax.init_params(model, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_state_follows_the_parameters(sharded):
    mesh, model, params = sharded
    opt = optax.adamw(1e-3)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    state_sh = sharding.optimizer_shardings(opt, clipjax.abstract_params(model), shardings, mesh)
    state = sharding.init_sharded(lambda _: opt.init(params), jax.random.key(0), state_sh)
    adam = state[0]
    for p, mu, nu in zip(jax.tree.leaves(params), jax.tree.leaves(adam.mu),
                         jax.tree.leaves(adam.nu)):
        assert mu.sharding.spec == nu.sharding.spec == p.sharding.spec
    assert adam.count.sharding.spec == P()


def test_shard_batch_splits_rows_over_data_and_fsdp(sharded):
    mesh, model, params = sharded
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
             "text": rng.integers(1, 400, size=(16, 16)).astype(np.int32)}
    g = sharding.shard_batch(batch, mesh)
    assert g["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert {s.data.shape for s in g["text"].addressable_shards} == {(2, 16)}
    np.testing.assert_array_equal(np.asarray(g["text"]), batch["text"])
    # The sharded forward pass equals the single-device one.
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    ref = apply(jax.device_get(params), batch["image"])
    np.testing.assert_allclose(apply(params, g["image"]), ref, atol=2e-5)
    with pytest.raises(ValueError, match="does not divide over the 8 batch shards"):
        sharding.shard_batch({"text": batch["text"][:12]}, mesh)
