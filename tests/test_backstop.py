"""The numerical check (``parallelize(check=...)``): code the captured graph does not show — a Function whose
hand-written backward mixes the sharded features — passes every proof and gives wrong gradients; the check
tries the plan's numbers before sharding and replicates the group it blames (or refuses a plan passed in).
One spawned 2-rank group."""
import os
import sys

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))

PLAIN = dict(fused=False, heads_last=False, sizes="minus1", scale="head_dim", norm="layer", qk_norm=False,
             gate=False, gated_mlp=False, root=False, reuse=False, last_differs=False, causal=True)


def _diffs(model, dense, x) -> tuple[float, float]:
    """(max |out diff|, max |grad diff| of the first norm's weight relative to its largest value: a replicated
    parameter that every gradient reaches)."""
    y, y_ref = model(x), dense(x)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    want = dense.blocks[0].norm1.weight.grad
    g = (model.blocks[0].norm1.weight.grad - want).abs().max() / want.abs().max()
    return float((y - y_ref).abs().max()), float(g)


def tried(rank: int, world: int) -> dict:
    import copy
    import time

    from fuzz_models import build

    import autotp

    out = {}
    for name, ch in (("custom", dict(PLAIN, custom_grad=True)), ("plain", dict(PLAIN, custom_grad=False))):
        for check in (False, None):
            model, x = build(ch)
            dense = copy.deepcopy(model)
            t0 = time.perf_counter()
            autotp.parallelize(model, world, example_inputs=(x,), check=check)
            out[name, check] = dict(seconds=time.perf_counter() - t0, diffs=_diffs(model, dense, x),
                                    plan=model._autotp_plan.to_text())
    model, x = build(dict(PLAIN, custom_grad=True))
    plan = autotp.make_plan(model, world, example_inputs=(x,))  # every static proof passes
    try:
        autotp.parallelize(model, world, plan=plan, example_inputs=(x,))
        out["given"] = "no error"
    except autotp.AutoTPError as e:
        out["given"] = f"{type(e).__name__}: {e}"
    return out


def test_numerical_check_replicates_what_the_proofs_cannot_see():
    r0, r1 = run_ranks(tried, 2, timeout=240)
    for r in (r0, r1):
        # without the check: forward exact, gradients silently wrong (the reason the check exists)
        out, grad = r["custom", False]["diffs"]
        assert out < 1e-5 and grad > 1e-2, (out, grad)
        # with it (the default for a model this size): the MLP group replicated with its reason, attention sharded
        out, grad = r["custom", None]["diffs"]
        assert out < 1e-5 and grad < 1e-5, (out, grad)
        plan = r["custom", None]["plan"]
        for p in ("up", "down"):
            line = next(x for x in plan.splitlines() if x.startswith(f"blocks.*.{p} "))
            assert " replicate " in line and "# numerical check: the sharded gradients of 'blocks.*.down' differ" \
                in line and "custom autograd.Function" in line, line
        for p in ("q", "k", "v", "o"):
            assert any(x.startswith(f"blocks.*.{p} ") and ("colwise" in x or "rowwise" in x) for x in plan.splitlines())
        # a model the proofs cover: the check changes nothing
        assert r["plain", None]["plan"] == r["plain", False]["plan"]
        assert max(r["plain", None]["diffs"]) < 1e-5
        # a plan passed in is refused, not edited
        msg = r["given"]
        assert msg.startswith("PlanMismatchError: the plan would not give the unsharded numbers on FuzzNet: "
                              "numerical check:") and "parallelize(check=False)" in msg, msg
