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
