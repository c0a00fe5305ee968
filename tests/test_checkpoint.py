"""Sharded checkpoints that survive failed and killed saves, and consolidate into a directory of its own.

One tied-embedding Llama with GQA (its plan made once, here), sharded at tp=2. A first group of ranks saves it,
then one rank dies while writing the next save. The main group then loads what that left, and in one process
group runs: a save whose rank 1 fails to write, one whose rank 1 has no plan, one whose ranks hold different
plans (each must leave the previous save loadable and equal to it), a save that commits and removes the older
and the abandoned save directories, a rank file copied in from another save (refused), consolidate over the
files of an earlier consolidate with other shard sizes, consolidate into the checkpoint itself (refused before
writing), and the merged tied model loaded by transformers.
"""
import contextlib
import copy
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
from cases import error_of  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 12], [9, 8, 200, 31, 77, 2, 150, 4]])
SMALL = 20_000  # consolidate's max_shard_bytes for several files and an index
LEFTOVER = "autotp-00000000deadbeef"  # the directory of a save killed before it committed


def tiny_llama():
    """The same seeded model on every rank: Llama, 2 KV heads, the LM head tied to the token embeddings."""
    import transformers as T
    from hf_zoo import config

    T.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    cfg = config("llama_gqa")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def sharded(plan_text: str):
    """(the unsharded model, a tp=2 copy by the plan)."""
    import autotp

    ref = tiny_llama()
    return ref, autotp.parallelize(copy.deepcopy(ref), 2, plan=autotp.Plan.from_text(plan_text))


