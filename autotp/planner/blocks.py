"""Repeated blocks: plan a model cut to a short prefix of each block list, then extend the plan.

A 70B-class model is one block repeated 80 times; capturing all 80 costs seconds per dozen
layers. Instead the model is cut to the shortest prefix of each outermost block list that holds
three copies of every structural class of block (all copies of a rarer one), planned, and the
plan of each later block is that of its twin in the prefix. The first copy may differ (it reads
the embeddings); the second and third read a twin's output, as every later copy does.

Why a prefix and not a selection: a prefix of a layer list is itself a valid model (the forward
of its first k blocks is exactly the full model's), while a selection would feed a block the loop
index of another (``config.layer_types[i]``). Why it is sound:

- twins are structurally identical: same classes, parameter and buffer shapes/dtypes, plain
  attributes (``sliding_window``, ``attention_type``...), hooks; attributes that only count the
  block's position (``layer_idx = i``) are ignored. Blocks that share a parameter with anything
  else are never cut.
- the plan must say so: the second and third copies of each class must get the same lines. If
  they do not, or the cut model cannot be captured, planning falls back to the whole model.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from autotp.plan import Entry

log = logging.getLogger(__name__)
_PLAIN = (int, float, bool, str, type(None))


@dataclass
class Cut:
    """One block list cut to ``keep`` blocks; ``twin[j]`` is the prefix block that stands for block j."""

    path: str
    keep: int
    total: int
    twin: dict[int, int] = field(default_factory=dict)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # 2nd and 3rd copies of one class

    def weight(self, i: int) -> int:
        """How many blocks of the whole model prefix block ``i`` stands for."""
        return 1 + sum(1 for t in self.twin.values() if t == i)

    def block_of(self, path: str) -> int | None:
        head = self.path + "." if self.path else ""
        if not path.startswith(head):
            return None
        first = path[len(head):].split(".", 1)[0]
        return int(first) if first.isdigit() else None


def find_cuts(model: nn.Module) -> list[Cut]:
    """The outermost lists of composite blocks worth cutting (longer than the prefix they need)."""
    lists = [(p, m) for p, m in model.named_modules()
             if p and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 3
             and all(next(b.children(), None) is not None for b in m)]  # blocks, not a list of plain layers
    cuts, taken = [], []
    for path, lst in lists:
        if any(path.startswith(t + ".") for t in taken):
            continue  # inside a block of an outer list: cut along with it
        taken.append(path)
        cut = _cut_for(path, list(lst), model)
        if cut is not None:
            cuts.append(cut)
    return cuts


def _cut_for(path: str, blocks: list[nn.Module], model: nn.Module) -> Cut | None:
    if _shares_parameters(path, blocks, model):
        return None
    sigs = _signatures(blocks)
    seen: dict[Any, list[int]] = {}
    for i, s in enumerate(sigs):
        seen.setdefault(s, []).append(i)
    keep = max(ix[min(2, len(ix) - 1)] for ix in seen.values()) + 1
    if keep >= len(blocks):
        return None
    cut = Cut(path, keep, len(blocks))
    for ix in seen.values():
        if len(ix) > 2:  # the 2nd and 3rd copies both read a twin's output, as every later copy does
            cut.pairs.append((ix[1], ix[2]))
            cut.twin.update({j: ix[2] for j in ix if j >= keep})
    return cut


def _shares_parameters(path: str, blocks: list[nn.Module], model: nn.Module) -> bool:
    """True if a parameter/buffer of one block is also held by another block or outside the list."""
    owner: dict[int, int] = {}
    for i, b in enumerate(blocks):
        for t in list(b.parameters()) + list(b.buffers()):
            if owner.setdefault(id(t), i) != i:
                return True
    items = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return any(id(t) in owner and not name.startswith(path + ".") for name, t in items)


def _signatures(blocks: list[nn.Module]) -> list[tuple]:
    """A hashable structural signature per block; position-counting integer attributes left out."""
    raw = [dict(_attrs(b)) for b in blocks]
    keys = set().union(*raw)
    positional = {k for k in keys
                  if all(type(r.get(k)) is int for r in raw) and len({r[k] - i for i, r in enumerate(raw)}) == 1}
    out = []
    for b, r in zip(blocks, raw):
        plain = tuple(sorted((k, v) for k, v in r.items() if k not in positional))
        out.append((_shapes(b), plain))
    return out


def _attrs(block: nn.Module) -> Iterator[tuple[tuple[str, str], Any]]:
    for path, m in block.named_modules():
        for k, v in vars(m).items():
            if k == "training" or k.startswith("_"):
                if k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks") and v:
                    yield (path, k), len(v)
                continue
            if isinstance(v, _PLAIN):
                yield (path, k), v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
                yield (path, k), tuple(v)
            elif callable(v) and not isinstance(v, (nn.Module, torch.Tensor)):
                yield (path, k), getattr(v, "__qualname__", type(v).__qualname__)


def _shapes(block: nn.Module) -> tuple:
    return tuple((path, type(m).__module__, type(m).__qualname__,
                  tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters(recurse=False)),
                  tuple((n, tuple(t.shape), t.dtype) for n, t in m.named_buffers(recurse=False)))
                 for path, m in block.named_modules())


@contextlib.contextmanager
def cut(model: nn.Module, cuts: list[Cut]) -> Iterator[nn.Module]:
    """``model`` with each cut list holding only its prefix (restored on exit)."""
    saved = []
    try:
        for c in cuts:
            parent_path, _, name = c.path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            lst = getattr(parent, name)
            saved.append((parent, name, lst))
            short = nn.ModuleList(list(lst)[:c.keep]) if isinstance(lst, nn.ModuleList) else \
                type(lst)(*list(lst)[:c.keep])
            setattr(parent, name, short)
        yield model
    finally:
        for parent, name, lst in reversed(saved):
            setattr(parent, name, lst)


def consistent(entries: list[Entry], cuts: list[Cut]) -> str | None:
    """None if both prefix copies of every class got the same lines, else what differs."""
    for c in cuts:
        for a, b in c.pairs:
            mine = {_rename(e, c, a, b) for e in entries if c.block_of(e.path) == a}
            theirs = {e for e in entries if c.block_of(e.path) == b}
            if mine != theirs:
                diff = sorted(e.path for e in mine ^ theirs)[:3]
                return f"blocks {c.path}.{a} and {c.path}.{b} are alike but planned differently ({diff})"
    return None


def extend(entries: list[Entry], cuts: list[Cut]) -> list[Entry]:
    """The concrete lines of the whole model: after each run of a cut list's lines, its later blocks'."""
    for c in cuts:
        out: list[Entry] = []
        run: list[Entry] = []
        for e in entries + [None]:
            if e is not None and c.block_of(e.path) is not None:
                run.append(e)
                continue
            out += run
            for j in range(c.keep, c.total):
                out += [_rename(x, c, c.twin[j], j) for x in run if c.block_of(x.path) == c.twin[j]]
            run = []
            if e is not None:
                out.append(e)
        entries = out
    return entries


def _rename(e: Entry, c: Cut, i: int, j: int) -> Entry:
    old = f"{c.path}.{i}" if c.path else str(i)
    new = f"{c.path}.{j}" if c.path else str(j)
    rx = re.compile(re.escape(old) + r"(?![0-9])")
    return Entry(rx.sub(new, e.path, count=1), e.style, e.params, rx.sub(new, e.reason))
