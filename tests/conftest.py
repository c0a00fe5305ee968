"""Test tiers: ``python -m pytest tests -m "not slow"`` is the edit loop (planner, plan files, slicing math,
the layout contract, one tp=2 parity group); the whole suite (README, CI) adds the HF sweep, real weights,
loading and checkpoints, compile, the fuzzer, tp=4 and the spawned command-line runs."""
from __future__ import annotations

import pytest

SLOW_MODULES = {"test_hf.py", "test_real_weights.py", "test_load.py", "test_checkpoint.py", "test_compile.py",
                "test_examples.py", "test_fuzz.py", "test_backstop.py", "test_pieces.py",
                "test_other_libraries.py"}
SLOW_FIXTURES = {"ranks", "sweep", "main"}  # module-scoped fixtures that spawn a process group over a model zoo
SLOW_TESTS = {"test_check_llama_tp2_spawned", "test_cli_profile", "test_opt_out_and_every_rank_falls_back_together",
              "test_parity_through_shared_memory", "test_tp_must_equal_group_size",
              "test_reused_plan_equals_planning_every_block", "test_deep_meta_model_plans_from_a_prefix"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or model-zoo tests, left out of the fast tier")


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("::")[-1].split("[")[0]
        if (item.path.name in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or name in SLOW_TESTS or "[tp4" in item.nodeid):
            item.add_marker(pytest.mark.slow)
