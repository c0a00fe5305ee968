"""The examples run as documented: ``torchrun --standalone --nproc_per_node 2 examples/...`` (bounded)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_hf_generate_example_matches_unsharded():
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "hf_generate.py"), "--new-tokens", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same tokens as the unsharded model: True" in done.stdout, done.stdout
    assert "model.layers.*.mlp.down_proj     rowwise" in done.stdout and "(0.50)" in done.stdout, done.stdout
