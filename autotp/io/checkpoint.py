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

import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from autotp.capture.inputs import is_hf
from autotp.errors import CheckpointError
from autotp.io.consolidate import MAX_SHARD_BYTES, consolidate  # noqa: F401 - public here as before
from autotp.io.hf_model import build_empty
from autotp.io.load import (
    TIMEOUT_S,
    Read,
    apply_plan,
    connect,
    dtype_for,
    finish,
    match_keys,
    read_all,
    read_headers,
    tensor_names,
)
from autotp.io.manifest import (  # noqa: F401 - public here as before
    CONFIGS,
    FORMAT,
    MANIFEST,
    PLAN_FILE,
    SAVE_DIR,
    VERSION,
    Saved,
    check_stamps,
    committed,
    shard_name,
    sync,
)
from autotp.plan import Plan
from autotp.runtime.ranks import all_ranks, ranks
from autotp.split import Split

log = logging.getLogger(__name__)


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
    sync(*mine, sub)


def _commit(d: Path, save: str, tp: int, sha: str) -> None:
    """Rank 0, once every rank has written: point the manifest at ``save`` (atomically), then remove the rest."""
    files = [shard_name(r, tp) for r in range(tp)] + [n for n in (PLAN_FILE, *CONFIGS) if (d / save / n).is_file()]
    manifest = {"format": FORMAT, "version": VERSION, "save": save, "tp": tp, "plan_sha256": sha, "files": files}
    tmp = d / f".{MANIFEST}.{save}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    sync(tmp)
    os.replace(tmp, d / MANIFEST)  # the commit
    sync(d)
    for p in d.iterdir():  # older saves, and what failed ones left
        try:
            if SAVE_DIR.fullmatch(p.name) and p.name != save and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.name.startswith(f".{MANIFEST}.autotp-") and p.name.endswith(".tmp"):
                p.unlink()
        except OSError as e:  # the checkpoint is committed: what is left over only takes space
            log.warning("autotp: saved '%s', but could not remove the older '%s' (%s); remove it by hand", d, p, e)


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

