"""torch.compile of a parallelized model: one graph (fullgraph), the same outputs and gradients as eager.

The collectives are functional collectives inside autograd.Functions, and the vocabulary lookup runs
in forward hooks: dynamo traces them all. The backend is aot_eager (dynamo and AOT autograd, no code
generation); AUTOTP_COMPILE_BACKEND=inductor runs the same test through inductor's C++ kernels (a few
minutes of compiling on 2 cores).
"""
import os
import sys
import time

import pytest
import torch

import autotp
from autotp.runtime import collectives
from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
from cases import build  # noqa: E402

BACKEND = os.environ.get("AUTOTP_COMPILE_BACKEND", "aot_eager")
MODELS = ["nanogpt", "llama_gqa"]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mean_forward_s(fn, x: torch.Tensor, reps: int = 5) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t0) / reps


def compiled_vs_eager(rank: int, world: int, backend: str) -> dict:
    """Per model: eager and compiled outputs and gradients compared, compile time, forward time ratio."""
    out = {}
    for name in MODELS:
        model, x = build(name)
        model = autotp.parallelize(model, world, example_inputs=(x,))
        y_ref = model(x)
        y_ref.float().pow(2).mean().backward()
        g_ref = _grads(model)
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
        with collectives.counting() as counts:
            t0 = time.perf_counter()
            y = compiled(x)
            t1 = time.perf_counter()
            y.float().pow(2).mean().backward()
            t2 = time.perf_counter()
        g, counted = _grads(model), sum(counts.values())
        eager_s, compiled_s = _mean_forward_s(model, x), _mean_forward_s(compiled, x)
        with torch.no_grad():  # inference: eager computes the LM head into shared memory, compiled code cannot
            y_inf, y_inf_eager = compiled(x), model(x)
        out[name] = dict(out_diff=(y - y_ref).abs().max().item(), out_scale=y_ref.abs().max().item(),
                         no_grad_diff=max((y_inf - y_inf_eager).abs().max().item(),
                                          (y_inf_eager - y_ref).abs().max().item()),
                         grad_diff=max((g[k] - g_ref[k]).abs().max().item() for k in g_ref),
                         same_grads=sorted(g) == sorted(g_ref), compile_fwd_s=t1 - t0, compile_bwd_s=t2 - t1,
                         eager_s=eager_s, compiled_s=compiled_s, counted=counted)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(compiled_vs_eager, 2, BACKEND, timeout=1500 if BACKEND == "inductor" else 400)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_equals_eager(ranks, name):
    for rank, res in enumerate(ranks):
        r = res[name]
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (BACKEND, rank, name, r)
        assert r["same_grads"] and r["grad_diff"] <= 1e-5, (BACKEND, rank, name, r)
        assert r["no_grad_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (BACKEND, rank, name, r)
        assert r["counted"] == 0, r  # compiled code keeps no Python side effects: collectives are not counted
        print(f"{BACKEND} {name} rank {rank}: compile {r['compile_fwd_s']:.1f} s forward + {r['compile_bwd_s']:.1f} s "
              f"backward; forward {r['eager_s'] * 1e3:.2f} ms eager, {r['compiled_s'] * 1e3:.2f} ms compiled")
