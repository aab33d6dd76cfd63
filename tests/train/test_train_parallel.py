"""`halfbyte train --virtual-ranks` and local updates (`--outer`): virtual ranks against real gloo workers,
outer steps, checkpoints, and the errors. Runs call train_main in this process (virtual ranks stay here;
real workers are spawned), single-threaded so that real and virtual ranks do the same float arithmetic."""

import json
import math
from pathlib import Path

import pytest
import torch

from halfbyte.train.cli import train_main

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=8",
         "--lr=1e-2", "--warmup_steps=2", "--min_lr=1e-3", "--eval_tokens=512", "--log_interval=1",
         "--sample_tokens=0"]
# metrics.jsonl keeps 5 decimals of the loss: equal runs agree to its last digit
TOL = 1e-5
# virtual ranks on the CPU, like the local workers they are compared with (a GPU's float differs: 5e-5)
CPU = "--train.device=cpu"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One thread here and in spawned workers (conftest.py restores the signal handlers)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _threads() -> int:
    return torch.get_num_threads()


@pytest.mark.timeout(60)
def test_spawned_workers_keep_omp_num_threads():
    """The comparisons below need the workers single-threaded like this process: with OMP_NUM_THREADS=1
    set, spawn gave each worker cpu_count // nprocs threads all the same (8 on a 16-core host), whose
    other CPU reduction order moved step 3's grad_norm by 2e-5 (3.12146 vs 3.12144)."""
    from halfbyte.comm import spawn

    assert spawn(_threads, 1, backend=None, timeout_s=50) == [1]


def _train(out: Path, *args: str) -> list[dict]:
    assert train_main([*SMALL, f"--out={out}", *args]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=TOL), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=TOL), (x, y)


@pytest.mark.timeout(240)
def test_virtual_ranks_equal_real_workers_and_resume(tmp_path, capfd):
    steps = ["--steps=4", "--preset=baseline", "--eval_interval=4"]
    real = _train(tmp_path / "real", *steps, "--workers=2", "--train.gpus_per_node=1")
    virtual = _train(tmp_path / "virtual", *steps, "--virtual-ranks=2", CPU, "--checkpoint_interval=2",
                     "--keep_checkpoints=2")
    _same_losses(real, virtual)
    assert virtual[-1]["val_loss"] == pytest.approx(real[-1]["val_loss"], abs=TOL)
    # wire bytes: emulated as W x one real rank's, equal to what the 2 workers counted
    for key in ("wire_intra_bytes", "wire_inter_bytes", "wire_bf16_bytes"):
        assert virtual[-1][key] == real[-1][key]
    assert real[-1]["wire_inter_bytes"] > 0
    assert "emulated: what 2 real ranks would send" in capfd.readouterr().out

    # resume from step 2 retraces steps 3..4
    _train(tmp_path / "virtual", *steps, "--virtual-ranks=2", CPU,
           f"--resume={tmp_path / 'virtual' / 'checkpoints' / 'step_000002'}")
    _same_losses(virtual, [json.loads(l) for l in (tmp_path / "virtual" / "metrics.jsonl").read_text().splitlines()])


@pytest.mark.timeout(120)
def test_virtual_two_level_preset_on_2x2_layout(tmp_path, capfd):
    metrics = _train(tmp_path / "run", "--steps=6", "--preset=sdp4bit", "--virtual-ranks=4",
                     "--virtual-gpus-per-node=2", "--eval_interval=0")
    out = capfd.readouterr().out
    assert "4 virtual ranks: 2 node(s) x 2 rank(s) per node" in out
    last = metrics[-1]
    assert last["loss"] < metrics[0]["loss"] - 0.5
    # int8 inside a node and int4 across: both links used, far below bf16
    assert last["wire_intra_bytes"] > 0 and last["wire_inter_bytes"] > 0
    assert last["wire_intra_bytes"] + last["wire_inter_bytes"] < last["wire_bf16_bytes"] / 2.5


@pytest.mark.timeout(240)
def test_islands_average_every_step_trains(tmp_path, capfd):
    metrics = _train(tmp_path / "run", "--steps=6", "--preset=baseline", "--workers=2", "--islands=2",
                     "--outer=average", "--local-steps=1", "--eval_interval=0")
    assert [r["outer_steps"] for r in metrics] == list(range(1, 7))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    # islands of one rank: no traffic inside them, every step an fp32 exchange across them
    assert metrics[-1]["wire_inter_bytes"] == 0 and metrics[-1]["wire_island_bytes"] > 0
    assert "local updates: 6 outer steps (average, every 1 steps, 2 islands)" in capfd.readouterr().out


