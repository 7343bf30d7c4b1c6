"""Training checkpoints: published atomically, verified before they are loaded.

A checkpoint is what transformers' Trainer writes (model or adapter weights, optimizer, scheduler,
RNG state of every process, ``trainer_state.json`` with the step that fixes the data position) plus
our ``manifest.json``: the size and sha256 of every file, written last. The folder is written under
``RUN/staging/`` and renamed to ``RUN/checkpoints/checkpoint-NNNNNNNN`` only when complete, so:

- a process killed while writing leaves a staging folder, never a checkpoint under its final name;
- a checkpoint whose files were truncated or changed afterwards fails :func:`verify_checkpoint`;
  resuming skips it (automatic choice) or refuses it (explicit choice) with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from llava_edge.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PREFIX = "checkpoint-"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    global_step: int
    manifest: dict


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, state: dict) -> dict:
    """Hash every file of ``folder`` and write ``manifest.json`` last (fsynced)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        with open(path, "rb") as f:  # what we hash must be on disk before the manifest says so
            os.fsync(f.fileno())
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": MANIFEST_FORMAT, **state, "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)
    return manifest


def verify_checkpoint(path: str | Path) -> CheckpointInfo:
    """The checkpoint if every file matches its manifest; else :class:`CheckpointError` saying why."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = int(manifest["global_step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path}: manifest format {manifest.get('format')!r}, "
                              f"expected {MANIFEST_FORMAT}")
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: {rel} has {file.stat().st_size} bytes, the manifest "
                                  f"says {entry['size']} (truncated or rewritten)")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{path}: {rel} does not match its sha256 in the manifest (corrupt)")
    return CheckpointInfo(path, step, manifest)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints of a run, newest (highest step) first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def latest_valid(run_dir: Path, warn=print) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; broken ones are named through ``warn`` and skipped."""
    for path in list_checkpoints(run_dir):
        try:
            return verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
    return None


def publish(staged: Path, run_dir: Path, state: dict, keep: int) -> Path:
    """Manifest ``staged``, rename it into ``RUN/checkpoints``, then drop checkpoints beyond ``keep``."""
    write_manifest(staged, state)
    final_dir = Path(run_dir) / "checkpoints"
    final_dir.mkdir(parents=True, exist_ok=True)
    final = final_dir / checkpoint_name(int(state["global_step"]))
    if final.exists():  # a re-run of the same step (resumed before this one): the new one wins
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_dir(final_dir)
    if keep > 0:
        for old in list_checkpoints(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final
