"""What survives a restart: each device's personal state (memory or disk) and the server's checkpoint.

Personal state (`personal_state` in the config):
- `memory`: Flower's `context.state`. It persists across rounds, in simulation and on a SuperNode, but is lost when
  a SuperNode restarts and cannot be resumed.
- `disk`: one folder per device, one file per version (`round-000012.npz`, the round it was written in), written
  atomically (a temporary file, fsync, rename), so a killed process leaves the previous version intact. Each file
  holds the SHA-256 of its arrays: a truncated or altered version is detected on load, logged, renamed to
  `*.corrupt`, and the device reads its previous good version instead (or, with none, starts from the initial
  model, logged as an error). A device reads the newest version written before the round it works on. Versions
  newer than the server's last checkpoint are kept, with the newest one at or before it (so a run resumed from that
  checkpoint finds each device's personal model as it was then) and the one before the newest (the fallback);
  everything older is deleted.

Server checkpoint (`checkpoint_every`): the global model, the round, the per-round metrics so far, the last
evaluation and the state of a stateful aggregator, in `checkpoint.npz` in the run's folder, written atomically.
Devices are sampled from (seed, round) alone, so the round is the whole state of the sampler.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log

PERSONAL_KEY = "ditto.personal"
LAM_COUNTS_KEY = "ditto.lam_counts"  # lam auto: how often each grid value was chosen
META_KEY = "ditto.meta"
_VERSION = re.compile(r"^round-(\d+)\.npz$")


@dataclass
class DeviceState:
    """A device's personal model, the round it was last updated in, (lam auto) its lam choice counts, and every
    round it trained in (its lineage: a device that restarted and continued shows its rounds before the restart)."""

    round: int
    personal: list[np.ndarray]
    lam_counts: np.ndarray | None = None
    trained_rounds: tuple[int, ...] = ()


class PersonalStore(Protocol):
    def load(self, upto: int) -> DeviceState | None:
        """The newest state written at a round <= `upto` (None: the device never trained)."""

    def save(self, state: DeviceState, checkpoint_round: int | None = None) -> None:
        """Keep `state`; `checkpoint_round` is the server's last checkpoint (None: the run keeps none)."""


class MemoryStore:
    """Personal state in Flower's per-node `context.state` (a RecordDict)."""

    def __init__(self, record: RecordDict) -> None:
        self.record = record

    def load(self, upto: int) -> DeviceState | None:
        if PERSONAL_KEY not in self.record:
            return None
        counts = self.record[LAM_COUNTS_KEY].to_numpy_ndarrays()[0] if LAM_COUNTS_KEY in self.record else None
        meta = self.record[META_KEY]
        return DeviceState(
            int(meta["round"]),
            self.record[PERSONAL_KEY].to_numpy_ndarrays(),
            counts,
            tuple(int(r) for r in meta["trained_rounds"]),
        )

    def save(self, state: DeviceState, checkpoint_round: int | None = None) -> None:
        self.record[PERSONAL_KEY] = ArrayRecord(numpy_ndarrays=state.personal)
        self.record[META_KEY] = ConfigRecord({"round": state.round, "trained_rounds": list(state.trained_rounds)})
        if state.lam_counts is not None:
            self.record[LAM_COUNTS_KEY] = ArrayRecord(numpy_ndarrays=[state.lam_counts])
        elif LAM_COUNTS_KEY in self.record:
            del self.record[LAM_COUNTS_KEY]


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to `path` through a temporary file in the same folder, fsync'ed, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class DiskStore:
    """Personal state as versioned files in `directory` (one device's folder)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def versions(self) -> list[int]:
        """The rounds of the stored versions, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _path(self, round_: int) -> Path:
        return self.directory / f"round-{round_:06d}.npz"

    def load(self, upto: int) -> DeviceState | None:
        for version in reversed([v for v in self.versions() if v <= upto]):
            path = self._path(version)
            try:
                state = _read_version(path, version)
            except CorruptVersion as err:
                path.rename(path.with_name(path.name + ".corrupt"))
                log(
                    WARNING,
                    "%s is corrupted (%s): set aside as %s.corrupt; falling back to the version before it",
                    path,
                    err,
                    path.name,
                )
                continue
            return state
        if any(p.name.endswith(".corrupt") for p in self.directory.glob("round-*")):
            log(
                ERROR,
                "no good personal model is left in %s: the device starts again from the initial model",
                self.directory,
            )
        return None

    def save(self, state: DeviceState, checkpoint_round: int | None = None) -> None:
        arrays = {f"p{i}": a for i, a in enumerate(state.personal)}
        arrays["num_arrays"] = np.array(len(state.personal))
        arrays["trained_rounds"] = np.array(state.trained_rounds, dtype=np.int64)
        if state.lam_counts is not None:
            arrays["lam_counts"] = state.lam_counts
        arrays[CHECKSUM_KEY] = np.array(checksum(arrays))
        atomic_savez(self._path(state.round), arrays)
        for old in self._obsolete(self.versions(), state.round, checkpoint_round):
            self._path(old).unlink(missing_ok=True)

    @staticmethod
    def _obsolete(versions: list[int], current: int, checkpoint_round: int | None) -> list[int]:
        """Versions to delete after writing `current`: those after it (left by a run that was stopped and resumed
        from an earlier checkpoint) and those older than both the version before `current` (the fallback should
        `current` be corrupted) and what a resume from `checkpoint_round` needs."""
        previous = max([v for v in versions if v < current], default=current)
        anchor = (
            previous
            if checkpoint_round is None
            else min(previous, max([v for v in versions if v <= checkpoint_round], default=current))
        )
        return [v for v in versions if v > current or v < anchor]