@pytest.mark.timeout(300)
def test_sign_momentum_resume_and_virtual_islands(tmp_path):
    outer = ["--steps=8", "--preset=qwd", "--islands=2", "--outer=sign-momentum", "--local-steps=4",
             "--outer-bits=4", "--eval_interval=0"]
    first = _train(tmp_path / "real", *outer, "--workers=2", "--checkpoint_interval=6", "--keep_checkpoints=2")
    assert [r["outer_steps"] for r in first] == [0, 0, 0, 1, 1, 1, 1, 2]
    # int4 pseudo-gradients (+ their qWD gather): an outer step sends < 1/3 of one every-step bf16 step
    assert 0 < first[-1]["wire_island_bytes"] / 2 < first[0]["wire_bf16_bytes"] / 3

    # resuming mid-round (step 6: residual, momentum and round start saved) continues identically
    resumed = _train(tmp_path / "real", *outer, "--workers=2",
                     f"--resume={tmp_path / 'real' / 'checkpoints' / 'step_000006'}")
    _same_losses(first, resumed)
    assert [r["outer_steps"] for r in resumed] == [r["outer_steps"] for r in first]

    # two islands of one virtual rank each follow the two real islands
    virtual = _train(tmp_path / "virtual", *outer, "--virtual-ranks=2", CPU)
    _same_losses(first, virtual)
    assert [(r["outer_steps"], r["wire_island_bytes"]) for r in virtual] == \
        [(r["outer_steps"], r["wire_island_bytes"]) for r in first]


def test_outer_bits_2_trains_and_sends_what_the_accounting_predicts(tmp_path):
    """`--outer-bits 2`: int2 pseudo-gradients (symmetric: levels -1, 0, +1, stochastic, H32, with
    error feedback) on 2 virtual islands of one rank: it trains, and each outer step sends what
    comm.accounting says for int2: per island one reduce-scatter chunk and one qWD all-gather chunk
    of ceil(N/2) values, 32 bytes of levels + 2 of scale per group of 128 (vs 64 + 2 for int4)."""
    from halfbyte.comm.accounting import all_gather_bytes, chunk_numel, reduce_scatter_bytes
    from halfbyte.quant import QuantSpec

    outer = ["--steps=8", "--preset=baseline", "--virtual-ranks=2", CPU, "--islands=2", "--outer=sign-momentum",
             "--local-steps=4", "--eval_interval=0"]
    int2 = _train(tmp_path / "int2", *outer, "--outer-bits=2")
    int4 = _train(tmp_path / "int4", *outer, "--outer-bits=4")
    assert [r["outer_steps"] for r in int2] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert int2[-1]["loss"] < int2[0]["loss"] - 0.5
    meta = json.loads((tmp_path / "int2" / "checkpoints" / "step_000008" / "meta.json").read_text())
    numel = sum(math.prod(shape) for _, shape in meta["engines"]["island0."]["params"])
    spec = QuantSpec(bits=2, group_size=128, rounding="stochastic", hadamard=32)
    per_island = (reduce_scatter_bytes(numel, spec, 2, 1)["inter"]
                  + all_gather_bytes(chunk_numel(numel, 2), spec, 2, 1)["inter"])
    assert [r["wire_island_bytes"] for r in int2] == [0, 0, 0] + [2 * per_island] * 4 + [4 * per_island]
    assert int2[-1]["wire_island_bytes"] * 66 == int4[-1]["wire_island_bytes"] * 34
    assert int2[-1]["wire_intra_bytes"] == int2[-1]["wire_inter_bytes"] == 0  # islands of one rank


