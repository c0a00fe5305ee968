"""The plan: frozen dataclasses and their text form. No torch.distributed, no torch at all.

One line per module path (``*`` stands for one path component, e.g. a layer index)::

    transformer.h.*.attn.c_attn  colwise in=64 out=192 w=out_in seg=64,64,64  # why
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from autotp.errors import PlanFormatError, PlanMismatchError

FORMAT = "autotp-plan 1"
STYLES = {
    "colwise": {"in", "out", "w", "seg", "rep", "gather", "group", "split"},  # output features sharded (seg: fused segments,
    # each sharded; rep: fewer heads than ranks, each block of features held by rep ranks; gather=1: output
    # all-gathered; group: the column -> row group it opens, named by the module holding it)
    "rowwise": {"in", "out", "w", "group", "split"},  # input features sharded, one all-reduce after (group: the one it closes)
    "replicate": {"in", "out", "w", "rows", "dim"},  # every rank keeps the whole module
    "vocab": {"rows", "dim", "split"},  # an embedding table sharded by rows: each rank looks up its ids, one all-reduce
    "localize": {"split"},  # the module's forward uses local sizes for sharded dims (rewritten from its graph)
    "global": set(),  # the module's forward (and all it calls) runs on DTensor activations, seeing global sizes
    "patch": None,  # set integer attributes to local values, e.g. n_head=6 (any attribute name)
    "sum_grad": {"p"},  # replicated parameters (p=weight,...) whose gradients are all-reduced in backward
    "slice": {"arg", "dim", "size", "merged"},  # a replicated argument (arg=name) each rank slices along dim
    # on the way into the module: its 1/tp of size (merged=1: of each block of size, the dim being (-1, size))
    "experts": {"n", "col", "row", "w", "seg"},  # n experts' 3-D weights sliced in place: col=names by outputs
    # (seg: fused segments), row=names by inputs; f at the module's inputs, one all-reduce of its output
}
ROOT = "<root>"  # the path of the model itself (a 'global' or 'patch' line of the root module)
# split=5,4 (colwise, rowwise, vocab, localize): an uneven split, when tp does not divide a size: every sharded
# size of the group is cut into sum(split) whole units (heads, KV groups, blocks of features, rows) and rank r holds
# split[r] of them. A patch value may be a per-rank list the same way (n_head=6,3).
_INT_KEYS = {"in", "out", "rep", "rows", "dim", "gather", "n", "size", "merged"}


@dataclass(frozen=True)
class Entry:
    """One line of a plan: a module path (or glob), a style, parameters and the reason."""

    path: str
    style: str
    params: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    line: int = field(default=0, compare=False)

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.params).get(key, default)

    def ints(self, key: str) -> list[int] | None:
        v = self.get(key)
        return [int(x) for x in v.split(",")] if v else None


@dataclass(frozen=True)
class Plan:
    """What to do to each module, for one tp. Same model -> byte-identical text.

    >>> p = Plan(2, (Entry("mlp.*.fc1", "colwise", (("in", "8"), ("out", "32"), ("w", "out_in"))),))
    >>> Plan.from_text(p.to_text()) == p
    True
    """

    tp: int
    entries: tuple[Entry, ...]
    model: str = ""
    summary: tuple[str, ...] = field(default=(), compare=False)  # comments, informational

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        lines = [f"# autotp plan for {self.model or 'a model'} at tp={self.tp}. Edit freely: lines are",
                 "# <module path or glob>  <style> [key=value ...]  # reason",
                 "# styles: colwise (seg=fused segments, gather=1) | rowwise | vocab | experts | replicate | patch attr=N"
                 " | localize | global | sum_grad p=.. | slice arg=..",
                 *(f"# {s}" for s in self.summary), FORMAT, f"tp {self.tp}"]
        if self.model:
            lines.append(f"model {self.model}")
        width = max((len(e.path) for e in self.entries), default=0)
        for e in self.entries:
            kv = " ".join(f"{k}={v}" for k, v in e.params)
            body = f"{e.path.ljust(width)}  {e.style}" + (f" {kv}" if kv else "")
            lines.append(body + (f"  # {e.reason}" if e.reason else ""))
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_text())

    @classmethod
    def from_text(cls, text: str, source: str = "<plan>") -> "Plan":
        tp, model, entries, summary, seen_format = None, "", [], [], False
        for no, raw in enumerate(text.splitlines(), 1):
            body, reason = _comment(raw)
            body, reason = body.strip(), reason.strip()
            if not body:
                continue
            words = body.split()
            if not seen_format and body != FORMAT:
                raise PlanFormatError(f"{source}:{no}: expected '{FORMAT}' before anything else: this is not an "
                                      f"autotp plan file (write one with autotp.make_plan(...).save(path))")
            if body == FORMAT:
                seen_format = True
            elif words[0] == "tp":
                if len(words) != 2 or not words[1].isdigit() or int(words[1]) < 1:
                    raise PlanFormatError(f"{source}:{no}: '{raw.strip()}': expected 'tp N' with N >= 1")
                tp = int(words[1])
            elif words[0] == "model":
                model = " ".join(words[1:])
            else:
                entries.append(_parse_entry(words, reason, source, no, raw))
        if not seen_format:
            raise PlanFormatError(f"{source}: no '{FORMAT}' line: this is not an autotp plan file "
                                  f"(write one with autotp.make_plan(...).save(path))")
        if tp is None:
            raise PlanFormatError(f"{source}: no 'tp N' line; add one, e.g. 'tp 2'")
        return cls(tp, tuple(entries), model, tuple(summary))

    # ------------------------------------------------------------------ matching
    def resolve(self, modules: Iterable[str], model_name: str = "the model", *, slices: bool = False
                ) -> dict[str, Entry]:
        """Map each concrete module path to its entry; every line must match some module.

        ``slices``: map the 'slice' lines instead, keyed ``path:arg`` (a module may have one per argument,
        beside its other line).
        """
        names = [m for m in modules if m]
        out: dict[str, Entry] = {}
        mine = [e for e in self.entries if (e.style == "slice") == slices]
        key = (lambda e, m: f"{m}:{e.get('arg')}") if slices else (lambda e, m: m)  # noqa: E731
        exact = {key(e, e.path) for e in mine if "*" not in e.path}
        for e in mine:
            rx = glob_regex(e.path)
            hits = [""] if e.path == ROOT else [m for m in names if rx.fullmatch(m)]
            if not hits:
                near = _closest(e.path, sorted({glob_of(m) for m in names}) if "*" in e.path else names)
                other = self.model and model_name != "the model" and self.model != model_name
                raise PlanMismatchError(
                    (f"plan line {e.line}: " if e.line else "") + f"'{e.path}' matches no module of {model_name}"
                    + (f" (the plan is for {self.model})" if other else "")
                    + (f" (closest: '{near}')" if near else "")
                    + (f". Fix: make a plan for {model_name} with autotp.make_plan, or correct the path." if other
                       else ". Fix: correct the path, or make a new plan with autotp.make_plan for this model."))
            for m in hits:
                k = key(e, m)
                if "*" in e.path and k in exact:
                    continue  # an exact line overrides a glob
                if k in out and not ("*" in out[k].path and "*" not in e.path):
                    raise PlanMismatchError(f"plan lines {out[k].line} and {e.line} both match module '{m or ROOT}'"
                                            f" ('{out[k].path}' {out[k].style} vs '{e.path}' {e.style}); keep one")
                out[k] = e
        return out

    def with_entries(self, entries: Iterable[Entry]) -> "Plan":
        return replace(self, entries=tuple(entries))


def glob_regex(pattern: str) -> re.Pattern:
    return re.compile(r"\.".join("[^.]+" if p == "*" else re.escape(p) for p in pattern.split(".")))


def line_path(module: str) -> str:
    """The path a plan line gives ``module``: its dotted name, ``<root>`` for the model itself."""
    return module or ROOT


def glob_of(path: str) -> str:
    """Replace every numeric path component by ``*``: ``h.3.attn`` -> ``h.*.attn``."""
    return ".".join("*" if p.isdigit() else p for p in path.split("."))


def common_path(paths: list[str]) -> str:
    """The longest dotted prefix every path shares: ``h.0.attn.q``, ``h.0.mlp`` -> ``h.0``."""
    out = []
    for parts in zip(*(p.split(".") for p in paths)):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


def compress(entries: list[Entry], modules: Iterable[str] | None = None) -> list[Entry]:
    """Write repeated layers once, as a glob, when every instance has the same line.

    The glob stars only the path components that differ between the instances (``h.0.attn.to_out.0`` and
    ``h.1.attn.to_out.0`` give ``h.*.attn.to_out.0``, never a glob that also names ``to_out.1``), and a glob is
    written only if it names none of the other lines' modules, nor (given the model's ``modules``) a module
    that has no such line (block 0's norm, where only blocks 1-3 sum a gradient).
    """
    names = list(modules) if modules is not None else []
    def key(e: Entry) -> tuple[str, str | None]:  # 'slice' lines may sit beside another line of the module
        return glob_of(e.path), e.get("arg") if e.style == "slice" else None

    buckets: dict[tuple[str, str | None], list[Entry]] = {}
    for e in entries:
        buckets.setdefault(key(e), []).append(e)
    globbed: dict[int, str] = {}  # id of an entry -> the glob its kind of line is written as
    for b in buckets.values():
        kinds: dict[tuple, list[Entry]] = {}
        for x in b:
            kinds.setdefault((x.style, x.params, x.reason), []).append(x)
        for same in kinds.values():
            paths = [x.path for x in same]
            pattern = varying_glob(paths)
            if len(same) < 2 or len(set(paths)) < len(paths) or pattern is None:
                continue
            rx = glob_regex(pattern)
            if any(rx.fullmatch(x.path) for x in b if x not in same):
                continue  # another line's module would be named too
            if names and {m for m in names if rx.fullmatch(m)} != set(paths):
                continue  # so would a module without this line
            globbed.update({id(x): pattern for x in same})
    out, written = [], set()
    for e in entries:
        g = globbed.get(id(e))
        if g is None:
            out.append(e)
        elif (g, key(e)[1]) not in written:
            written.add((g, key(e)[1]))
            out.append(Entry(g, e.style, e.params, e.reason))
    return out


def varying_glob(paths: list[str]) -> str | None:
    """The glob of ``paths`` that stars exactly the components that differ (None: they differ in length)."""
    parts = [p.split(".") for p in paths]
    if len({len(x) for x in parts}) != 1:
        return None
    return ".".join(c[0] if len(set(c)) == 1 else "*" for c in zip(*parts))


def summarize(groups: int, rows: int, vocab: int, gathers: int, partial: int) -> tuple[str, ...]:
    """The plan's summary comment: groups and collectives per forward."""
    out = (f"{groups} groups; all-reduces per forward: {rows + vocab}"
           + (f" ({vocab} for vocabulary lookups)" if vocab else "")
           + (f"; all-gathers: {gathers}" if gathers else ""),)
    if partial:
        out += (f"{partial} replicated parameters get their gradients summed across ranks in backward",)
    return out


def _comment(raw: str) -> tuple[str, str]:
    """A line's body and its comment: from a ``#`` that starts the line or follows a space (``group=<root>#2``
    names the second group of a module, it is no comment)."""
    m = re.search(r"(^|\s)#", raw)
    return (raw, "") if m is None else (raw[:m.start()], raw[m.end():])


def _parse_entry(words: list[str], reason: str, source: str, no: int, raw: str) -> Entry:
    where = f"{source}:{no}: '{raw.strip()}'"
    if len(words) < 2:
        raise PlanFormatError(f"{where}: expected '<module path> <style> [key=value ...]'")
    path, style = words[0], words[1]
    if style not in STYLES:
        near = _closest(style, list(STYLES))
        raise PlanFormatError(f"{where}: unknown style '{style}'" + (f" (did you mean '{near}'?)" if near else "")
                              + f"; use one of {', '.join(sorted(STYLES))}")
    if path != ROOT and not re.fullmatch(r"[A-Za-z0-9_*]+(\.[A-Za-z0-9_*]+)*", path):
        raise PlanFormatError(f"{where}: '{path}' is not a module path (dot-separated names, '*' for one part, "
                              f"'{ROOT}' for the model itself)")
    params = []
    for kv in words[2:]:
        k, eq, v = kv.partition("=")
        if style == "patch" and eq and all(x.isidentifier() for x in k.split(".")) and re.fullmatch(r"-?\d+(,\d+)*", v):
            params.append((k, v))
            continue
        if style == "patch":
            raise PlanFormatError(f"{where}: patch takes attribute=integer pairs, got '{kv}'")
        if not eq or k not in STYLES[style]:
            allowed = ", ".join(sorted(STYLES[style])) or "none"
            near = _closest(k, sorted(STYLES[style]))
            raise PlanFormatError(f"{where}: bad parameter '{kv}' for {style}"
                                  + (f" (did you mean '{near}={v}'?)" if near else "") + f"; allowed keys: {allowed}")
        if k in _INT_KEYS and not v.isdigit():
            raise PlanFormatError(f"{where}: {k}={v} must be a whole number")
        if k == "w" and v not in ("out_in", "in_out"):
            raise PlanFormatError(f"{where}: w={v} must be out_in ([out, in] weight) or in_out ([in, out])")
        if k == "seg" and not re.fullmatch(r"\d+(,\d+)*", v):
            raise PlanFormatError(f"{where}: seg={v} must be comma-separated sizes, e.g. seg=64,64,64")
        if k == "split" and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)+", v):
            raise PlanFormatError(f"{where}: split={v} must be the units each rank holds, one positive whole "
                                  f"number per rank, e.g. split=5,4")
        params.append((k, v))
    e = Entry(path, style, tuple(params), reason, line=no)
    seg, out = e.ints("seg"), e.ints("out")
    if seg and out and sum(seg) != out[0]:
        raise PlanFormatError(f"{where}: seg sizes add up to {sum(seg)}, not out={out[0]}")
    return e


def _closest(path: str, names: list[str]) -> str | None:
    import difflib

    hit = difflib.get_close_matches(path, names, n=1, cutoff=0.5)
    return hit[0] if hit else None


def load_plan(path: str | Path) -> Plan:
    """Read a plan file written by ``Plan.save`` (or by hand).

    >>> # plan = autotp.load_plan("plans/gpt2.tp2.plan")
    """
    p = Path(path)
    if not p.exists():
        raise PlanFormatError(f"plan file '{path}' does not exist")
    if p.is_dir():
        inside = sorted(q.name for q in p.glob("*.plan"))[:3]
        raise PlanFormatError(f"'{path}' is a directory, not a plan file"
                              + (f" (it holds {inside})" if inside else "") + "; pass the file itself")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PlanFormatError(f"'{path}' is not a plan file: it is not text (byte {e.start} is "
                              f"{e.object[e.start]:#04x}, not UTF-8); a plan is the text autotp.make_plan(...).save(file) or "
                              f"'autotp plan MODEL --tp N -o FILE' writes") from None
    except OSError as e:
        raise PlanFormatError(f"plan file '{path}' cannot be read: {e.strerror}") from None
    return Plan.from_text(text, source=str(path))
