"""`halfbyte train --train.weight_decay_on`: matrices (the default) trains with the GPT groups, no
weight decay on the embedding (tied output projection included) and the norms; all puts every
parameter in one group. What the engine trained with is read back from its checkpoints (the
`optimizer.param_groups.<fqn>.weight_decay` entries it writes from its groups). A resume that changes
the option is refused in one line, and a checkpoint written before the option existed resumes as
`all`, what it trained with. Runs call train_main in this process on 2 virtual CPU ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from halfbyte.cli import main
from halfbyte.train.cli import train_main
from halfbyte.train.config import parse_args
from halfbyte.train.loop import build_run_model, run_param_groups

SMALL = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--seq_len=16", "--batch-size=4",
         "--eval_tokens=64", "--eval_interval=0", "--log_interval=1", "--sample_tokens=0", "--steps=2",
         "--checkpoint_interval=1", "--keep_checkpoints=2", "--virtual-ranks=2", "--train.device=cpu",
         "--preset=baseline"]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load in this process
NO_DECAY = ["wte.weight", "ln_f.weight", "blocks.0.ln_attn.weight", "blocks.0.ln_mlp.weight"]


def _decay_of(ckpt: Path) -> dict[str, float]:
    """fqn -> the weight decay the checkpoint's engine trained that parameter with."""
    meta = json.loads((ckpt / "meta.json").read_text())
    names = [n for n, _ in meta["engines"][""]["params"]]
    entries = {f"optimizer.param_groups.{n}.weight_decay": None for n in names}
    dcp.load(entries, checkpoint_id=str(ckpt))
    return {n: entries[f"optimizer.param_groups.{n}.weight_decay"] for n in names}


def _run(out: Path, *args: str) -> Path:
    assert train_main([*SMALL, f"--out={out}", *args]) == 0
    return out / "checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_cache) -> Path:
    """Two 2-step runs (checkpoints at steps 1 and 2), weight decay 0.5 on matrices and on all."""
    root = tmp_path_factory.mktemp("weight-decay")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HALFBYTE_CACHE", str(token_cache))
        _run(root / "matrices", "--optim.weight_decay=0.5")
        _run(root / "all", "--optim.weight_decay=0.5", "--train.weight_decay_on=all")
    return root


def test_the_groups_of_each_option():
    cfg = parse_args(["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--seq_len=16"])
    assert cfg.train.weight_decay_on == "matrices"
    model = build_run_model(cfg, 64)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = run_param_groups(cfg, model)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (cfg.optim.weight_decay, 0.0)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(NO_DECAY)
    cfg.train.weight_decay_on = "all"
    (one,) = run_param_groups(cfg, model)
    assert one["weight_decay"] == cfg.optim.weight_decay and len(one["params"]) == len(names)


@pytest.mark.timeout(300)
def test_the_trainer_trains_with_the_groups_of_the_option(runs):
    matrices = _decay_of(runs / "matrices" / "checkpoints" / "step_000002")
    assert sorted(n for n, wd in matrices.items() if wd == 0.0) == sorted(NO_DECAY)
    assert {wd for n, wd in matrices.items() if n not in NO_DECAY} == {0.5}
    assert all(n.startswith("blocks.0.") and n.endswith(".weight") for n in matrices if n not in NO_DECAY)
    assert set(_decay_of(runs / "all" / "checkpoints" / "step_000002").values()) == {0.5}


def test_a_bad_value_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "run"), "--train.weight_decay_on", "norms"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["halfbyte train: error: unknown --train.weight_decay_on 'norms'; use matrices | all"]


@pytest.mark.timeout(300)
def test_a_resume_may_not_change_it(runs, tmp_path, capsys):
    ckpt = runs / "matrices" / "checkpoints" / "step_000001"
    capsys.readouterr()
    assert main(["train", f"--out={tmp_path / 'run'}", f"--resume={ckpt}", "--train.weight_decay_on=all"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(
        "halfbyte train: error: --resume: --train.weight_decay_on would change what the run computes "
        "(saved 'matrices', given 'all')"), err


@pytest.mark.timeout(300)
def test_a_checkpoint_from_before_the_option_resumes_as_all(runs, tmp_path, capsys):
    """Its saved options lack train.weight_decay_on; it trained with decay on every parameter."""
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "step_000001"
    shutil.copytree(runs / "all" / "checkpoints" / "step_000001", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["extra"]["config"]["train"]["weight_decay_on"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["train", f"--out={out}", f"--resume={ckpt}", "--train.weight_decay_on=matrices"]) == 2
    assert "(saved 'all', given 'matrices')" in capsys.readouterr().err
    assert train_main([f"--out={out}", f"--resume={ckpt}"]) == 0  # the run's own options: all
    assert set(_decay_of(out / "checkpoints" / "step_000002").values()) == {0.5}