@pytest.mark.parametrize("args, message", [
    (["--virtual-ranks=-1"], "--virtual-ranks must be >= 1"),
    (["--virtual-ranks=4", "--virtual-gpus-per-node=3"], "--virtual-gpus-per-node=3 does not divide"),
    (["--virtual-ranks=2", "--workers=4"], "drop --workers=4"),
    (["--virtual-ranks=3"], "--batch-size=8 is not divisible by virtual ranks x micro-batch = 3 x"),
    (["--virtual-ranks=2", "--model.dropout=0.1"], "--virtual-ranks needs --model.dropout=0"),
    (["--train.device=cpu"], "--train.device=cpu chooses where virtual ranks run"),
    (["--virtual-ranks=2", "--train.device=tpu"], "unknown device 'tpu'"),
    (["--outer=average", "--local-steps=0"], "OuterConfig.local_steps (tau) must be an integer >= 1"),
    (["--outer=adam"], "OuterConfig.optimizer must be one of"),
    (["--outer=average", "--outer-bits=3"], "[outer.spec]: QuantSpec.bits must be 2, 4 or 8, got 3"),
    (["--outer=average", "--outer-bits=2", "--outer.spec.group_size=66"],
     "[outer.spec]: QuantSpec.group_size must be a multiple of 4 with bits=2 (four values per byte), got 66"),
    (["--outer=nesterov", "--outer.weight_decay=0.1"], "weight_decay is only used by 'sign-momentum'"),
    (["--outer=average", "--workers=2", "--islands=3"], "islands (3) must divide the world size (2)"),
    (["--outer=average", "--workers=2", "--islands=2"], "each of the 2 islands has 1 node"),
    (["--outer=average", "--virtual-ranks=12", "--virtual-gpus-per-node=4", "--islands=2", "--preset=qwd"],
     "an island of 6 ranks must hold whole nodes of 4 ranks"),
])
def test_bad_parallel_options(args, message, capsys):
    assert train_main([*SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_virtual_ranks_under_torchrun_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train_main([*SMALL, "--virtual-ranks=2"]) == 2
    assert "start it without torchrun" in capsys.readouterr().err


def test_help_lists_the_new_options():
    from halfbyte.train.config import help_text

    text = help_text()
    for flag in ("--virtual-ranks", "--virtual-gpus-per-node", "--outer ", "--local-steps", "--islands",
                 "--outer-bits", "--outer.error_feedback"):
        assert flag in text, flag
    assert "tau, inner steps between outer steps (default: 12)" in text
    assert "(default: 'none')" in text


def test_run_that_sent_nothing_still_summarizes(tmp_path, capsys):
    """Islands of one rank stopped before their first outer step send no byte: the summary says so
    (it divided by the bytes sent before)."""
    rows = _train(tmp_path / "run", "--virtual-ranks=2", "--islands=2", "--outer=average", "--local-steps=4",
                  "--steps=2", "--preset=baseline", "--eval_interval=0")
    assert rows[-1]["wire_island_bytes"] == 0 and rows[-1]["outer_steps"] == 0
    assert "(nothing was sent)" in capsys.readouterr().out


def test_a_delayed_outer_exchange_is_applied_at_the_end_of_training(tmp_path):
    # tau 3, delay 1, 6 steps: round 1's exchange starts at step 3 and lands at step 4; round 2's
    # starts at step 6, the last, and the trainer flushes it there, bytes included
    records = _train(tmp_path / "delayed", "--steps=6", "--preset=baseline", "--virtual-ranks=2", CPU,
                     "--islands=2", "--outer=average", "--local-steps=3", "--outer.delay=1", "--eval_interval=0")
    assert [r["outer_steps"] for r in records] == [0, 0, 0, 1, 1, 2]
    island = [r["wire_island_bytes"] for r in records]
    assert island[3] > 0 and island[5] == 2 * island[3]


@pytest.mark.timeout(240)
def test_codec_bits_from_the_command_line_change_the_wire_bytes_as_the_accounting_predicts(tmp_path):
    # 2 real gloo workers as 2 nodes x 1, one bucket: the gradients' int4 -> int8 inter-node hop
    # (--comm.grad_spec.bits 8) adds exactly what reduce_scatter_two_level_bytes says, per rank and
    # step; the weights' bytes (qWD int4) are the same in both runs
    from halfbyte.comm.accounting import reduce_scatter_two_level_bytes
    from halfbyte.comm.config import CommConfig
    from halfbyte.engine.buffers import shard_numel_for

    common = ["--steps=2", "--preset=sdp4bit", "--eval_interval=0", "--workers=2", "--train.gpus_per_node=1",
              "--train.weight_decay_on=all", "--engine.bucket_numel=100000000"]
    int4 = _train(tmp_path / "int4", *common)
    int8 = _train(tmp_path / "int8", *common, "--comm.grad_spec.bits=8")
    meta = json.loads((tmp_path / "int8" / "checkpoints" / "step_000002" / "meta.json").read_text())
    numel = sum(math.prod(shape) for _, shape in meta["engines"][""]["params"])
    inter = {}
    for bits in (4, 8):
        comm = CommConfig.preset("sdp4bit")
        comm = CommConfig.from_dict({**comm.to_dict(), "grad_spec": {**comm.to_dict()["grad_spec"], "bits": bits}})
        padded = 2 * shard_numel_for(numel, 2, comm.alignment)
        inter[bits] = reduce_scatter_two_level_bytes(padded, comm.grad_intra_spec, comm.grad_spec, 2, 1)["inter"]
    assert meta["engines"][""]["comm"]["grad_spec"]["bits"] == 8
    for a, b in zip(int4, int8):
        assert b["wire_inter_bytes"] - a["wire_inter_bytes"] == a["step"] * 2 * (inter[8] - inter[4]), (a, b)
        assert a["wire_intra_bytes"] == b["wire_intra_bytes"] == 0
