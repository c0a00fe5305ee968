"""nanoGPT-style GPT, unmodified, sharded by autotp. Run on CPU:

    torchrun --standalone --nproc_per_node 2 examples/nanogpt_tp.py
"""
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import GPT, GPTConfig  # noqa: E402  (a plain nanoGPT copy; nothing in it knows autotp)

import autotp  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=8, n_embd=128, vocab_size=256, block_size=64))
    reference = copy.deepcopy(model)
    x = torch.randint(0, 256, (4, 32))

    model = autotp.parallelize(model, tp=world, example_inputs=(x,))
    y = model(x)
    y.float().pow(2).mean().backward()

    y_ref = reference(x)
    dense = sum(p.numel() for p in reference.parameters())
    local = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(autotp.make_plan(reference, world, example_inputs=(x,)).to_text())
        print(f"max |y - y_ref| = {(y - y_ref).abs().max().item():.2e}")
        print(f"parameters on this rank: {local:,} of {dense:,} ({local / dense:.2f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
