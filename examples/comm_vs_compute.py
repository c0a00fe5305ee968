"""Communication vs computation of a linear layer split over 2 ranks, done through autotp.

The classic exercise: ``Y = X W`` with ``W`` split column-wise, each rank computing its slice of
``Y``, the slices all-gathered; and the Megatron pair that follows it, a second linear split
row-wise whose partial outputs are all-reduced. Here the two models are plain ``nn.Module``s:
``autotp.parallelize`` finds the splits and ``autotp.profile`` times the compute and the collectives.

    torchrun --standalone --nproc_per_node 2 examples/comm_vs_compute.py
    python examples/comm_vs_compute.py          # spawns the 2 local ranks itself

Prints, per hidden size: the unsharded forward on one rank, the sharded forward's compute and
collective time, bytes moved, the communication share, and the largest difference from unsharded.
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import autotp
from autotp.runtime.transports import shm
from autotp.tools.launch import run_ranks

SIZES = [256, 512, 1024, 2048]  # hidden size d; the layers map d -> 4d (-> d)
TOKENS = (4, 64)  # batch, sequence
REPS = 3


class Widen(nn.Module):
    """One linear layer d -> 4d: autotp splits its output features and all-gathers them."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 4 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLP(nn.Module):
    """d -> 4d -> d: the first layer split column-wise, the second row-wise, one all-reduce."""

    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def measure(rank: int, world: int) -> list[str]:
    """Both models at every size on this rank; the table lines (every rank returns its own)."""
    lines = [f"{'model':6} {'d':>5} {'unsharded ms':>12} {'compute ms':>10} {'comm ms':>8} {'comm %':>6} "
             f"{'collective':>10} {'MiB':>6} {'max |diff|':>10}"]
    for d in SIZES:
        for cls, what in ((Widen, "all-gather"), (MLP, "all-reduce")):
            torch.manual_seed(0)
            model, x = cls(d), torch.randn(*TOKENS, d)
            dense = copy.deepcopy(model)
            model = autotp.parallelize(model, tp=world, example_inputs=(x,))
            sharded = autotp.profile(model, (x,), reps=REPS, warmup=1).forward.total
            alone = autotp.profile(dense, (x,), reps=REPS, warmup=1).forward.total
            with torch.no_grad():
                diff = (model(x) - dense(x)).abs().max().item()
            lines.append(f"{cls.__name__:6} {d:5d} {alone.compute_s * 1e3:12.2f} {sharded.compute_s * 1e3:10.2f} "
                         f"{sharded.comm_s * 1e3:8.2f} {sharded.comm_share:6.1%} {what:>10} "
                         f"{sharded.bytes / 2**20:6.2f} {diff:10.1e}")
    return lines


def main() -> None:
    if "RANK" in os.environ:  # under torchrun
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        lines = measure(rank, world)
        dist.destroy_process_group()
    else:
        world, rank = 2, 0
        lines = run_ranks(measure, world, timeout=600)[0]
    if rank == 0:
        via = "shared memory" if shm.wanted() else "gloo over loopback (AUTOTP_SHM=0)"
        print(f"tp={world}, {TOKENS[0]}x{TOKENS[1]} tokens, float32, a gloo group on one machine, collectives "
              f"through {via}, one thread per rank (rank 0's times, mean of {REPS})")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
