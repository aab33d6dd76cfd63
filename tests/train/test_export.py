"""`halfbyte export`: a checkpoint's fp32 masters, whole, by name, into a fresh model (and into
transformers for an `hf:` model); bad input is one line and exit 2."""

import importlib.util
import json
import shutil

import pytest
import torch

from halfbyte.cli import main
from halfbyte.comm import CommConfig
from halfbyte.engine import ShardedDataParallel, VirtualWorld
from halfbyte.train.cli import train_main
from halfbyte.train.model import build_model

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=4",
         "--eval_tokens=256", "--log_interval=1", "--sample_tokens=0", "--virtual-ranks=2", "--train.device=cpu"]


def _trained_engine(tmp_path):
    """A tiny GPT on 4 virtual ranks (qwd: the replica differs from the masters), 3 steps, saved."""
    torch.manual_seed(0)
    model = build_model("tiny", 128, n_layer=2, d_model=32, n_head=2, ctx=16)
    engine = ShardedDataParallel(model, VirtualWorld(4, 2), comm=CommConfig.preset("qwd"), bucket_numel=5000)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for r in range(4):
            x = torch.randint(0, 128, (2, 16), generator=g)
            with engine.as_rank(r):
                torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten()).backward()
        engine.step(1e-2)
        engine.zero_grad()
    path = tmp_path / "ckpt"
    engine.save_checkpoint(path, {"step": 3})
    return model, engine, path


def test_pt_and_safetensors_hold_the_fp32_masters_and_load_into_a_fresh_model(tmp_path):
    model, engine, ckpt = _trained_engine(tmp_path)
    masters = engine.full_state_dict()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "pt"), "--format", "pt"]) == 0
    state = torch.load(tmp_path / "pt" / "model.pt")
    for name, t in masters.items():
        assert torch.equal(state[name], t), name  # the masters, not the (qwd, one step behind) replica
    assert any(not torch.equal(masters[n], p.detach()) for n, p in model.named_parameters())
    fresh = build_model("tiny", 128, n_layer=2, d_model=32, n_head=2, ctx=16)
    fresh.load_state_dict(state)  # strict: every name, tied embeddings included
    assert json.loads((tmp_path / "pt" / "export.json").read_text())["step"] == 3
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import load_file

        assert main(["export", str(ckpt), "--out", str(tmp_path / "st")]) == 0
        loaded = load_file(str(tmp_path / "st" / "model.safetensors"))
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nothing", "--out", "{tmp}/o"], "nothing does not exist; pass a checkpoint or a run directory"),
    (["{tmp}/full", "--out", "{tmp}/o"], "is neither a complete checkpoint nor a run directory"),
    (["{ckpt}", "--out", "{tmp}/o", "--format", "onnx"], "--format must be one of safetensors, hf, pt"),
    (["{ckpt}", "--out", "{tmp}/o", "--format", "hf"], "--format hf is for runs of --model hf:<dir>"),
    (["{ckpt}", "--out", "{tmp}/full"], "exists and is not an empty directory"),
    (["{ckpt}", "--out", "{tmp}/full/keep.txt/sub"], "keep.txt is a file, not a directory"),  # was [Errno 20]
    (["{ckpt}", "--out", "{tmp}/o", "--island", "1"], "holds one model (no islands)"),
    (["{no_extra}", "--out", "{tmp}/o"], "meta.json lacks its run's entry (extra)"),  # a KeyError before
    (["{garbage}", "--out", "{tmp}/o"], "could not be read ("),  # sizes intact: a traceback before
])
def test_bad_export_input(args, message, tmp_path, capsys, recwarn):
    _, _, ckpt = _trained_engine(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    no_extra = tmp_path / "no-extra"
    shutil.copytree(ckpt, no_extra)
    meta = json.loads((no_extra / "meta.json").read_text())
    del meta["extra"]
    (no_extra / "meta.json").write_text(json.dumps(meta))
    garbage = tmp_path / "garbage"
    shutil.copytree(ckpt, garbage)
    for data in garbage.glob("*.distcp"):
        data.write_bytes(b"\x80" * data.stat().st_size)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(ckpt)).replace("{no_extra}", str(no_extra))
            .replace("{garbage}", str(garbage)) for a in args]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not recwarn.list, [str(w.message) for w in recwarn]  # a warning would be a second line on stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # nothing overwritten


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the .[hf] extra")
def test_hf_run_exports_a_directory_transformers_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    hf_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=4096)).save_pretrained(hf_dir)
    out = tmp_path / "run"
    assert train_main([*SMALL[3:], "--model", f"hf:{hf_dir}", "--steps=2", f"--out={out}"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "pt"), "--format", "pt"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    masters = torch.load(tmp_path / "pt" / "model.pt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, masters[f"hf.{name}"]), name
    # the tied output embedding is the input one, as trained
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
