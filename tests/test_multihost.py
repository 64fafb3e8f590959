"""Two processes x 4 CPU devices (gloo over loopback) train exactly like one process x 8, and
stop at the same step when only one of them receives SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from clipjax import config as config_lib, train, weights

LAUNCHER = Path(__file__).resolve().parents[1] / "launch" / "local.sh"
# Long enough that the signal lands mid-run; only the stop saves a checkpoint. A constant
# learning rate after warmup (end_lr_ratio=1), so that a shorter reference run has the
# same schedule.
OVERRIDES = ["total_steps=400", "optimizer.warmup_steps=1", "optimizer.end_lr_ratio=1.0",
             "global_batch=16", "log_every_steps=1", "eval.zeroshot=", "eval.every_steps=0",
             "checkpoint.every_steps=0"]
TIMEOUT_S = 300  # the launcher kills every rank after this; a normal run takes well under it


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _rank_pid(workdir: Path, rank: int) -> int | None:
    """The pid of the `clipjax train` process of `rank` for `workdir`."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(workdir).encode() in argv and b"--process-id" in argv and \
                argv[argv.index(b"--process-id") + 1] == str(rank).encode():
            return int(entry.name)
    return None


def _sigterm_rank_1_after_step_3(workdir: Path, sent: list) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    log = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            pid = _rank_pid(workdir, 1)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                sent.append(pid)
            return
        time.sleep(0.02)


def test_two_processes_match_one_process_and_stop_together_after_sigterm(tmp_path):
    # The ranks inherit conftest's XLA_FLAGS; the launcher replaces only the device count.
    env = dict(os.environ, CLIPJAX=f"{sys.executable} -m clipjax.cli",
               CLIPJAX_LAUNCH_LOGS=str(tmp_path / "logs"), JAX_DEFAULT_MATMUL_PRECISION="highest")
    log, two = tmp_path / "launch.log", tmp_path / "two"
    sent: list = []
    signaller = threading.Thread(target=_sigterm_rank_1_after_step_3, args=(two, sent))
    with log.open("wb") as out:
        # Its own session: killing the group reaches the launcher and every rank it started.
        launcher = subprocess.Popen(
            ["bash", str(LAUNCHER), "-d", "4", "-t", str(TIMEOUT_S), "2",
             "--workdir", str(two), *OVERRIDES],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            signaller.start()
            status = launcher.wait(timeout=TIMEOUT_S + 30)
            signaller.join(timeout=5)
        finally:
            try:
                os.killpg(launcher.pid, signal.SIGKILL)  # no orphans, whatever happened
            except ProcessLookupError:
                pass
            launcher.wait()
    rank1 = _tail(tmp_path / "logs" / "rank1.log")
    assert status == 0, f"launch/local.sh exited {status}\n{_tail(log)}\n--- rank 1 ---\n{rank1}"
    assert sent, "rank 1 was never found to signal"

    # Only rank 1 got the signal; both stopped after the same step and saved it together.
    got = _losses(two)
    stop = max(got)
    assert 3 <= stop < 400 and sorted(got) == list(range(1, stop + 1))
    assert f"stopped at step {stop} after SIGTERM" in rank1
    assert f"Stopped after SIGTERM at step {stop} of 400" in log.read_text()
    assert weights.saved_steps(two) == [stop]
    # The 1-process reference on conftest's 8 devices, as far as the two processes went.
    train.train_and_evaluate(config_lib.load_config("default", OVERRIDES + [f"total_steps={stop}"]),
                             tmp_path / "one")
    one = _losses(tmp_path / "one")
    np.testing.assert_allclose([got[s] for s in range(1, stop + 1)],
                               [one[s] for s in range(1, stop + 1)], rtol=1e-5, atol=1e-5)
