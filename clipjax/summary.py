"""Scalar metrics as TensorBoard event files (through tensorboardX: no TensorFlow needed)."""

from pathlib import Path
from typing import Mapping


class Writer:
    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if name != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
