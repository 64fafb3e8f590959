"""What a training run shows and leaves behind: the progress bar, a table per evaluation,
metrics.jsonl, TensorBoard events, loss.png and the closing summary.

Only process 0 writes or prints; every other process gets a silent RunLog.
"""

import json
import math
import time
from pathlib import Path

import tqdm

from clipjax import files, summary
from clipjax.evals import plots

METRICS_FILE = "metrics.jsonl"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def is_evaluation(name: str) -> bool:
    """Evaluator metrics are named task/metric ("zeroshot/top1"); data counts are not."""
    return "/" in name and not name.startswith("data/")


def evaluation_table(metrics: dict[str, float]) -> list[str]:
    """One line per evaluation task: `zeroshot   top1 62.80%  top5 95.12%`."""
    by_task: dict[str, list[str]] = {}
    for name, value in metrics.items():
        if is_evaluation(name):
            task, metric = name.split("/", 1)
            # Ranks (median and mean rank) are positions; everything else is a fraction.
            shown = (f"{value:.1f}" if metric.endswith(("MdR", "MnR"))
                     else f"{100 * value:.2f}%")
            by_task.setdefault(task, []).append(f"{metric} {shown}")
    width = max((len(t) for t in by_task), default=0)
    return [f"  {task:<{width}}  {'  '.join(items)}" for task, items in by_task.items()]


def truncate_jsonl(path: Path, step: int) -> None:
    """Drops logged steps after `step`, so a resumed run's log continues without repeats."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


class RunLog:
    """The run's console output and files (process 0), or nothing (other processes)."""

    def __init__(self, workdir: Path, *, start: int, steps: int, main: bool):
        self.workdir, self.start, self.steps, self.main = workdir, start, steps, main
        self.path = workdir / METRICS_FILE
        self.t0 = time.perf_counter()
        self.eval_seconds = 0.0
        self.first_step_seconds: float | None = None
        self.writer = None
        self.bar = None
        if main:
            truncate_jsonl(self.path, start)
            self.writer = summary.Writer(workdir / "tensorboard")
            if start < steps:
                self.bar = tqdm.tqdm(total=steps, initial=start, dynamic_ncols=True, unit="step")

    def say(self, line: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(line)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """A logged step: one JSON line, TensorBoard scalars, the bar's figures."""
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.writer.scalars(step, metrics)
        if self.bar is None:
            return
        shown = {"loss": f"{metrics['loss']:.4f}",
                 "samples_s": f"{metrics.get('samples_per_second', 0):.0f}"}
        if "mfu" in metrics:
            shown["mfu"] = f"{metrics['mfu']:.1%}"
        self.bar.set_postfix(shown)

    def evaluated(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        self.eval_seconds += seconds
        lines = evaluation_table(metrics)
        if lines:
            self.say(f"step {step}: evaluation ({seconds:.1f} s)")
            for line in lines:
                self.say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.main and self.path.exists():
            plots.loss_curve(self.path, self.workdir / "loss.png")

    def summary(self, *, step: int, stopped: bool, last: dict[str, float],
                files: list[str], next_command: str | None) -> str:
        """The human summary printed when the run ends."""
        wall = time.perf_counter() - self.t0
        done = step - self.start
        head = (f"Stopped after SIGTERM at step {step} of {self.steps}" if stopped
                else f"Finished step {step} of {self.steps}")
        parts = [f"{done} step{'s' if done != 1 else ''} in {_duration(wall)}"]
        if self.first_step_seconds is not None:
            parts.append(f"first step (with compilation) {_duration(self.first_step_seconds)}")
        if self.eval_seconds:
            parts.append(f"evaluation {_duration(self.eval_seconds)}")
        if "samples_per_second" in last:
            parts.append(f"{last['samples_per_second']:,.0f} samples/s")
        lines = [f"{head}: {'; '.join(parts)}."]
        final = [f"loss {last['loss']:.4f}"] if "loss" in last and math.isfinite(last["loss"]) \
            else []
        if "mfu" in last:
            final.append(f"MFU {last['mfu']:.1%}")
        lines.append("  " + ", ".join(final) if final else "")
        lines += evaluation_table(last)
        lines.append(f"  in {self.workdir}: {', '.join(files)}")
        if stopped:
            lines.append("  rerun the same command to resume from the checkpoint just saved.")
        elif next_command:
            lines.append(f"  next: {next_command}")
        return "\n".join(line for line in lines if line)


def listing(workdir: Path, steps: list[int]) -> list[str]:
    """What a workdir holds, for the summary."""
    out = []
    if (workdir / "model.safetensors").exists():
        out.append("model.safetensors (the final parameters)")
    if steps:
        out.append(f"checkpoints/ (steps {', '.join(map(str, steps))})")
    for name in (METRICS_FILE, "tensorboard/", "loss.png", "config.json"):
        if (workdir / name.rstrip("/")).exists():
            out.append(name)
    return out


def write_config(workdir: Path, config_json: str) -> None:
    """The run's full config, for export and for people (rewritten by each resumed run)."""
    files.atomic_write(workdir / "config.json", lambda tmp: Path(tmp).write_text(config_json))
