"""Orbax checkpoints of the train state and the data iterator, and the run's identity.

A workdir holds `run.json` (the architecture and model settings it was started with) and
`checkpoints/<step>/` with two items: `state` (the sharded TrainState) and `data` (the
iterator's JSON state). A workdir started for another model is refused, never overwritten.
"""

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

RUN_FILE = "run.json"


def check_workdir(workdir: str | os.PathLike, identity: Mapping[str, Any]) -> None:
    """Records the run's identity in a new workdir; refuses one that holds another model."""
    path = Path(workdir) / RUN_FILE
    if path.exists():
        found = json.loads(path.read_text())
        diff = {k: (found.get(k), v) for k, v in identity.items() if found.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: workdir has {a!r}, this run has {b!r}"
                             for k, (a, b) in diff.items())
            raise ValueError(f"workdir {workdir} holds a run of a different model ({what}); "
                             "use a new --workdir or the original settings.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every host of a multi-host run writes the same content; each through its own file.
    tmp = path.with_name(f"{RUN_FILE}.{jax.process_index()}.tmp")
    tmp.write_text(json.dumps(dict(identity), indent=2, sort_keys=True))
    tmp.replace(path)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's standard handler; replica-parallel saving (orbax's default) only across processes.

    Replica-parallel saving splits each replicated array among its replicas so that every
    host writes a part. In one process every part comes from the same host, and the split
    costs a compiled slice per array shape and a dispatch per piece: seconds per save.
    The types are those orbax's StandardSave accepts (ocp.checkpoint_utils
    .STANDARD_ARRAY_TYPES, numpy scalars included). Orbax's per-array metadata store is
    left out: it records typed PRNG keys, and a TrainState holds none.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=None if jax.process_count() > 1 else False)),  # None: orbax decides
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """Async, keep-N orbax checkpoints of (train state, data-iterator state)."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: Mapping[str, Any] | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  data=ocp.args.JsonSave(dict(data_state or {})))
        self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state) at `step` (default: the latest), in `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}.")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=restore_args),
            data=ocp.args.JsonRestore()))
        return out.state, out.data

    def delete(self, step: int) -> None:
        """Removes a saved step (after its pending write has finished)."""
        self.manager.wait_until_finished()
        self.manager.delete(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
