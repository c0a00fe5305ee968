"""The layout of a sharded checkpoint directory: its manifest, the committed save, the stamps of its rank files.

See ``autotp.io.checkpoint`` for the layout and how a save commits; ``save_sharded``/``load_sharded`` there and
``consolidate`` (``autotp.io.consolidate``) read what this module checks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from autotp.errors import CheckpointError
from autotp.plan import Plan, load_plan

PLAN_FILE = "autotp.plan"
MANIFEST = "autotp-checkpoint.json"
FORMAT, VERSION = "autotp-sharded", 1
CONFIGS = ("config.json", "generation_config.json")
SAVE_DIR = re.compile(r"autotp-[0-9a-f]{16}")


def shard_name(rank: int, tp: int) -> str:
    """The file holding ``rank``'s local state: ``rank00001-of-00002.safetensors``."""
    return f"rank{rank:05d}-of-{tp:05d}.safetensors"


@dataclass(frozen=True)
class Saved:
    """The committed save of a checkpoint directory, as its manifest describes it (checked against the files)."""

    manifest: Path
    dir: Path  # the save's directory: "autotp-<id>" beside the manifest
    tp: int
    plan_sha256: str
    plan: Plan
    files: tuple[Path, ...]  # rank r's file is files[r]


def sync(*paths: Path) -> None:
    """Flush files (and directories, where the system allows) to the disk before the commit depends on them."""
    for p in paths:
        with contextlib.suppress(OSError):  # a directory cannot be opened on Windows
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def committed(d: Path) -> Saved:
    """The save the manifest of ``d`` commits: every file it names is there, the plan's hash checked."""
    m = d / MANIFEST
    if not m.is_file():
        if not d.is_dir():
            raise CheckpointError(f"'{d}' is not a directory: pass the directory that autotp.save_sharded wrote")
        older = (" (its autotp.plan beside rank files is the layout of an earlier autotp, which recorded no "
                 "commit)" if (d / PLAN_FILE).is_file() else "")
        raise CheckpointError(f"'{d}' has no {MANIFEST}: it is not a sharded autotp checkpoint, or its save did not "
                              f"finish{older}. Save again with autotp.save_sharded(model, dir) on every rank; a "
                              f"Hugging Face model directory loads with autotp.from_pretrained")
    try:
        raw = json.loads(m.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{m}' is not readable JSON ({e}); save again with autotp.save_sharded") from None
    raw = raw if isinstance(raw, dict) else {}
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"'{m}' is format {raw.get('format')!r} version {raw.get('version')!r}; this autotp "
                              f"reads {FORMAT!r} version {VERSION}: load it with the autotp that saved it, or save "
                              f"again with autotp.save_sharded")
    save, tp, sha, files = (raw.get(k) for k in ("save", "tp", "plan_sha256", "files"))
    ranks_files = [shard_name(r, tp) for r in range(tp)] if isinstance(tp, int) and tp > 0 else None
    if (not isinstance(save, str) or not SAVE_DIR.fullmatch(save) or ranks_files is None or isinstance(tp, bool)
            or not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha) or not isinstance(files, list)
            or not all(isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..") for f in files)
            or not {*ranks_files, PLAN_FILE, "config.json"} <= set(files)):
        raise CheckpointError(f"'{m}' is malformed (save {save!r}, tp {tp!r}, plan_sha256 {sha!r}, files "
                              f"{files!r}); it was edited by hand: restore it, or save again with autotp.save_sharded")
    sub = d / save
    gone = [f for f in files if not (sub / f).is_file()]  # the plan file among them
    if gone:
        raise CheckpointError(f"'{d}' commits save {save} (tp={tp}), but '{sub}' lacks {gone}: restore them, or "
                              f"save again with autotp.save_sharded on all {tp} ranks")
    found = hashlib.sha256((sub / PLAN_FILE).read_bytes()).hexdigest()
    if found != sha:
        raise CheckpointError(f"'{sub / PLAN_FILE}' has sha256 {found[:16]}..., the manifest '{m}' expects "
                              f"{sha[:16]}...: the plan file was changed after the save; restore it, or save again "
                              f"with autotp.save_sharded")
    return Saved(m, sub, tp, sha, load_plan(sub / PLAN_FILE), tuple(sub / f for f in ranks_files))


def check_stamps(saved: Saved) -> None:
    """Every rank file carries the committed save's id and plan hash in its metadata (else: another save's)."""
    from safetensors import SafetensorError, safe_open

    for f in saved.files:
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"'{f}' is not a readable safetensors file ({e}); save again with "
                                  f"autotp.save_sharded on all {saved.tp} ranks") from None
        for key, what, want in (("autotp_save", "save", saved.dir.name),
                                ("autotp_plan_sha256", "plan sha256", saved.plan_sha256)):
            got = meta.get(key)
            if got != want:
                raise CheckpointError(f"'{f}' carries {f'{what} {got!r}' if got else f'no {what}'} in its metadata "
                                      f"({key}), but the manifest '{saved.manifest}' expects {want!r}: the files "
                                      f"come from different saves. Put back the files of {saved.dir.name}, or save "
                                      f"again with autotp.save_sharded on all {saved.tp} ranks")

