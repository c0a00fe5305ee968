"""autotp: automatic tensor parallelism for unmodified PyTorch models.

Pipeline: ``trace`` (model -> fx graph) -> ``planner`` (graph -> Plan, via the rule table
in ``rules``) -> ``plan`` (dataclasses + text) -> ``rewrite`` (swaps in ``layers``, whose
communication is in ``collectives``; ``localize`` rewrites forwards that bake in sizes); ``profile``
splits a sharded model's time into compute and collectives, per group.
"""
from .api import make_plan, parallelize
from .checkpoint import consolidate, load_sharded, save_sharded
from .errors import (AutoTPError, CaptureError, CheckpointError, GroupError, PlanFormatError, PlanMismatchError,
                     RankError, RewriteError, ShardingError)
from .hf_plan import from_hf_tp_plan, to_hf_tp_plan
from .layers import ColumnParallelLinear, RowParallelLinear
from .load import from_pretrained
from .plan import Entry, Plan, load_plan
from .profile import Profile, profile
from .validate import check_plan

__all__ = ["make_plan", "parallelize", "profile", "load_plan", "Plan", "Entry", "Profile", "ColumnParallelLinear",
           "RowParallelLinear", "AutoTPError", "CaptureError", "GroupError", "PlanFormatError", "PlanMismatchError",
           "RewriteError", "ShardingError", "from_pretrained", "save_sharded", "load_sharded", "consolidate", "CheckpointError",
           "RankError", "check_plan", "to_hf_tp_plan", "from_hf_tp_plan"]
__version__ = "0.1.0"
