"""Read TensorBoard event files back (TFRecord framing of Event protos) without TensorBoard."""

from __future__ import annotations

import glob
import os
import struct

from tensorboardX.proto.event_pb2 import Event, SessionLog


def read_scalars(directory: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file in `directory`, in file order, as TensorBoard
    reads them: a session restart at step S (a resumed run's purge_step) drops the values logged
    from S on before it."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == SessionLog.START:
                for values in out.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out
