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
