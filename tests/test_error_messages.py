"""Errors name the module, the model's source line where one is known, the op and the fix; "Please report this"
only for a bug in autotp itself, with the path of a reproduction written beside it."""
import inspect
import os
import re

import pytest
import torch
import torch.nn as nn

import autotp
from autotp.capture.export import capture
from autotp.errors import CaptureError, InternalError
from autotp.planner.explain import describe
from autotp.planner.layouts import NoRule

aten = torch.ops.aten


class BadHeads(nn.Module):
    """Its reshape asks for more elements than the projection gives: export fails there."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q = self.qkv(x).view(B, T, self.heads, C)  # 3 * C features viewed as heads * C
        return self.proj(q.sum(2))


class Heads(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.q, self.proj = heads, nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, C // self.heads)
        return self.proj(q.softmax(-1).reshape(B, T, C))


def _line_of(cls, text: str) -> int:
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_capture_failure_names_the_model_line():
    """(make_plan goes on to plan such a model by pieces, whose eager run then fails on that line too.)"""
    x = torch.randn(2, 5, 32)
    with pytest.raises(CaptureError) as e:
        capture(nn.Sequential(BadHeads()), (x,))
    msg = str(e.value)
    line = _line_of(BadHeads, "self.qkv(x).view(")
    assert f"in module '0' at test_error_messages.py:{line}: q = self.qkv(x).view(B, T, self.heads, C)" in msg, msg
    assert "Fix:" in msg and "Please report" not in msg, msg


def test_planner_reason_with_the_source_line():
    """What the plan checker and the planner's errors say of a node: op, module and the line that computed it."""
    c = capture(nn.Sequential(Heads()), (torch.randn(2, 5, 32),))
    view = next(n for n in c.graph.nodes if n.target is aten.view.default)
    e = NoRule(f"dim 2 of reshape [2, 5, 4, 8] of size 4 at {view.name} is not divisible by tp=3", sizes=(4,))
    e.node = view
    line = _line_of(Heads, "self.q(x).view(")
    text = describe(c, e, source=True)
    assert text == (f"dim 2 of reshape [2, 5, 4, 8] of size 4 at aten.view in '*' is not divisible by tp=3 "
                    f"(at test_error_messages.py:{line}: q = self.q(x).view(B, T, self.heads, C // self.heads))"), text
    assert "test_error_messages.py" not in describe(c, e)  # a plan's reasons stay short


def test_an_internal_error_writes_a_report_and_names_it(monkeypatch):
    import autotp.planner.rules as rules

    def broken(ctx, node):
        raise ZeroDivisionError("a rule that divides by zero")

    monkeypatch.setitem(rules.RULES, aten.softmax.int, broken)
    model = nn.Sequential(Heads())
    with pytest.raises(InternalError) as e:
        autotp.make_plan(model, 2, example_inputs=(torch.randn(2, 5, 32),))
    msg = str(e.value)
    assert "This is a bug in autotp. Please report this with " in msg and "ZeroDivisionError" in msg, msg
    path = re.search(r"Please report this with (\S+autotp-report-\d+-\d+\.txt)", msg).group(1)
    assert os.path.dirname(path) == __import__("tempfile").gettempdir()
    with open(path) as f:
        text = f.read()
    os.remove(path)
    assert "ZeroDivisionError: a rule that divides by zero" in text and "in broken" in text, text
    assert repr(model) in text and "aten.softmax.int" in text, text  # the model and the graph it was planning


def test_user_errors_do_not_ask_for_a_report():
    with pytest.raises(autotp.AutoTPError) as e:
        autotp.make_plan(nn.Sequential(Heads()), 5, example_inputs=(torch.randn(2, 5, 32),))  # 4 heads, 5 ranks
    assert "Please report" not in str(e.value) and "Fix:" in str(e.value), str(e.value)


def test_check_plan_names_the_model_line():
    """A hand-written plan the checker refuses: its problems name the line of the model's code they happen at."""
    from autotp.plan import Entry, Plan

    x, line = torch.randn(2, 5, 32), _line_of(Heads, "self.q(x).view(")
    at = f"(at test_error_messages.py:{line}: q = self.q(x).view(B, T, self.heads, C // self.heads))"
    for tp, said in ((3, "cannot go on sharded: dim 2 of reshape (2, 5, 4, 8) of size 4 at aten.view in '*' is not "
                          f"divisible by tp=3 {at}. Fix: close the group"),
                     (8, f"its output has fewer heads than tp=8 ranks at aten.view in '*' {at}. Fix: add rep=2")):
        plan = Plan(tp, (Entry("0.q", "colwise"), Entry("0.proj", "rowwise")), "Sequential")
        with pytest.raises(autotp.PlanMismatchError) as e:
            autotp.check_plan(nn.Sequential(Heads()), plan, example_inputs=(x,))
        assert said in str(e.value), str(e.value)


def test_indivisible_sizes_name_the_model_line():
    with pytest.raises(autotp.ShardingError) as e:
        autotp.make_plan(nn.Sequential(Heads()), 5, example_inputs=(torch.randn(2, 5, 32),))
    line = _line_of(Heads, "self.q(x).view(")
    assert f"not divisible by tp=5 (at test_error_messages.py:{line}: q = self.q(x).view(" in str(e.value), str(e.value)


