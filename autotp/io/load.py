"""Shard-on-load: a Hugging Face safetensors checkpoint read straight into a parallelized model.

The model is built from its config with its parameters on the meta device (buffers such as rotary
``inv_freq`` are computed for real), the plan is applied to that meta model, and only then is each local
parameter allocated and filled with its rank's slice of the checkpoint tensor (``get_slice``): a rank
never holds, nor reads, the full tensor of a sharded parameter. Files are opened per tensor, so the pages
a read touched are unmapped right after it.

Every rank ends with one bounded all-reduce of a failure flag: a rank that failed makes the others raise
``RankError`` instead of waiting forever in the model's first collective, and a rank that exited is seen
at once (gloo reports "Connection closed by peer").
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from autotp.api import plan_for, shard
from autotp.errors import CheckpointError, PlanMismatchError, report
from autotp.io.hf_model import build_empty, transformers_module
from autotp.plan import Entry, Plan, load_plan
from autotp.runtime import collectives
from autotp.runtime.ranks import all_ranks, check_tp, ranks
from autotp.runtime.transports import shm
from autotp.split import Split, split_of

log = logging.getLogger(__name__)

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # never read: unpickling can run code
PROGRESS_BYTES = 256 << 20  # rank 0 shows a progress bar when it reads at least this much
TIMEOUT_S = 600.0  # how long a rank that finished waits for the others
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """A tensor in a safetensors file, as its header describes it (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Read:
    """One local tensor to fill: from checkpoint tensor ``key``, the part ``split`` gives ``rank``."""

    tensor: torch.Tensor  # the model's parameter (meta until read) or buffer
    names: list[str]  # its state-dict names (tied weights: several)
    key: str
    stored: Stored
    split: Split
    rank: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.stored.dtype.itemsize


# ---------------------------------------------------------------------------------------------- entry point
def from_pretrained(path: str | Path, tp: int | None = None, *, group: Any = None,
                    dtype: torch.dtype | str | None = None, plan: Plan | str | Path | None = None,
                    timeout: float = TIMEOUT_S, **hf_kwargs: Any) -> nn.Module:
    """Build a Hugging Face model directory's model already sharded: each rank reads only its slices.

    ``path`` holds ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json`` (safetensors
    only: pickles are refused). ``dtype``: the parameters' dtype (default: the config's, as transformers does).
    ``plan``: a Plan or plan file (default: ``make_plan`` on the meta model). ``timeout``: seconds a rank that
    finished waits for the others. ``hf_kwargs`` go to ``AutoConfig.from_pretrained`` (``attn_implementation=``).
    Returns the parallelized model in eval mode, ready for ``generate``; errors are raised on every rank.

    >>> model = autotp.from_pretrained("path/to/llama", tp=2)  # doctest: +SKIP
    >>> model.generate(ids, max_new_tokens=20)  # doctest: +SKIP
    """
    group, rank, tp = ranks(group, tp)
    with all_ranks(group, f"loading '{path}'", timeout):
        t0 = time.perf_counter()
        model, reads = _plan_reads(Path(path), tp, rank, group, dtype, plan, hf_kwargs)
        read_all(model, reads, f"{Path(path).name} tp={tp}", progress=rank == 0)
        finish(model, Path(path))
    connect(group, tp)
    if rank == 0:
        log.info("autotp: %s loaded at tp=%d, %.0f MB read per rank in %.1f s", type(model).__name__, tp,
                 sum(r.nbytes for r in reads) / 2**20, time.perf_counter() - t0)
    return model


def _plan_reads(path: Path, tp: int, rank: int, group: Any, dtype: Any, plan: Plan | str | Path | None,
                hf_kwargs: dict) -> tuple[nn.Module, list[Read]]:
    """The parallelized meta model and what each of its tensors reads; every check before any data is read."""
    index = checkpoint_index(path)
    model = build_empty(path, lambda cfg: dtype_for(dtype, cfg, index), hf_kwargs)
    keys = match_keys(model, index, str(path), rank)
    dense = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    plan = apply_plan(model, tp, group, plan)
    lines = plan.resolve([n for n, _ in model.named_modules()], type(model).__name__)
    reads = []
    for t, names in tensor_names(model):
        if names[0] not in keys:  # a buffer the checkpoint does not hold keeps its computed value
            continue
        split = agreed_split(names, lines, tp)
        want = split.local_shape(dense[names[0]], rank)  # uneven split=: this rank's share
        if tuple(t.shape) != want:
            raise report(f"loading {path.name} at tp={tp}: parameter '{names[0]}' of the sharded model holds "
                         f"{list(t.shape)}, its plan line gives {list(want)} of {list(dense[names[0]])} (rank {rank})",
                         None, plan=plan.to_text(), config=getattr(model, "config", None), model=model)
        reads.append(Read(t, names, keys[names[0]], index[keys[names[0]]], split, rank))
    return model, reads


def connect(group: Any, tp: int) -> None:
    """After the last agreement step: the group's sums through shared memory where its ranks share a host."""
    if tp > 1 and shm.wanted():
        collectives.use_shared_memory(group)


def apply_plan(model: nn.Module, tp: int, group: Any, plan: Plan | str | Path | None) -> Plan:
    """Parallelize the meta model by ``plan`` (a Plan, a plan file, or None: made as parallelize makes it); the
    plan used. Local to this rank: the caller's agreement step covers it (no agreement of its own inside)."""
    check_tp(tp)
    if tp > 1:
        plan, inputs = plan_for(model, tp, plan, None)
        shard(model, plan, rank=dist.get_rank(group), tp=tp, group=group, example_inputs=inputs)
        return plan
    plan = load_plan(plan) if isinstance(plan, (str, Path)) else plan
    if plan is not None and plan.tp != 1:
        raise PlanMismatchError(f"the plan is for tp={plan.tp}, the model is loaded at tp=1; load it with "
                                f"tp={plan.tp} ranks, or make a plan for tp=1")
    return plan or Plan(1, (), type(model).__name__)


def agreed_split(names: list[str], lines: dict[str, Entry], tp: int) -> Split:
    """The split of a tensor held under several names (tied weights): every sharded holder must agree."""
    splits = {n: split_of(lines.get(n.rpartition(".")[0]), n.rpartition(".")[2], tp) for n in names}
    sharded = {s for s in splits.values() if s.dim is not None}
    if len(sharded) > 1:
        raise PlanMismatchError(f"the tied parameter {names} is split differently by the plan lines of its holders "
                                f"({', '.join(f'{n}: {s}' for n, s in splits.items())}); give them the same style")
    return sharded.pop() if sharded else Split()


# ---------------------------------------------------------------------------------------------- checkpoint files
def checkpoint_index(path: Path) -> dict[str, Stored]:
    """Every tensor of the checkpoint in directory ``path``, from the safetensors headers (no data read)."""
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is not a directory: pass a Hugging Face model directory (config.json and "
                              f"{SINGLE} or {INDEX}), e.g. one written by save_pretrained")
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"'{path / INDEX}' is not a safetensors index (no readable weight_map: "
                                  f"{e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        gone = [str(f) for f in files if not f.is_file()]
        if gone:
            raise CheckpointError(f"'{path / INDEX}' names shard files that do not exist: {gone[:3]}"
                                  f"{' ...' if len(gone) > 3 else ''}; copy them next to it")
        index = read_headers(files)
        lost = [k for k, f in weight_map.items() if k not in index or index[k].file.name != Path(f).name]
        if lost:
            raise CheckpointError(f"'{path / INDEX}' maps {len(lost)} tensors to files that do not hold them (e.g. "
                                  f"'{lost[0]}' -> '{weight_map[lost[0]]}'); the index and the shards disagree")
        return index
    if (path / SINGLE).is_file():
        return read_headers([path / SINGLE])
    pickles = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickles:
        raise CheckpointError(f"'{path}' holds {pickles[:3]} but no {SINGLE} or {INDEX}: autotp reads safetensors "
                              f"only (unpickling can run code). Convert once where you trust the file: "
                              f"AutoModel.from_pretrained(dir).save_pretrained(out_dir)")
    raise CheckpointError(f"'{path}' has no {SINGLE} or {INDEX}: pass a Hugging Face model directory with "
                          f"safetensors weights")


def read_headers(files: list[Path]) -> dict[str, Stored]:
    """Name -> Stored for every tensor of ``files``; a name in two files is an error."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, Stored] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    kind = s.get_dtype()
                    if kind not in _DTYPES:
                        raise CheckpointError(f"tensor '{k}' in '{f}' has dtype {kind}, which autotp does not read")
                    if k in out:
                        raise CheckpointError(f"tensor '{k}' is in both '{out[k].file}' and '{f}'; keep one")
                    out[k] = Stored(f, tuple(s.get_shape()), _DTYPES[kind])
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"'{f}' is not a readable safetensors file ({e}); write it again with "
                                  f"save_pretrained or safetensors.torch.save_file") from None
    return out


def dtype_for(dtype: torch.dtype | str | None, config: Any, index: dict[str, Stored]) -> torch.dtype:
    """The requested dtype, else the config's, else the checkpoint's first floating dtype (transformers' "auto")."""
    if dtype is not None:
        d = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(d, torch.dtype) or not d.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; pass e.g. torch.bfloat16")
        return d
    for d in (getattr(config, "dtype", None), *(s.dtype for s in index.values())):
        d = getattr(torch, d, None) if isinstance(d, str) else d
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
    return torch.get_default_dtype()


def tensor_names(model: nn.Module) -> list[tuple[torch.Tensor, list[str]]]:
    """Each parameter and persistent buffer once, with every state-dict name it has (tied weights: several)."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), (t, []))[1].append(name)
    return list(groups.values())


def match_keys(model: nn.Module, index: dict[str, Stored], source: str, rank: int) -> dict[str, str]:
    """State-dict name -> checkpoint key, checking that every parameter is there with its shape and kind of dtype.

    A key may lack or carry the base model's prefix (``model.``, ``transformer.``); a tied weight may be
    stored under any one of its names. Keys the model does not use are logged on rank 0.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys, missing = {}, []
    for t, names in tensor_names(model):
        key = next((k for n in names for k in _candidates(n, prefix) if k in index), None)
        if key is None:
            if isinstance(t, nn.Parameter):
                missing.append(names[0])
            continue
        s = index[key]
        if s.shape != tuple(t.shape):
            raise CheckpointError(f"tensor '{key}' in '{s.file}' has shape {list(s.shape)}, but the model's "
                                  f"'{names[0]}' is {list(t.shape)}: the checkpoint does not match config.json "
                                  f"(or the sharded files do not match the plan); use the config it was saved with")
        if _kind(s.dtype) != _kind(t.dtype):
            raise CheckpointError(f"tensor '{key}' in '{s.file}' is {s.dtype}, but the model's '{names[0]}' is "
                                  f"{t.dtype}: floating-point values are cast (dtype=), other kinds are not; "
                                  f"the checkpoint holds something else under this name")
        keys.update({n: key for n in names})
    unused = sorted(set(index) - set(keys.values()))
    if missing:
        raise CheckpointError(f"{len(missing)} parameters of {type(model).__name__} are not in {source}: "
                              f"{missing[:4]}{' ...' if len(missing) > 4 else ''}"
                              + (f" (it holds {len(unused)} other tensors, e.g. {unused[:2]})" if unused else "")
                              + ". The checkpoint belongs to another model or is incomplete (use its own config.json "
                              "and every shard file), or stores names that transformers converts when it loads "
                              "(MoE experts saved one by one), which autotp does not read")
    if unused and rank == 0:
        log.warning("autotp: %d tensors of %s are not used by %s: %s", len(unused), source, type(model).__name__,
                    unused[:4])
    return keys


def _kind(dtype: torch.dtype) -> str:
    return "floating-point" if dtype.is_floating_point else "bool" if dtype == torch.bool else "integer"


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint keys a state-dict name may be stored under: as is, without or with the base model's prefix."""
    if not prefix:
        return [name]
    if name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1:]]
    return [name, f"{prefix}.{name}"]


