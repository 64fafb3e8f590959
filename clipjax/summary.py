"""Scalar metrics as TensorBoard event files, written directly (no TensorFlow, no torch).

An event file is a TFRecord stream of `Event` protocol buffers; a scalar is
Event{wall_time, step, summary{value{tag, simple_value}}}. The few fields needed are
encoded by hand below.
"""

import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

from clipjax import tfrecord


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 2:  # length-delimited
        return key + _varint(len(payload)) + payload
    return key + payload


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
    out = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
    if file_version:
        out += _field(3, 2, file_version.encode())
    if summary:
        out += _field(5, 2, summary)
    return out


def _scalar(tag: str, value: float) -> bytes:
    return _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))


class Writer:
    """Appends scalar summaries to one event file in `logdir`."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(Path(logdir) / name, "ab")
        self._record(_event(0, file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        self._file.write(tfrecord.record(data))

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        values = b"".join(_scalar(k, float(v)) for k, v in metrics.items()
                          if k != "step" and isinstance(v, (int, float)))
        self._record(_event(step, summary=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
