"""autotp: automatic tensor parallelism for unmodified PyTorch models.

Pipeline: ``trace`` (model -> fx graph) -> ``planner`` (graph -> Plan, via the rule table
in ``rules``) -> ``plan`` (dataclasses + text) -> ``rewrite`` (swaps in ``layers``, whose
communication is in ``collectives``; ``localize`` rewrites forwards that bake in sizes).
"""
from .api import make_plan, parallelize
from .errors import (AutoTPError, CaptureError, GroupError, PlanFormatError, PlanMismatchError, RewriteError,
                     ShardingError)
from .layers import ColumnParallelLinear, RowParallelLinear
from .plan import Entry, Plan, load_plan

__all__ = ["make_plan", "parallelize", "load_plan", "Plan", "Entry", "ColumnParallelLinear", "RowParallelLinear",
           "AutoTPError", "CaptureError", "GroupError", "PlanFormatError", "PlanMismatchError", "RewriteError",
           "ShardingError"]
__version__ = "0.1.0"
