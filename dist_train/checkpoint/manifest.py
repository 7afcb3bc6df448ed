"""Atomic, verifiable checkpoints and `resume: auto|never|PATH`.

Layout of one checkpoint, `checkpoints/step_00000100/`:
  model_optim/     model and optimizer through torch.distributed.checkpoint (DCP): every rank
                   writes its own shards (FSDP) or its share of the replicated tensors (DDP),
                   keyed by parameter name, so any world size and strategy can load them
  train_state.pt   scheduler, grad scaler, data position, progress, W&B id, config (rank 0)
  rng_rank{r}.pt   python / numpy / torch / CUDA RNG states of rank r
  manifest.json    format version, step, size and sha256 of every file, written last

Everything is written into `step_00000100.partial/` and renamed only when complete, so a
crash mid-save never leaves a directory that resume would pick. The manifest lets resume
detect a truncated or corrupted checkpoint and fall back to the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from dist_train.distributed import DistEnv, all_gather_objects, broadcast_object
from dist_train.errors import UserError

FORMAT_VERSION = 2  # 2: model and optimizer in DCP format (1 held them in train_state.pt)
STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
MODEL_OPTIM = "model_optim"


class CheckpointError(UserError):
    pass


def step_dir(checkpoint_root: Path, step: int) -> Path:
    return checkpoint_root / f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_durably(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def partial_dir(checkpoint_root: Path, step: int) -> Path:
    final = step_dir(checkpoint_root, step)
    return final.with_name(final.name + ".partial")


def hash_files(directory: Path, env: DistEnv, group=None) -> dict[str, dict[str, Any]]:
    """Collective over `group`: size and sha256 of every file under `directory`, for the manifest.
    Each rank hashes a share (rank 0's listing, split by size), so a sharded checkpoint is not
    read back whole by one rank."""
    shares: list[list[str]] = [[] for _ in range(env.world_size)]
    if env.is_main:
        sizes = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
        loads = [0] * env.world_size
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):  # largest first to the least loaded
            rank = loads.index(min(loads))
            shares[rank].append(name)
            loads[rank] += sizes[name]
    mine = broadcast_object(shares, group=group)[env.rank]
    hashed = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)} for name in mine}
    return dict(sorted((name, entry) for part in all_gather_objects(hashed, group) for name, entry in part.items()))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def step_of(checkpoint_dir: Path) -> int:
    """The step a checkpoint directory (step_00000042) holds."""
    return int(STEP_DIR.match(checkpoint_dir.name).group(1))


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file matches the manifest recorded at save."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this dist_train reads up to "
            f"{FORMAT_VERSION} (upgrade dist_train)"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, written by an older dist_train; this one reads "
            f"version {FORMAT_VERSION}"
        )
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its recorded checksum")


def latest_valid(checkpoint_root: Path) -> Path | None:
    """Newest checkpoint that verifies; broken ones are reported in one line each and skipped."""
    for path in reversed(list_checkpoints(checkpoint_root)):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr)
    return None


def resolve_resume(resume: str, checkpoint_root: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to clobber an existing run."""
    if resume == "auto":
        return latest_valid(checkpoint_root)
    if resume == "never":
        existing = list_checkpoints(checkpoint_root)
        if existing:
            raise CheckpointError(
                f"{checkpoint_root} already holds checkpoints (newest {existing[-1].name}) and "
                "checkpoint.resume=never; use checkpoint.resume=auto or another run.name"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
    verify(path)
    return path


def set_aside_newer(checkpoint_root: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` to step_N.abandoned[.K]; returns the new paths."""
    moved = []
    for path in list_checkpoints(checkpoint_root):
        if step_of(path) > step:
            target, k = path.with_name(path.name + ".abandoned"), 1
            while target.exists():
                target, k = path.with_name(f"{path.name}.abandoned.{k}"), k + 1
            os.replace(path, target)
            moved.append(target)
    return moved
