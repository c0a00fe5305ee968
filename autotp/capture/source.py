"""Where in the model's code: the source line of a captured node, or of the frame an exception came from.

``torch.export`` records each node's Python stack (``node.meta["stack_trace"]``); the line an error should name is
its last frame outside torch, autotp and the standard library: the model's own code (a user's file, or a
library's modeling code).
"""
from __future__ import annotations

import linecache
import os
import re
import sysconfig
import traceback
from typing import Any

import torch

_HIDDEN = tuple(os.path.dirname(os.path.abspath(p)) + os.sep
                for p in (torch.__file__, os.path.dirname(__file__)))
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n[ \t]*([^\n]*)')


def _model_code(path: str) -> bool:
    if path.startswith("<"):  # generated code (exec, fx's own), not a file a reader can open
        return False
    p = os.path.abspath(path)
    return not p.startswith(_HIDDEN) and not (p.startswith(_STDLIB) and "site-packages" not in p)


def _fmt(path: str, line: int, code: str) -> str:
    code = re.sub(r"\s+#[^'\"]*$", "", code.strip())  # a trailing comment (none inside a string) is not the code
    return f"{os.path.basename(path)}:{line}: {code}"


def of_node(node: Any) -> str | None:
    """``file.py:NN: <code>`` of the model's line that computed ``node``, or None where export recorded none."""
    meta = getattr(node, "meta", None) or {}
    frames = _FRAME.findall(meta.get("stack_trace") or "")
    for path, line, code in reversed(frames):
        if _model_code(path):
            return _fmt(path, int(line), code)
    return None


def of_exception(e: BaseException) -> str | None:
    """``file.py:NN: <code>`` of the model's line an exception was raised under (its chain searched, innermost
    first), or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        frames = list(traceback.extract_tb(e.__traceback__))
        ours = [i for i, fr in enumerate(frames) if os.path.abspath(fr.filename).startswith(_HIDDEN[1])]
        for fr in reversed(frames[ours[-1] + 1:] if ours else frames):  # what autotp called, not its callers
            if _model_code(fr.filename):
                code = fr.line or linecache.getline(fr.filename, fr.lineno or 0)
                return _fmt(fr.filename, fr.lineno or 0, code)
        e = e.__cause__ or e.__context__
    return None


def at(where: str | None) -> str:
    """`` at file.py:NN: <code>`` for a message, or nothing."""
    return f" at {where}" if where else ""
