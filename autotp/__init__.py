"""autotp: automatic tensor parallelism for unmodified PyTorch models.

The package is the pipeline, each stage importing only those before it:
``capture`` (model -> ATen graph, on a meta copy) -> ``planner`` (graph -> ``Plan``, pure: per-op rules,
linear sites, groups, the check of a given plan) -> ``runtime`` (the only stage that mutates modules: sharded
layers, collectives, transports, the translation check of a rewritten meta copy) -> ``api`` (``make_plan``,
``check_plan``, ``parallelize``) -> ``io`` (safetensors in and out, transformers' ``tp_plan``s) -> ``tools``
(command line, demo, zoo; never imported by the library). ``plan`` and ``errors`` are the vocabulary they share.
"""
from autotp.api import check_plan, make_plan, parallelize
from autotp.errors import (
                           AutoTPError,
                           CaptureError,
                           CheckpointError,
                           GroupError,
                           PlanFormatError,
                           PlanMismatchError,
                           RankError,
                           RewriteError,
                           ShardingError,
)
from autotp.io.checkpoint import consolidate, load_sharded, save_sharded
from autotp.io.hf_plan import from_hf_tp_plan, to_hf_tp_plan
from autotp.io.load import from_pretrained
from autotp.plan import Entry, Plan, load_plan
from autotp.runtime.collectives import counting as count_collectives
from autotp.runtime.layers import ColumnParallelLinear, RowParallelLinear
from autotp.runtime.loss import cross_entropy, loss_parallel
from autotp.runtime.profile import Profile, profile
from autotp.runtime.training import clip_grad_norm_

__all__ = ["make_plan", "parallelize", "profile", "load_plan", "Plan", "Entry", "Profile", "ColumnParallelLinear",
           "RowParallelLinear", "AutoTPError", "CaptureError", "GroupError", "PlanFormatError", "PlanMismatchError",
           "RewriteError", "ShardingError", "from_pretrained", "save_sharded", "load_sharded", "consolidate", "CheckpointError",
           "RankError", "check_plan", "count_collectives", "clip_grad_norm_", "to_hf_tp_plan", "from_hf_tp_plan",
           "cross_entropy", "loss_parallel"]
__version__ = "0.1.0"