CHECKSUM_KEY = "sha256"


class CorruptVersion(Exception):
    """A stored version that cannot be read back as it was written."""


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes (in name order), the checksum key left out."""
    digest = hashlib.sha256()
    for name in sorted(k for k in arrays if k != CHECKSUM_KEY):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _read_version(path: Path, version: int) -> DeviceState:
    """The state in `path`, or CorruptVersion if it is unreadable, truncated, or not what its checksum says."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptVersion(f"unreadable: {err}") from None
    if CHECKSUM_KEY not in arrays:
        raise CorruptVersion("no checksum")
    if str(arrays[CHECKSUM_KEY]) != checksum(arrays):
        raise CorruptVersion("checksum mismatch")
    personal = [arrays[f"p{i}"] for i in range(int(arrays["num_arrays"]))]
    return DeviceState(version, personal, arrays.get("lam_counts"), tuple(int(r) for r in arrays["trained_rounds"]))


# -- server checkpoint ----------------------------------------------------------------------------------------
CHECKPOINT_NAME = "checkpoint.npz"


@dataclass
class Checkpoint:
    """A run's state after `round`: what the server needs to continue exactly where it stood."""

    round: int
    parameters: list[np.ndarray]
    meta: dict[str, Any]  # config, rounds (per-round metrics), final, clients
    aggregator_state: np.ndarray | None = None


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> Path:
    arrays = {f"g{i}": a for i, a in enumerate(checkpoint.parameters)}
    arrays["num_arrays"] = np.array(len(checkpoint.parameters))
    arrays["round"] = np.array(checkpoint.round)
    arrays["meta"] = np.array(json.dumps(checkpoint.meta))
    if checkpoint.aggregator_state is not None:
        arrays["aggregator_state"] = checkpoint.aggregator_state
    path = Path(out_dir) / CHECKPOINT_NAME
    atomic_savez(path, arrays)
    return path


def load_checkpoint(out_dir: Path) -> Checkpoint:
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"resume=true but there is no checkpoint at {path}: resume in the folder of a run "
            "that had checkpoint_every > 0, or run without resume=true to start afresh"
        )
    with np.load(path) as data:
        return Checkpoint(
            round=int(data["round"]),
            parameters=[data[f"g{i}"] for i in range(int(data["num_arrays"]))],
            meta=json.loads(str(data["meta"])),
            aggregator_state=data["aggregator_state"] if "aggregator_state" in data else None,
        )
