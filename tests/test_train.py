"""The training loop: exact resume after a kill, NaN stop, configs, workdir identity."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import checkpoint, config as config_lib, sharding, train

# A short run of the built-in default: batch 64, no evaluation, a checkpoint every 2 steps.
OVERRIDES = ["total_steps=10", "global_batch=64", "optimizer.warmup_steps=2",
             "log_every_steps=1", "checkpoint.every_steps=2", "eval.zeroshot=''",
             "eval.every_steps=0"]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"repeated or unordered steps in the log: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(config_lib.load_config("default", OVERRIDES), workdir)
    return workdir


def test_killed_run_resumes_exactly(uninterrupted, tmp_path):
    """SIGKILL a real `clipjax train` mid-run; rerunning continues the same loss curve."""
    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clipjax.cli", "train", "--workdir", str(workdir), *OVERRIDES]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    log = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 5:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: " \
                                    f"{proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = max(_losses(workdir))
    assert killed_at < 10
    ckpt = checkpoint.Checkpointer(workdir)
    resume_from = ckpt.latest_step()
    ckpt.close()
    assert resume_from is not None and resume_from <= killed_at

    train.train_and_evaluate(config_lib.load_config("default", OVERRIDES), workdir)
    expect, got = _losses(uninterrupted), _losses(workdir)
    assert sorted(got) == list(range(1, 11))
    # Same data and same values: float32 agreement to a few ulps (a resumed process may
    # compile the step separately, and XLA may order a reduction differently).
    np.testing.assert_allclose([got[s] for s in range(1, 11)],
                               [expect[s] for s in range(1, 11)], rtol=1e-6, atol=0)


def test_sigterm_saves_and_exits_cleanly(uninterrupted, tmp_path):
    workdir = tmp_path / "term"
    cmd = [sys.executable, "-m", "clipjax.cli", "train", "--workdir", str(workdir), *OVERRIDES,
           "checkpoint.every_steps=100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    log = workdir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = max(_losses(workdir))
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.latest_step() == stopped < 10  # saved where it stopped, not at a schedule
    ckpt.close()
    got, expect = _losses(workdir), _losses(uninterrupted)
    np.testing.assert_allclose([got[s] for s in got], [expect[s] for s in got], rtol=1e-6)


def _restored_params(workdir: Path, step: int | None = None) -> dict:
    from clipjax import weights
    return weights.load(workdir, step=step).params


def test_nan_guard_keeps_only_a_checkpoint_that_resumes(uninterrupted, tmp_path):
    """lr=1e30 from step 6 on: step 7's update is finite (parameters of 1e29) but step 8's
    loss is NaN. The checkpoint of step 7 must not survive: the old loop kept it as the
    "last good" one, and resuming from it reproduced the NaN."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    for later in ("8", "10"):
        shutil.rmtree(workdir / "checkpoints" / later)
    before = _restored_params(workdir, 6)
    wild = OVERRIDES + ["optimizer.lr=1e30", "optimizer.grad_clip_norm=0.0",
                        "checkpoint.every_steps=1"]
    with pytest.raises(FloatingPointError, match=r"at step 8; stopping\. The last good "
                                                  r"checkpoint \(step 6\) is intact"):
        train.train_and_evaluate(config_lib.load_config("default", wild), workdir)
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.latest_step() == 6
    ckpt.close()
    kept = dict(jax.tree_util.tree_leaves_with_path(_restored_params(workdir)))
    for path, x in jax.tree_util.tree_leaves_with_path(before):  # bit for bit, all finite
        np.testing.assert_array_equal(kept[path], x, err_msg=jax.tree_util.keystr(path))
    # What was kept resumes with the sane learning rate: the uninterrupted run's losses.
    train.train_and_evaluate(config_lib.load_config("default", OVERRIDES), workdir)
    got, expect = _losses(workdir), _losses(uninterrupted)
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in range(7, 11)], [expect[s] for s in range(7, 11)],
                               rtol=1e-6)


