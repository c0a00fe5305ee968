"""Sharded checkpoints: each rank's local state as safetensors, with the plan and the config beside them.

    save_sharded(model, dir)    every rank writes its local weights, rank 0 the plan and config; one atomic commit
    load_sharded(dir)           the same number of ranks rebuilds the model, without the original checkpoint
    consolidate(dir, out_dir)   one process (no process group) merges the shards into a standard Hugging Face
                                safetensors checkpoint that ``from_pretrained`` loads

``dir`` holds the manifest ``autotp-checkpoint.json`` (the committed save, its tp, the plan's sha256, its files)
and, in ``autotp-<id>/`` (16 hex digits, new for every save), what that save wrote: every rank's
``rank00000-of-00002.safetensors`` (its metadata: the save and the plan's sha256), ``autotp.plan``,
``config.json``, ``generation_config.json``. A save is three agreement steps (``all_ranks``), one after another:
(1) every rank checks its model and plan and takes the id rank 0 drew; (2) every rank writes its file into the
new directory, rank 0 also the plan and config; (3) rank 0 commits: it writes the manifest under a temporary
name, renames it onto ``autotp-checkpoint.json`` (``os.replace``, the one atomic step), and removes every other
``autotp-<id>/`` (older saves, what failed or killed ones left). Until that rename the previous save stays
committed and whole. Readers follow the manifest and refuse a rank file whose save id or plan hash is not the
manifest's. One save at a time per directory: a save removes the directories other saves are writing.

A tied weight is stored once, under its first state-dict name, as ``save_pretrained`` does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from autotp.capture.inputs import is_hf
from autotp.errors import CheckpointError
from autotp.io.hf_model import build_empty
from autotp.io.load import (
    INDEX,
    SINGLE,
    TIMEOUT_S,
    Read,
    Stored,
    agreed_split,
    apply_plan,
    connect,
    dtype_for,
    finish,
    match_keys,
    read_all,
    read_headers,
    tensor_names,
)
from autotp.plan import Plan, load_plan
from autotp.runtime.ranks import all_ranks, ranks
from autotp.split import SHARDING, Split

log = logging.getLogger(__name__)

PLAN_FILE = "autotp.plan"
MANIFEST = "autotp-checkpoint.json"
FORMAT, VERSION = "autotp-sharded", 1
CONFIGS = ("config.json", "generation_config.json")
SAVE_DIR = re.compile(r"autotp-[0-9a-f]{16}")
HF_WEIGHTS = re.compile(r"model\.safetensors|model-.+-of-.+\.safetensors|model\.safetensors\.index\.json")
MAX_SHARD_BYTES = 5 << 30  # consolidate writes files of at most this size (and an index when there are several)


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


# ---------------------------------------------------------------------------------------------- saving
def save_sharded(model: nn.Module, directory: str | Path, *, group: Any = None, timeout: float = TIMEOUT_S) -> None:
    """Write this rank's local weights, and on rank 0 the plan and config; call it on every rank.

    The save is committed only once every rank has written its file: one that fails or is killed leaves the
    checkpoint already in ``directory`` as it was (see the module's docstring for the layout).

    >>> autotp.save_sharded(model, "ckpt/llama-tp2")  # doctest: +SKIP
    """
    group, rank, tp = ranks(group, None)
    d = Path(directory)
    with all_ranks(group, f"saving '{d}' (preparing)", timeout, width=2) as step:
        plan = getattr(model, "_autotp_plan", None) or (Plan(1, (), type(model).__name__) if tp == 1 else None)
        if plan is None or plan.tp != tp:
            raise CheckpointError(f"{type(model).__name__} was not parallelized by autotp at tp={tp} (its plan: "
                                  f"{'none' if plan is None else f'tp={plan.tp}'}); shard it with autotp.parallelize "
                                  f"or autotp.from_pretrained on these {tp} ranks first")
        if not is_hf(model):
            raise CheckpointError(f"{type(model).__name__} is not a Hugging Face model: load_sharded rebuilds the "
                                  f"model from its config.json, which only a PreTrainedModel has")
        text = plan.to_text().encode()
        sha = hashlib.sha256(text).hexdigest()
        d.mkdir(parents=True, exist_ok=True)
        drawn = 0
        while rank == 0 and (not drawn or (d / f"autotp-{drawn:016x}").exists()):
            drawn = secrets.randbits(52)  # exact in float64; 16 hex digits with the leading zeros
        step.share = [drawn, int(sha[:13], 16)]
    other = [r for r in range(tp) if step.rows[r, 1] != step.rows[0, 1]]
    if other:
        who = f"ranks {other} hold" if len(other) > 1 else f"rank {other[0]} holds"
        raise CheckpointError(f"saving '{d}': {who} another plan than rank 0 (the sha256 of its text differs): "
                              f"every rank must be sharded by the same plan; shard the model with the same plan= "
                              f"on every rank, then save again")
    save = f"autotp-{int(step.rows[0, 0]):016x}"
    try:
        with all_ranks(group, f"saving '{d}' (writing {save})", timeout):
            _write(model, d / save, text, save, sha, rank, tp)
    except Exception:
        if rank == 0:  # every rank has left its body (or exited): nobody writes into it any more
            shutil.rmtree(d / save, ignore_errors=True)
        raise
    with all_ranks(group, f"saving '{d}' (committing {save})", timeout):
        if rank == 0:
            _commit(d, save, tp, sha)


def _write(model: nn.Module, sub: Path, plan_text: bytes, save: str, sha: str, rank: int, tp: int) -> None:
    """This rank's file in the save's directory ``sub``; rank 0 also the plan and the configs."""
    from safetensors.torch import save_file

    sub.mkdir(exist_ok=True)
    mine = [sub / shard_name(rank, tp)]
    if rank == 0:
        (sub / PLAN_FILE).write_bytes(plan_text)
        model.config.save_pretrained(str(sub))
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(str(sub))
        mine += [sub / n for n in (PLAN_FILE, *CONFIGS) if (sub / n).is_file()]
    state = {names[0]: t.detach().contiguous() for t, names in tensor_names(model)}
    save_file(state, str(mine[0]), metadata={"format": "pt", "autotp_save": save, "autotp_plan_sha256": sha})
    _sync(*mine, sub)


def _commit(d: Path, save: str, tp: int, sha: str) -> None:
    """Rank 0, once every rank has written: point the manifest at ``save`` (atomically), then remove the rest."""
    files = [shard_name(r, tp) for r in range(tp)] + [n for n in (PLAN_FILE, *CONFIGS) if (d / save / n).is_file()]
    manifest = {"format": FORMAT, "version": VERSION, "save": save, "tp": tp, "plan_sha256": sha, "files": files}
    tmp = d / f".{MANIFEST}.{save}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    _sync(tmp)
    os.replace(tmp, d / MANIFEST)  # the commit
    _sync(d)
    for p in d.iterdir():  # older saves, and what failed ones left
        try:
            if SAVE_DIR.fullmatch(p.name) and p.name != save and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.name.startswith(f".{MANIFEST}.autotp-") and p.name.endswith(".tmp"):
                p.unlink()
        except OSError as e:  # the checkpoint is committed: what is left over only takes space
            log.warning("autotp: saved '%s', but could not remove the older '%s' (%s); remove it by hand", d, p, e)


def _sync(*paths: Path) -> None:
    """Flush files (and directories, where the system allows) to the disk before the commit depends on them."""
    for p in paths:
        with contextlib.suppress(OSError):  # a directory cannot be opened on Windows
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------- reading
def load_sharded(directory: str | Path, group: Any = None, *, timeout: float = TIMEOUT_S) -> nn.Module:
    """Rebuild a model written by ``save_sharded`` on as many ranks as saved it; each reads its own file.

    >>> model = autotp.load_sharded("ckpt/llama-tp2")  # on the same 2 ranks  # doctest: +SKIP
    """
    group, rank, world = ranks(group, None)
    d = Path(directory)
    with all_ranks(group, f"loading '{d}'", timeout):
        saved = committed(d)
        if saved.tp != world:
            raise CheckpointError(f"'{d}' was saved at tp={saved.tp}; this process group has {world} rank"
                                  f"{'s' if world > 1 else ''}. Load it on {saved.tp} ranks, or merge it with "
                                  f"autotp.consolidate('{d}', out_dir) and load that with "
                                  f"autotp.from_pretrained(out_dir, tp={world})")
        check_stamps(saved)  # every rank checks every file: all raise the same error
        file = saved.files[rank]
        index = read_headers([file])
        model = build_empty(saved.dir, lambda cfg: dtype_for(None, cfg, index), {})
        apply_plan(model, world, group, saved.plan)
        keys = match_keys(model, index, f"'{file}'", rank)
        reads = [Read(t, names, keys[names[0]], index[keys[names[0]]], Split(), rank)
                 for t, names in tensor_names(model) if names[0] in keys]
        read_all(model, reads, f"{d.name} rank {rank}", progress=rank == 0)
        finish(model, saved.dir)
    connect(group, world)
    return model


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


# ---------------------------------------------------------------------------------------------- merging
def consolidate(directory: str | Path, out_dir: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Merge a ``save_sharded`` directory into a Hugging Face checkpoint (``model.safetensors``, or files of at
    most ``max_shard_bytes`` and ``model.safetensors.index.json``) plus its config. No process group needed.

    The new files are written under temporary names first; then the weight files, index and generation config
    of an earlier checkpoint in ``out_dir`` that this one does not overwrite are removed, and the new files renamed
    into place. ``out_dir`` may not be the checkpoint directory or inside it.

    >>> autotp.consolidate("ckpt/llama-tp2", "ckpt/llama")  # doctest: +SKIP
    >>> transformers.AutoModelForCausalLM.from_pretrained("ckpt/llama")  # doctest: +SKIP
    """
    d, out = Path(directory), Path(out_dir)
    src, dst = d.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise CheckpointError(f"out_dir '{out}' is {'the' if dst == src else 'inside the'} sharded checkpoint "
                              f"directory '{d}': consolidate writes a Hugging Face checkpoint of its own "
                              f"(model.safetensors, config.json), which must not mix with the sharded files; pass "
                              f"another out_dir, e.g. '{d.name}-merged' beside it")
    saved = committed(d)
    check_stamps(saved)
    held = [read_headers([f]) for f in saved.files]
    # on the meta device: the full shapes to check against, the module names the plan lines match, the tied names
    model = build_empty(saved.dir, lambda cfg: dtype_for(None, cfg, held[0]), {})
    splits = _full_shapes(saved.plan, held, model)
    parts = _pack([(n, _nbytes(shape, held[0][n])) for n, (_, shape) in splits.items()], max_shard_bytes)
    names = [SINGLE] if len(parts) == 1 else [f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                                              for i in range(1, len(parts) + 1)]
    extras = [n for n in CONFIGS if (saved.dir / n).is_file()]
    token = secrets.token_hex(8)  # each file is written under a temporary name, then renamed in this order
    tmp = {n: out / f".{n}.{token}.tmp" for n in [*names, *([INDEX] if len(parts) > 1 else []), *extras]}
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    try:
        for name, part in zip(names, parts):  # one output file in memory at a time
            save_file({n: _merge(n, *splits[n], saved.files, held) for n in part}, str(tmp[name]),
                      metadata={"format": "pt"})
        if len(parts) > 1:
            weight_map = {n: name for name, part in zip(names, parts) for n in part}
            total = sum(_nbytes(shape, held[0][n]) for n, (_, shape) in splits.items())
            tmp[INDEX].write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for extra in extras:
            shutil.copyfile(saved.dir / extra, tmp[extra])
        _sync(*tmp.values())
        for p in out.iterdir():  # an earlier checkpoint's weights, index and generation config this one lacks
            if (HF_WEIGHTS.fullmatch(p.name) or p.name == CONFIGS[1]) and p.name not in tmp and p.is_file():
                p.unlink()
        for name, t in tmp.items():
            os.replace(t, out / name)
        _sync(out)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)  # those not renamed, after an error


