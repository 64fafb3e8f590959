"""Event files parse with TensorBoard's own protocol buffers (tensorboardX's copy)."""

import struct

from tensorboardX.proto import event_pb2

from clipjax import summary, tfrecord


def test_event_file_parses_as_tensorboard_events(tmp_path):
    w = summary.Writer(tmp_path)
    w.scalars(7, {"loss": 1.25, "step": 7, "zeroshot/top1": 0.5, "note": "text"})
    w.scalars(8, {"loss": 1.0})
    w.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data, events = path.read_bytes(), []
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == tfrecord.masked_crc32c(data[:8])
        record = data[12:12 + n]
        assert struct.unpack("<I", data[12 + n:16 + n])[0] == tfrecord.masked_crc32c(record)
        events.append(event_pb2.Event.FromString(record))
        data = data[16 + n:]
    assert events[0].file_version == "brain.Event:2"
    assert [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]] == [
        (7, {"loss": 1.25, "zeroshot/top1": 0.5}), (8, {"loss": 1.0})]
