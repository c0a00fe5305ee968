"""Merging a sharded checkpoint into a standard Hugging Face one, in one process (no process group).

Each tensor's split comes from its module's plan line (``autotp.split``): rank ``r``'s file holds the index ranges
``Split.ranges(size, r)`` of it, which may differ in length from rank to rank (an uneven ``split=`` line); the
merge copies every rank's ranges into place, so the merged tensors are exactly the dense ones.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from autotp.errors import CheckpointError
from autotp.io.hf_model import build_empty
from autotp.io.load import INDEX, SINGLE, Stored, agreed_split, dtype_for, read_headers, tensor_names
from autotp.io.manifest import CONFIGS, check_stamps, committed, sync
from autotp.plan import Plan
from autotp.split import SHARDING, Split

HF_WEIGHTS = re.compile(r"model\.safetensors|model-.+-of-.+\.safetensors|model\.safetensors\.index\.json")
MAX_SHARD_BYTES = 5 << 30  # consolidate writes files of at most this size (and an index when there are several)


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
        sync(*tmp.values())
        for p in out.iterdir():  # an earlier checkpoint's weights, index and generation config this one lacks
            if (HF_WEIGHTS.fullmatch(p.name) or p.name == CONFIGS[1]) and p.name not in tmp and p.is_file():
                p.unlink()
        for name, t in tmp.items():
            os.replace(t, out / name)
        sync(out)
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
        shape = split.full_shape(held[0][n].shape, 0)  # from rank 0's part; every rank's part is checked below
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
        for r, h in enumerate(held):  # an uneven split= line: each rank its own share
            want = split.local_shape(shape, r)
            if h[n].shape != want or h[n].dtype != held[0][n].dtype:
                raise CheckpointError(f"tensor '{n}': rank {r} holds {list(h[n].shape)} {h[n].dtype}, expected "
                                      f"{list(want)} {held[0][n].dtype} of {list(shape)}"
                                      + (f" (split={','.join(map(str, split.parts))})" if split.parts else "")
                                      + "; the files come from different saves")
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
