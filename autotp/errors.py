"""Exception types. Every message names the module or node, the numbers and the fix."""


class AutoTPError(Exception):
    """Base class of every error autotp raises on purpose."""


class CaptureError(AutoTPError):
    """The model could not be captured as a graph."""


class ShardingError(AutoTPError):
    """The requested tp cannot shard a layer that the plan shards (sizes not divisible)."""


class PlanFormatError(AutoTPError):
    """A plan file is malformed (names the line and what is wrong)."""


class PlanMismatchError(AutoTPError):
    """A plan does not match the model it is applied to."""


class GroupError(AutoTPError):
    """The process group is missing or does not match the requested tp."""


class RewriteError(AutoTPError):
    """The rewritten model does not agree with the plan (a planner or rewrite bug)."""


class CheckpointError(AutoTPError):
    """A checkpoint is missing, not safetensors, or does not match the model or the plan."""


class RankError(AutoTPError):
    """Another rank failed, exited or timed out while the ranks worked together (loading, saving)."""


class InternalError(AutoTPError):
    """autotp itself failed (a bug): the message names a file holding a reproduction to report."""


_reports = 0


def report(what: str, exc: BaseException | None = None, **parts: object) -> InternalError:
    """An InternalError for a bug in autotp, with a minimal reproduction written beside it.

    The file (``autotp-report-<pid>-<n>.txt`` in the system temp dir) holds ``what``, the exception with its
    traceback, and each of ``parts`` (the plan text, the model's repr, ...); the message names its path.
    """
    import os
    import platform
    import tempfile
    import traceback

    global _reports
    _reports += 1
    path = os.path.join(tempfile.gettempdir(), f"autotp-report-{os.getpid()}-{_reports}.txt")
    try:
        import torch

        versions = f"torch {torch.__version__}, python {platform.python_version()}"
    except Exception:  # noqa: BLE001 - the report is written whatever is importable
        versions = f"python {platform.python_version()}"
    text = [f"autotp internal error: {what}", versions]
    if exc is not None:
        text += ["", "exception:", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    for k, v in parts.items():
        text += ["", f"{k.replace('_', ' ')}:", str(v)]
    try:
        with open(path, "w") as f:
            f.write("\n".join(text) + "\n")
        where = f"Please report this with {path} (a reproduction: {', '.join(['the exception', *parts])})"
    except OSError as e:
        where = f"Please report this with the model code (the reproduction could not be written to {path}: {e})"
    cause = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})" if exc is not None else ""
    return InternalError(f"{what}{cause}. This is a bug in autotp. {where}.")