def test_make_plan_of_a_model_that_fails_eagerly_names_its_line():
    """Capture fails, planning by pieces runs the model eagerly, which fails on the same line: that line and the
    fix, not only torch's words."""
    with pytest.raises(CaptureError) as e:
        autotp.make_plan(nn.Sequential(BadHeads()), 2, example_inputs=(torch.randn(2, 5, 32),))
    msg, line = str(e.value), _line_of(BadHeads, "self.qkv(x).view(")
    assert f"in module '0' at test_error_messages.py:{line}: q = self.qkv(x).view(B, T, self.heads, C)" in msg, msg
    assert "RuntimeError: shape '[2, 5, 4, 32]' is invalid" in msg and "Fix: make the model run on " in msg, msg
    assert "Please report" not in msg and "viewed as" not in msg, msg  # the line's trailing comment left out


def test_a_loaded_shape_the_plan_does_not_give_writes_a_report(tmp_path, monkeypatch):
    """The sharded meta model holding other shapes than its plan lines give is a bug in autotp: the error names
    a written reproduction (the plan, the config, the model)."""
    pytest.importorskip("transformers")
    import transformers as T
    from hf_zoo import config

    import autotp.io.load as load
    from autotp.split import Split

    T.AutoModelForCausalLM.from_config(config("llama")).save_pretrained(str(tmp_path))
    monkeypatch.setattr(load, "agreed_split", lambda names, lines, tp: Split(0, 2))  # a split the model lacks
    with pytest.raises(InternalError) as e:
        load._plan_reads(tmp_path, 1, 0, None, None, None, {})
    msg = str(e.value)
    assert "of the sharded model holds [" in msg and "This is a bug in autotp. Please report this with " in msg, msg
    path = re.search(r"Please report this with (\S+autotp-report-\d+-\d+\.txt)", msg).group(1)
    with open(path) as f:
        text = f.read()
    os.remove(path)
    assert "\nplan:\n" in text and "autotp-plan 1" in text and "LlamaConfig" in text and "LlamaForCausalLM(" in text


class Fn(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("call, said", [
    (lambda x: autotp.make_plan(Heads(), 0, example_inputs=(x,)), "tp=0 (int): tp is the number of ranks"),
    (lambda x: autotp.make_plan(Heads(), "2", example_inputs=(x,)), "not the string '2': int('2')"),
    (lambda x: autotp.make_plan(Heads(), None, example_inputs=(x,)), "make_plan needs tp"),
    (lambda x: autotp.make_plan(Heads(), 2, example_inputs=3), "example_inputs is int '3'. Fix: pass a tuple"),
    (lambda x: autotp.make_plan(lambda t: t, 2, example_inputs=(x,)),
     "make_plan: model is function, not a torch.nn.Module. Fix: pass the module"),
    (lambda x: autotp.check_plan(Heads(), autotp.make_plan(nn.Sequential(Heads()), 2, example_inputs=(x,)),
                                 example_inputs=(x,)),
     "'0.q' matches no module of Heads (the plan is for Sequential) (closest: 'q'). Fix: make a plan for Heads"),
    (lambda x: autotp.check_plan(Heads(), "no-such.plan", example_inputs=(x,)), "'no-such.plan' does not exist"),
])
def test_ordinary_bad_arguments(call, said):
    with pytest.raises(autotp.AutoTPError) as e:
        call(torch.randn(2, 5, 32))
    assert said in str(e.value) and "Please report" not in str(e.value), str(e.value)


def _tied_and_twice(rank: int, world: int) -> dict:
    """A bias with two names (a head's own and its decoder's, as XLM-RoBERTa ties them): the default numerical
    check compares each rank's slice by the line that shards it; then parallelize again is refused."""
    import copy

    from test_error_messages import TiedHead

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), TiedHead()), torch.randn(2, 5, 16)
    dense = copy.deepcopy(model)
    autotp.parallelize(model, world, example_inputs=(x,))  # check=None: on for a model this small
    y, y_ref = model(x), dense(x)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    half = dense[3].bias.grad.chunk(world)[rank]
    out = dict(plan=model._autotp_plan.to_text(), out=float((y - y_ref).abs().max()),
               bias=float((model[3].bias.grad - half).abs().max()), held=tuple(model[3].bias.shape))
    try:
        autotp.parallelize(model, world, example_inputs=(x,))
        out["twice"] = "no error"
    except autotp.AutoTPError as e:
        out["twice"] = f"{type(e).__name__}: {e}"
    return out


class TiedHead(nn.Module):
    def __init__(self, d=16, vocab=64):
        super().__init__()
        self.decoder = nn.Linear(d, vocab)
        self.bias = nn.Parameter(torch.randn(vocab) * 0.1)  # named 'bias' first, its plan line is the decoder's
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(x)


def test_a_tied_bias_passes_the_numerical_check_and_parallelize_twice_is_refused():
    from autotp.tools.launch import run_ranks

    for r in run_ranks(_tied_and_twice, 2, timeout=240):
        assert "3.decoder  colwise" in r["plan"] and "gather=1" in r["plan"], r["plan"]
        assert r["out"] < 1e-6 and r["bias"] < 1e-7 and r["held"] == (32,), r
        assert r["twice"].startswith("PlanMismatchError: Sequential is already parallelized (at tp=2)") and \
            "Fix: use it as it is, or parallelize a fresh unsharded copy" in r["twice"], r["twice"]