# ---------------------------------------------------------------------------------------------- reading
def read_all(model: nn.Module, reads: list[Read], label: str, *, progress: bool) -> None:
    """Fill every local tensor from its checkpoint slice; a progress bar on ``progress`` for large reads."""
    from tqdm import tqdm

    total = sum(r.nbytes for r in reads)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"autotp: loading {label}",
              disable=not progress or total < PROGRESS_BYTES) as bar:
        for r in reads:
            install(model, r, read_slice(r))
            bar.update(r.nbytes)


def read_slice(r: Read) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``r.key``, in ``r.tensor``'s dtype; only that part is read."""
    from safetensors import safe_open

    out = torch.empty(r.tensor.shape, dtype=r.tensor.dtype)
    with safe_open(str(r.stored.file), framework="pt") as f:  # one tensor per opening: closing unmaps its pages
        part = f.get_slice(r.key)
        if r.split.dim is None:
            out.copy_(part[...])
            return out
        d, at = r.split.dim, 0
        for a, b in r.split.ranges(r.stored.shape[d], r.rank):  # fused segments: one slice each
            out.narrow(d, at, b - a).copy_(part[(slice(None),) * d + (slice(a, b),)])
            at += b - a
    return out


def install(model: nn.Module, r: Read, value: torch.Tensor) -> None:
    """Give ``r.tensor`` the data ``value``: a buffer in place; a meta parameter is replaced, under every name it
    has, by a real one that keeps its gradient hooks and the attributes set by the rewrite."""
    t = r.tensor
    if t.device.type != "meta":
        with torch.no_grad():
            t.copy_(value)
        return
    new = nn.Parameter(value, requires_grad=t.requires_grad)
    new.__dict__.update(t.__dict__)
    if t._backward_hooks:  # sum_grad and rep= hooks (they refer to their layer, not to the tensor)
        new._backward_hooks = t._backward_hooks
    for name in r.names:
        path, _, leaf = name.rpartition(".")
        model.get_submodule(path)._parameters[leaf] = new


def finish(model: nn.Module, path: Path) -> None:
    """The generation config saved next to the weights, as transformers' from_pretrained loads it."""
    if (path / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        model.generation_config = transformers_module().GenerationConfig.from_pretrained(str(path))