def bump(model) -> None:
    """Every parameter + 1 (a tied one once): the next save differs from the last."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def local(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def diff(model, state: dict) -> list[str]:
    """Names whose tensors differ from ``state`` in any bit, dtype or shape (or exist on one side only)."""
    mine = model.state_dict()
    return sorted(set(mine) ^ set(state)) + [k for k in mine if k in state and (
        mine[k].dtype != state[k].dtype or mine[k].shape != state[k].shape or not torch.equal(mine[k], state[k]))]


def listing(d) -> list[str]:
    """Every file under ``d`` (relative), with its size and modification time: equal listings, untouched files."""
    d = Path(d)
    return sorted(f"{p.relative_to(d)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in d.rglob("*") if p.is_file())


def names(d) -> list[str]:
    d = Path(d)
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@contextlib.contextmanager
def broken_writes(how: str, stamp: str = ""):
    """``safetensors.torch.save_file`` fails before writing ("raise"), or writes half the file and the process
    dies ("exit"), noting when in ``stamp``."""
    import safetensors.torch as st

    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        if how == "raise":
            raise OSError(f"simulated: no space left on the device for '{os.path.basename(filename)}'")
        data = st.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[:len(data) // 2])
        with open(stamp, "w") as f:
            f.write(repr(time.time()))
        os._exit(1)

    st.save_file = save_file
    try:
        yield
    finally:
        st.save_file = real


def committed_save(d) -> str:
    return json.loads((Path(d) / "autotp-checkpoint.json").read_text())["save"]


# ---------------------------------------------------------------------------------------------- a killed save
def killed_mid_save(rank: int, world: int, root: str, plan_text: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    import autotp

    _, model = sharded(plan_text)
    d = os.path.join(root, "killed")
    autotp.save_sharded(model, d)
    save_file(local(model), os.path.join(root, f"killed.rank{rank}.safetensors"))  # what a load must give
    if rank == 0:
        autotp.consolidate(d, os.path.join(root, "killed_merged_before"))
    dist.barrier()
    bump(model)
    stamp = os.path.join(root, "killed.stamp")
    with broken_writes("exit", stamp) if rank == 1 else contextlib.nullcontext():
        try:
            autotp.save_sharded(model, d)
        except autotp.RankError as e:
            with open(stamp) as f:
                after = time.time() - float(f.read())
            raise RuntimeError(f"RankError {after:.1f} s after rank 1 exited: {e}") from None


# ---------------------------------------------------------------------------------------------- the main group
def main_cases(rank: int, world: int, root: str, plan_text: str) -> dict:
    import torch.distributed as dist
    import transformers as T
    from safetensors.torch import load_file

    import autotp

    plan = autotp.Plan.from_text(plan_text)
    out = {"killed_load": diff(autotp.load_sharded(os.path.join(root, "killed")),
                               load_file(os.path.join(root, f"killed.rank{rank}.safetensors")))}
    ref, model = sharded(plan_text)
    d = os.path.join(root, "ckpt")
    x, y, z = (os.path.join(root, f"merged_{n}") for n in "xyz")
    autotp.save_sharded(model, d)
    first, state_a = names(d), local(model)
    out["first"] = first
    if rank == 0:  # an earlier consolidate of save A in each: x and z several files and an index, y one file
        autotp.consolidate(d, x, max_shard_bytes=SMALL)
        autotp.consolidate(d, y)
        autotp.consolidate(d, z, max_shard_bytes=SMALL)
        out["x_before"], out["y_before"], out["z_before"] = names(x), names(y), names(z)
        shutil.copy(os.path.join(d, committed_save(d), "rank00001-of-00002.safetensors"),
                    os.path.join(root, "a.rank1.safetensors"))
    dist.barrier()
    bump(model)
    state_b = local(model)

    def failed(what: str, run) -> None:
        before = listing(d)
        out[what] = error_of(run)
        dist.barrier()  # rank 0 removes the directory of the save that failed before it arrives here
        out[f"{what}: files kept"] = listing(d) == before  # every file of save A, byte size and time

    with broken_writes("raise") if rank == 1 else contextlib.nullcontext():
        failed("rank 1 fails to write", lambda: autotp.save_sharded(model, d))
    failed("rank 1 has no plan", lambda: autotp.save_sharded(model if rank == 0 else ref, d))
    model._autotp_plan = plan if rank == 0 else plan.with_entries(plan.entries[:-1])
    failed("ranks hold other plans", lambda: autotp.save_sharded(model, d))
    model._autotp_plan = plan
    out["failed: load"] = diff(autotp.load_sharded(d), state_a)  # the files unchanged since: A after each failure

    if rank == 0:  # what a save killed before its commit leaves
        os.makedirs(os.path.join(d, LEFTOVER))
        with open(os.path.join(d, LEFTOVER, "rank00000-of-00002.safetensors"), "wb") as f:
            f.write(b"half a file")
        with open(os.path.join(d, f".autotp-checkpoint.json.{LEFTOVER}.tmp"), "w") as f:
            f.write("{")
    dist.barrier()
    autotp.save_sharded(model, d)
    out["second"], out["second_save"] = names(d), committed_save(d)
    out["second: load"] = diff(autotp.load_sharded(d), state_b)

    # a rank file of save A in save B's directory
    mine = os.path.join(d, committed_save(d), "rank00001-of-00002.safetensors")
    if rank == 0:
        shutil.copy(mine, os.path.join(root, "b.rank1.safetensors"))
        shutil.copy(os.path.join(root, "a.rank1.safetensors"), mine)
    dist.barrier()
    out["mixed: load"] = error_of(lambda: autotp.load_sharded(d))
    if rank == 0:
        out["mixed: consolidate"] = error_of(lambda: autotp.consolidate(d, os.path.join(root, "mixed_merged")))
        out["mixed: nothing written"] = not os.path.exists(os.path.join(root, "mixed_merged"))
        shutil.copy(os.path.join(root, "b.rank1.safetensors"), mine)

    ref_b = copy.deepcopy(ref)  # what save B holds, unsharded
    bump(ref_b)
    with torch.no_grad():
        want = ref_b(input_ids=IDS).logits
    if rank == 0:  # save B over A's consolidated files: one file over several, several over one, fewer over more
        autotp.consolidate(d, x)
        autotp.consolidate(d, y, max_shard_bytes=SMALL)
        autotp.consolidate(d, z, max_shard_bytes=3 * SMALL)
        out["x_after"], out["y_after"], out["z_after"] = names(x), names(y), names(z)
        with torch.no_grad():
            for name, p in (("x", x), ("y", y), ("z", z)):
                merged = T.AutoModelForCausalLM.from_pretrained(p).eval()
                out[f"{name}: transformers"] = diff(merged, ref_b.state_dict())
                out[f"{name}: logits"] = ((merged(input_ids=IDS).logits - want).abs().max() / want.abs().max()).item()
                out[f"{name}: tied"] = merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        stored = set(load_file(os.path.join(x, "model.safetensors")))
        out["x: stored once"] = "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored

        before = listing(d)  # into the checkpoint itself, or inside it
        out["into itself"] = error_of(lambda: autotp.consolidate(d, d))
        out["into itself, as another path"] = error_of(lambda: autotp.consolidate(d, os.path.join(d, "..", "ckpt")))
        out["inside it"] = error_of(lambda: autotp.consolidate(d, os.path.join(d, "merged")))
        out["inside its save"] = error_of(lambda: autotp.consolidate(d, os.path.join(d, committed_save(d))))
        out["itself: files kept"] = listing(d) == before
    dist.barrier()
    for name, p in (("x", x), ("y", y)):  # through autotp's reader too, on every rank
        out[f"{name}: autotp"] = diff(autotp.from_pretrained(p, world, plan=plan), state_b)
    with torch.no_grad():  # on every rank: the sharded model's collectives
        out["sharded: logits"] = ((model(input_ids=IDS).logits - want).abs().max() / want.abs().max()).item()
    return out


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def plan_text():
    import autotp

    return autotp.make_plan(tiny_llama(), 2).to_text()  # once, here, not on 2 ranks sharing 2 cores


@pytest.fixture(scope="module")
def killed(root, plan_text):
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        run_ranks(killed_mid_save, 2, root, plan_text, timeout=120)
    return str(err.value), time.perf_counter() - t0


@pytest.fixture(scope="module")
def main(root, plan_text, killed):
    return run_ranks(main_cases, 2, root, plan_text, timeout=300)


# ---------------------------------------------------------------------------------------------- tests
def test_plan_has_a_vocab_sharded_embedding_and_a_head_line(plan_text):
    lines = [ln.split()[:2] for ln in plan_text.splitlines() if ln and not ln.startswith("#")]
    assert ["model.embed_tokens", "vocab"] in lines and any(ln[0] == "lm_head" for ln in lines), plan_text


def test_layout(main):
    for rank, res in enumerate(main):
        save = res["second_save"]
        assert res["second"] == sorted(["autotp-checkpoint.json", save, *(f"{save}/{f}" for f in (
            "autotp.plan", "config.json", "generation_config.json", "rank00000-of-00002.safetensors",
            "rank00001-of-00002.safetensors"))]), res["second"]  # the older save and the abandoned one removed
        first = res["first"][0]  # save A, which save B replaced
        assert re.fullmatch(r"autotp-[0-9a-f]{16}", save) and re.fullmatch(r"autotp-[0-9a-f]{16}", first), res
        assert first != save and res["first"] == [p.replace(save, first) for p in res["second"]], res["first"]
        assert res["second: load"] == [], res["second: load"]


def test_rank_files_carry_the_save_and_the_plan_hash(main, root):
    import hashlib

    from safetensors import safe_open

    d = Path(root, "ckpt")
    manifest = json.loads((d / "autotp-checkpoint.json").read_text())
    sub = d / manifest["save"]
    sha = hashlib.sha256((sub / "autotp.plan").read_bytes()).hexdigest()
    assert manifest == {"format": "autotp-sharded", "version": 1, "save": main[0]["second_save"], "tp": 2,
                        "plan_sha256": sha, "files": ["rank00000-of-00002.safetensors",
                                                      "rank00001-of-00002.safetensors", "autotp.plan", "config.json",
                                                      "generation_config.json"]}, manifest
    for r in range(2):
        with safe_open(str(sub / f"rank{r:05d}-of-00002.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "autotp_save": manifest["save"], "autotp_plan_sha256": sha}


def test_failed_save_leaves_the_previous_one(main):
    words = {"rank 1 fails to write": ("OSError: simulated: no space left", ["rank00001-of-00002.safetensors"]),
             "rank 1 has no plan": ("CheckpointError:", ["was not parallelized by autotp at tp=2", "its plan: none"])}
    for what, (start, said) in words.items():
        failed, healthy = main[1][what], main[0][what]
        assert failed.startswith(start) and all(w in failed for w in said), (what, failed)
        assert healthy.startswith("RankError: rank 0: saving") and "failed on rank [1]" in healthy, (what, healthy)
    for rank, res in enumerate(main):
        other = res["ranks hold other plans"]
        assert other.startswith("CheckpointError: saving") and "rank 1 holds another plan than rank 0" in other, other
        for what in (*words, "ranks hold other plans"):
            assert res[f"{what}: files kept"], (rank, what)  # the new save's directory removed, the old untouched
        assert res["failed: load"] == [], (rank, res["failed: load"][:4])  # equal to the last save


def test_killed_save_leaves_the_previous_one(killed, main, root):
    from safetensors.torch import load_file

    import autotp

    msg, took = killed
    assert "rank 0 failed" in msg and "after rank 1 exited" in msg and "RankError" in msg, msg
    assert float(msg.split("RankError ")[1].split(" s after")[0]) < 20, msg  # at once, not after a timeout
    assert took < 60, took
    d = Path(root, "killed")
    assert sorted(p.name for p in d.iterdir()) == sorted(["autotp-checkpoint.json", committed_save(d)])  # no other
    for rank, res in enumerate(main):
        assert res["killed_load"] == [], (rank, res["killed_load"][:4])  # load_sharded: the previous save, exactly
    autotp.consolidate(d, Path(root, "killed_merged_after"))  # here: no process group
    before, after = (load_file(str(Path(root, n, "model.safetensors")))
                     for n in ("killed_merged_before", "killed_merged_after"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_files_of_different_saves_are_refused(main):
    for rank, res in enumerate(main):
        got = res["mixed: load"]
        assert got.startswith("CheckpointError:") and "the files come from different saves" in got, (rank, got)
        assert "rank00001-of-00002.safetensors" in got and res["second_save"] in got, got  # which file, expected
        assert "carries save 'autotp-" in got and got.count("autotp-0") >= 3, got  # found: save A's id too
    got = main[0]["mixed: consolidate"]
    assert got.startswith("CheckpointError:") and "the files come from different saves" in got, got
    assert main[0]["mixed: nothing written"]


def test_consolidate_replaces_an_earlier_checkpoint(main):
    m = main[0]
    assert "model.safetensors.index.json" in m["x_before"] and "model.safetensors" not in m["x_before"], m
    assert m["y_before"] == ["config.json", "generation_config.json", "model.safetensors"], m["y_before"]
    assert m["x_after"] == ["config.json", "generation_config.json", "model.safetensors"], m["x_after"]
    assert m["z_before"] == m["x_before"], (m["z_before"], m["x_before"])
    for name in ("y", "z"):  # the new shards and index only
        shards = [f for f in m[f"{name}_after"] if f.startswith("model-")]
        assert m[f"{name}_after"] == ["config.json", "generation_config.json", *shards, "model.safetensors.index.json"]
        assert len(shards) > 2 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards), shards
    assert len(m["z_after"]) < len(m["z_before"]), (m["z_before"], m["z_after"])
    for name in ("x", "y", "z"):  # transformers reads model.safetensors before an index
        assert m[f"{name}: transformers"] == [], (name, m[f"{name}: transformers"][:4])  # the new weights
    for rank, res in enumerate(main):
        for name in ("x", "y"):  # autotp reads an index before model.safetensors
            assert res[f"{name}: autotp"] == [], (name, rank, res[f"{name}: autotp"][:4])  # the same, new weights


def test_consolidate_refuses_its_own_directory(main):
    m = main[0]
    for case in ("into itself", "into itself, as another path", "inside it", "inside its save"):
        got = m[case]
        assert got.startswith("CheckpointError: out_dir") and "sharded checkpoint directory" in got, (case, got)
        assert "pass another out_dir" in got, got
    assert "is the sharded" in m["into itself"] and "is inside the sharded" in m["inside it"], m
    assert m["itself: files kept"]


def test_tied_embeddings_consolidate(main):
    m = main[0]
    assert m["x: stored once"] and m["x: tied"] and m["y: tied"]
    for name in ("x", "y", "z"):
        assert m[f"{name}: logits"] <= 1e-5, (name, m[f"{name}: logits"])
    assert m["sharded: logits"] <= 1e-5, m["sharded: logits"]


# ---------------------------------------------------------------------------------------------- one process
def test_manifest_and_plan_errors(main, root, tmp_path):
    import autotp

    src = Path(root, "ckpt")
    save = committed_save(src)

    def broken(edit) -> str:
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        edit(d)
        return error_of(lambda: autotp.consolidate(d, tmp_path / "out"))

    def manifest(**changes):
        def edit(d):
            m = json.loads((d / "autotp-checkpoint.json").read_text())
            (d / "autotp-checkpoint.json").write_text(json.dumps({**m, **changes}))
        return edit

    got = {
        "no manifest": broken(lambda d: (d / "autotp-checkpoint.json").unlink()),
        "earlier layout": broken(lambda d: [(d / "autotp-checkpoint.json").unlink(),
                                            shutil.copy(d / save / "autotp.plan", d)]),
        "not JSON": broken(lambda d: (d / "autotp-checkpoint.json").write_text("{")),
        "newer version": broken(manifest(version=2)),
        "save outside": broken(manifest(save="../elsewhere")),
        "save gone": broken(lambda d: shutil.rmtree(d / save)),
        "rank file gone": broken(lambda d: (d / save / "rank00001-of-00002.safetensors").unlink()),
        "plan edited": broken(lambda d: (d / save / "autotp.plan").write_text(
            (d / save / "autotp.plan").read_text() + "# edited\n")),
        "no such directory": error_of(lambda: autotp.consolidate(tmp_path / "nothing", tmp_path / "out")),
    }
    expected = {
        "no manifest": ["has no autotp-checkpoint.json", "its save did not finish", "autotp.save_sharded"],
        "earlier layout": ["has no autotp-checkpoint.json", "earlier autotp"],
        "not JSON": ["is not readable JSON"],
        "newer version": ["version 2", "reads 'autotp-sharded' version 1", "the autotp that saved it"],
        "save outside": ["is malformed", "'../elsewhere'"],
        "save gone": ["lacks", "rank00000-of-00002.safetensors"],
        "rank file gone": ["lacks ['rank00001-of-00002.safetensors']", "on all 2 ranks"],
        "plan edited": ["autotp.plan' has sha256", "the plan file was changed after the save"],
        "no such directory": ["is not a directory"],
    }
    for case, words in expected.items():
        assert got[case].startswith("CheckpointError:") and all(w in got[case] for w in words), (case, got[case])
    assert not (tmp_path / "out").exists()  # every refusal before anything was written
