"""Two processes x 4 CPU devices (gloo over loopback) train exactly like one process x 8."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from clipjax import config as config_lib, train

LAUNCHER = Path(__file__).resolve().parents[1] / "launch" / "local.sh"
OVERRIDES = ["total_steps=4", "optimizer.warmup_steps=1", "global_batch=16", "log_every_steps=1",
             "eval.zeroshot=", "eval.every_steps=0", "checkpoint.every_steps=0"]
TIMEOUT_S = 300  # the launcher kills every rank after this; a normal run takes well under it


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def test_two_processes_match_one_process(tmp_path):
    # The ranks inherit conftest's XLA_FLAGS; the launcher replaces only the device count.
    env = dict(os.environ, CLIPJAX=f"{sys.executable} -m clipjax.cli",
               CLIPJAX_LAUNCH_LOGS=str(tmp_path / "logs"), JAX_DEFAULT_MATMUL_PRECISION="highest")
    log = tmp_path / "launch.log"
    with log.open("wb") as out:
        # Its own session: killing the group reaches the launcher and every rank it started.
        launcher = subprocess.Popen(
            ["bash", str(LAUNCHER), "-d", "4", "-t", str(TIMEOUT_S), "2",
             "--workdir", str(tmp_path / "two"), *OVERRIDES],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            # The 1-process reference runs here, on conftest's 8 devices, while the ranks run.
            train.train_and_evaluate(config_lib.load_config("default", OVERRIDES), tmp_path / "one")
            status = launcher.wait(timeout=TIMEOUT_S + 30)
        finally:
            try:
                os.killpg(launcher.pid, signal.SIGKILL)  # no orphans, whatever happened
            except ProcessLookupError:
                pass
            launcher.wait()
    assert status == 0, (f"launch/local.sh exited {status}\n{_tail(log)}\n--- rank 1 ---\n"
                         f"{_tail(tmp_path / 'logs' / 'rank1.log')}")

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                               rtol=1e-5, atol=1e-5)
