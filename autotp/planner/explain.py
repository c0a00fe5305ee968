"""The planner's words for readers: a failing node as its op and module, and the tp values that would work.

Pure text from the captured graph; shared by the planner and the plan checker (``validate``).
"""
from __future__ import annotations

import math
import re

import torch.fx as fx

from autotp.capture.export import Captured
from autotp.capture.source import of_node
from autotp.errors import ShardingError
from autotp.plan import glob_of, line_path
from autotp.planner.sites import op_name


def describe(c: Captured, e: Exception, *, source: bool = False) -> str:
    """Why ``e`` stopped a group, naming its node by op and module rather than by graph-local name.

    ``source``: add the model's line that computed the node (``at file.py:NN: <code>``), for error messages (a
    plan's reasons stay short).
    """
    n = getattr(e, "node", None)
    text = str(getattr(e, "reason", e))
    if n is None:
        return text
    if n.op == "output":
        return "the model's output would be sharded"
    place = where(c, n)
    text = re.sub(r"\s*\(at [\w.]+\)", "", text).replace(f"{n.name} ({n.target})", place)
    if place not in text:
        text = re.sub(rf"(?<![\w.]){re.escape(n.name)}(?![\w])", place, text, count=1)
    text = text if place in text else f"{place}: {text}"
    return text + (at_source(n) if source else "")


def at_source(n: fx.Node) -> str:
    """`` (at file.py:NN: <code>)``: the model's line that computed ``n``, or nothing where it is not known."""
    line = of_node(n)
    return f" (at {line})" if line else ""


def where(c: Captured, n: fx.Node) -> str:
    """A node as a reader sees it: its op and the module (glob) it runs in, not its graph-local name."""
    if n.op == "placeholder":
        return f"input '{n.target}'"
    return f"{op_name(n)} in '{line_path(glob_of(c.owner(n)))}'"


def indivisible_error(fails: list, tp: int) -> ShardingError:
    """The error for groups whose sizes ``tp`` cannot split, evenly or in whole units: the model's line that
    failed, the sizes, the tp values that divide every one of them, and the uneven splits tried."""
    sizes = sorted({s for _, e in fails for s in e.sizes} | {x.out_features for cols, _ in fails for x in cols})
    most = math.gcd(*sizes)
    even = [t for t in range(2, most + 1) if most % t == 0]
    cols, e = fails[0]
    mods = ", ".join(sorted({glob_of(x.module) for x in cols}))
    tried = getattr(e, "tried", ())
    line = at_source(e.node) if getattr(e, "node", None) is not None else ""
    return ShardingError(
        f"tp={tp} cannot shard {mods}: {getattr(e, 'reason', e)}{line}. Sizes involved: {sizes}; tp values that divide "
        f"them all: {[1, *even]}"
        + (f"; split unevenly into {', '.join(map(str, tried))} whole units the group does not close either"
           if tried else "; no split into whole units gives each rank a part") + ". Fix: use a tp that divides "
        f"them, or parallelize(..., strict=False) / 'autotp plan ... --no-strict' to keep these modules whole, with "
        f"the reason in the plan.")