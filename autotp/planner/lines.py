"""Plan lines the planner writes for modules that are not one linear layer: an experts module's, and why an
embedding table stays replicated. Pure: reads the planner's roles, writes entries."""
from __future__ import annotations

from autotp.plan import Entry
from autotp.planner.sites import Lookup, Site


def experts_entry(s: Site, sites: dict, roles: dict, reasons: dict, segments: dict, tp: int) -> Entry:
    """One line for an experts module: its grouped weights sliced in place (col: outputs, row: inputs)."""
    mine = [x for x in sorted(sites.values(), key=lambda x: x.node.name) if x.module == s.module]
    cols = [x for x in mine if roles.get(x.node) == "colwise"]
    rows = [x for x in mine if roles.get(x.node) == "rowwise"]
    if not cols or not rows:
        why = next((reasons[x.node] for x in mine if x.node in reasons), "its input is already sharded"
                   if tp > 1 else "tp=1")
        return Entry(s.module, "replicate", (), why)
    leaf = lambda x: x.weight.rpartition(".")[2]  # noqa: E731
    params = [("n", str(s.experts)), ("col", ",".join(map(leaf, cols))), ("row", ",".join(map(leaf, rows))),
              ("w", "in_out" if s.in_out else "out_in")]
    seg = segments.get(cols[0].node.name)
    if len(cols) == 1 and seg and len(seg) > 1:
        params.append(("seg", ",".join(map(str, seg))))
    return Entry(s.module, "experts", tuple(params),
                 f"{s.experts} experts, each one's hidden features sharded in place; inputs get f, "
                 f"the output one all-reduce")


def vocab_reason(lk: Lookup, roles: dict, tp: int) -> str | None:
    """None if the lookup's table is sharded by rows, else why it stays replicated."""
    if tp == 1:
        return "tp=1"
    if lk.blocker:
        return lk.blocker
    if lk.tied is not None and roles.get(lk.tied.node) not in ("colwise", "gather"):
        return f"its table is tied to '{lk.tied.module}', which is replicated"
    if not lk.from_input and lk.tied is None:
        return "its ids are computed (positions), not read from the model's inputs"
    if lk.rows < tp:
        return f"{lk.rows} rows are fewer than tp={tp} ranks"
    return None