def _full_shapes(plan: Plan, held: list[dict[str, Stored]], model: nn.Module
                 ) -> dict[str, tuple[Split, tuple[int, ...]]]:
    """Each stored tensor's split (from its module's plan line; a tied weight's from all its holders' lines) and
    full shape, checked on every rank's file and against ``model``, the meta model config.json describes."""
    names = list(held[0])
    for r, h in enumerate(held[1:], 1):
        if set(h) != set(names):
            diff = sorted(set(h) ^ set(names))
            raise CheckpointError(f"rank {r}'s file holds other tensors than rank 0's (e.g. '{diff[0]}'); the files "
                                  f"come from different saves")
    dense = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    holders = {n: group for _, group in tensor_names(model) for n in group}  # a tied weight is stored under one
    sharding = plan.with_entries(e for e in plan.entries if e.style in SHARDING)
    lines = sharding.resolve([n for n, _ in model.named_modules()], plan.model or "the saved model")
    out = {}
    for n in names:
        split = agreed_split(holders.get(n, [n]), lines, plan.tp)
        shape = split.full_shape(held[0][n].shape)
        if dense.get(n) != shape:
            raise CheckpointError(f"tensor '{n}': merged by its plan line it would be {list(shape)}, but the model of "
                                  f"config.json has {list(dense[n]) if n in dense else 'no such tensor'}; the plan "
                                  f"file or config.json does not belong to these shards")
        try:
            if split.dim is not None:
                split.ranges(shape[split.dim], 0)
        except ValueError as e:
            raise CheckpointError(f"tensor '{n}' ({list(shape)}) cannot be split by its plan line ({e}); the plan "
                                  f"file does not belong to these shards") from None
        for r, h in enumerate(held):
            if h[n].shape != split.local_shape(shape) or h[n].dtype != held[0][n].dtype:
                raise CheckpointError(f"tensor '{n}': rank {r} holds {list(h[n].shape)} {h[n].dtype}, expected "
                                      f"{list(split.local_shape(shape))} {held[0][n].dtype} of {list(shape)}; the "
                                      f"files come from different saves")
        out[n] = (split, shape)
    return out


def _merge(name: str, split: Split, shape: tuple[int, ...], files: Sequence[Path], held: list[dict[str, Stored]]
           ) -> torch.Tensor:
    """The full tensor ``name``: each block from the first rank holding it (rank 0's copy when replicated)."""
    from safetensors import safe_open

    full = torch.empty(shape, dtype=held[0][name].dtype)
    holders = [0] if split.dim is None else range(0, split.tp, split.rep)
    for r in holders:
        with safe_open(str(files[r]), framework="pt") as f:
            local = f.get_tensor(name)
        if split.dim is None:
            full.copy_(local)
            continue
        at = 0
        for a, b in split.ranges(shape[split.dim], r):
            full.narrow(split.dim, a, b - a).copy_(local.narrow(split.dim, at, b - a))
            at += b - a
    return full


def _nbytes(shape: tuple[int, ...], s: Stored) -> int:
    return int(torch.Size(shape).numel()) * s.dtype.itemsize


def _pack(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Names in order, cut into runs of at most ``limit`` bytes (a larger tensor gets a run of its own)."""
    parts: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if parts[-1] and used + n > limit:
            parts.append([])
            used = 0
        parts[-1].append(name)
        used += n
    return parts