def test_outputs_of_a_finished_run(uninterrupted):
    assert (uninterrupted / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "samples_per_second", "i2t_accuracy", "grad_norm"} <= set(rows[-1])
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_checkpoint_round_trip_compiles_nothing_in_one_process(tmp_path, caplog):
    """Replicated and sharded arrays come back exactly, in their shardings; with one process
    the save writes each replicated array once instead of slicing it among its 8 replicas
    (a compiled slice per shape, seconds per save)."""
    mesh = sharding.create_mesh(data=4, fsdp=2)
    state = {"replicated": jax.device_put(np.arange(48.0).reshape(6, 8), NamedSharding(mesh, P())),
             "sharded": jax.device_put(np.arange(64, dtype=np.int32).reshape(8, 8),
                                       NamedSharding(mesh, P("data", "fsdp"))),
             "step": jax.device_put(np.int32(7), NamedSharding(mesh, P()))}
    ckpt = checkpoint.Checkpointer(tmp_path)
    with jax.log_compiles(), caplog.at_level("WARNING"):
        ckpt.save(7, state, {"position": 3})
        ckpt.wait()
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()], caplog.text
    with jax.log_compiles(), caplog.at_level("WARNING"):  # the check above can see a compile
        jax.jit(lambda x: x * 3 + 1)(state["replicated"])
    assert [r for r in caplog.records if "Compiling" in r.getMessage()]
    got, data = ckpt.restore(state)
    ckpt.close()
    assert data == {"position": 3}
    for key in state:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(state[key]))
        assert got[key].sharding == state[key].sharding and got[key].dtype == state[key].dtype


def test_workdir_of_another_model_is_refused(tmp_path):
    checkpoint.check_workdir(tmp_path, {"model": "ViT-tiny", "scan": False})
    with pytest.raises(ValueError, match="holds a run of a different model.*'ViT-tiny'"):
        checkpoint.check_workdir(tmp_path, {"model": "RN-tiny", "scan": False})
    checkpoint.check_workdir(tmp_path, {"model": "ViT-tiny", "scan": False})  # same: fine


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lrr=1"], "unknown config key 'optimizer.lrr'; valid keys at optimizer: b1"),
    (["global_batch=1.5"], "config key 'global_batch' takes a int"),
    (["nope.x=1"], "has no section 'nope'"),
    (["loss"], "is not key=value"),
    (["optimizer=1"], "is a section"),
    (["model_overrides.embed=64"], r"has no field 'embed'; model_overrides takes embed_dim, "
                                   r"vision.image_size, vision.layers, vision.width"),
    (["model_overrides.vision.width=1.5"], r"'model_overrides.vision.width' takes a int "
                                           r"\(ViT-tiny has 64\)"),
])
def test_bad_overrides_are_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config("default", overrides)


def test_any_architecture_field_is_settable_from_the_command_line():
    config = config_lib.load_config("default", ["model_overrides.vision.width=128",
                                                "model_overrides.text.layers=3",
                                                "model_overrides.activation=quick_gelu"])
    _, model = train.build_models(config)
    assert (model.config.vision.width, model.config.text.layers) == (128, 3)
    assert model.config.activation == "quick_gelu" and model.config.embed_dim == 32


@pytest.mark.parametrize("name", ["clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "clip_rn50",
                                  "siglip_vit_b16", "lit_vit_b16"])
def test_paper_recipes(name):
    c = config_lib.load_config(name)
    assert c.global_batch == 32768 and c.epochs == 32 and c.optimizer.warmup_steps == 2000
    assert c.optimizer.lr == (1e-3 if name.startswith(("siglip", "lit")) else 5e-4)
    with pytest.raises(ValueError, match="total_steps=0 needs epochs and data.num_examples"):
        train.total_steps(c)
    c = config_lib.load_config(name, ["data.num_examples=400000000"])
    assert train.total_steps(c) == 32 * 400000000 // 32768
