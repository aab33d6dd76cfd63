"""`halfbyte bench train`: rows for every preset on 2 gloo ranks (2 emulated nodes), wire bytes equal
to the accounting formulas, phases that add up to the step, the timing of nested codec/wait
intervals, a world of one rank, where results go by default, and bad options."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from halfbyte.bench import train_bench
from halfbyte.comm import accounting, timing
from halfbyte.comm.config import CommConfig

PRESETS = ["baseline", "zeropp", "sdp4bit"]
FP32_BYTES = 4


def _expected_wire(comm: CommConfig, buckets: list[dict], nodes: int, gpus: int) -> dict[str, int]:
    """Bytes one rank sends per step by the accounting formulas: one weight all-gather and one
    gradient reduce-scatter per bucket (fp32 replica on CPU)."""
    total = {"intra": 0, "inter": 0}
    for b in buckets:
        weights = accounting.all_gather_bytes(b["shard_numel"], comm.weight_spec or FP32_BYTES, nodes, gpus)
        if comm.grads == "two-level":
            grads = accounting.reduce_scatter_two_level_bytes(b["padded_numel"], comm.grad_intra_spec,
                                                              comm.grad_spec, nodes, gpus)
        else:
            grads = accounting.reduce_scatter_bytes(b["padded_numel"], comm.grad_spec or FP32_BYTES, nodes, gpus)
        for link in total:
            total[link] += weights[link] + grads[link]
    return total


@pytest.mark.timeout(180)
def test_two_workers_two_nodes_every_preset(tmp_path):
    out = tmp_path / "bench.json"
    rc = train_bench.main(["--workers", "2", "--gpus-per-node", "1", "--steps", "2", "--warmup", "1",
                           "--micro-batch", "2", "--seq-len", "64", "--presets", ",".join(PRESETS),
                           "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["world_size"] == 2 and meta["topology"] == {"nodes": 2, "gpus_per_node": 1}
    assert meta["command"].startswith("halfbyte bench train --workers 2") and meta["notes"] == []
    assert [(r["model"], r["preset"]) for r in rows] == [("tiny", p) for p in PRESETS]
    by_preset = {r["preset"]: r for r in rows}
    for r in rows:
        comm = CommConfig.preset(r["preset"])
        assert r["comm"] == comm.describe() and r["notes"] == [] and r["engine"] == "halfbyte"
        assert r["tokens_per_step"] == 2 * 64 * 2
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1e3))
        phases = sum(r[f"{p}_ms"] for p in train_bench.PHASES)
        assert phases == pytest.approx(r["step_ms"], rel=0.02)
        assert 0 <= r["codec_ms"] < r["step_ms"] and 0 <= r["exposed_comm_ms"] < r["step_ms"]
        assert r["codec_pct"] == pytest.approx(100 * r["codec_ms"] / r["step_ms"])
        assert sum(r["codec_ms_by_step"].values()) == pytest.approx(r["codec_ms"])
        assert r["peak_mem_bytes"] > r["memory_report"]["total"]
        # CommStats (recorded from the actual buffers) == the accounting formulas
        assert r["wire_bytes_per_step"] == _expected_wire(comm, r["buckets"], 2, 1)
        # bf16: per bucket, one shard to the other rank in the all-gather and one in the reduce-scatter
        bf16 = {"intra": 0, "inter": sum(2 * b["shard_numel"] * 2 for b in r["buckets"])}
        assert r["bf16_bytes_per_step"] == bf16
        assert r["uncompressed_bytes_per_step"] == 2 * bf16["inter"]  # fp32 on CPU
    assert by_preset["baseline"]["codec_ms"] == 0 and by_preset["baseline"]["codec_ms_by_step"] == {}
    # bits per value vs bf16's 16 (weights + grads): zeropp (8 + 4) / 32, sdp4bit (4 + 4) / 32, plus scales
    for preset, ratio in (("zeropp", 0.40), ("sdp4bit", 0.26)):
        r = by_preset[preset]
        assert r["codec_ms"] > 0
        assert sum(r["wire_bytes_per_step"].values()) < ratio * r["bf16_bytes_per_step"]["inter"]
    assert set(by_preset["sdp4bit"]["codec_ms_by_step"]) >= {"encode_shard", "decode_gathered", "decode_sum"}
    # per bucket and step: the weight all-gather's two codec steps, the gradient's two (one rank per
    # node: the two-level reduce-scatter quantizes its messages directly, then decodes them)
    buckets = len(by_preset["sdp4bit"]["buckets"])
    assert by_preset["sdp4bit"]["codec_calls_per_step"] == {
        "decode_gathered": buckets, "decode_sum": buckets, "encode_shard": buckets, "pack_messages": buckets}
    assert by_preset["baseline"]["codec_calls_per_step"] == {}
    # overlap efficiency: the link measured by the probe, the compute-only step of a world of one
    assert meta["link_rate"].startswith("measured: bf16 all-gather") and meta["link_GBps"] > 0
    for r in rows:
        assert r["compute_only_ms"] == rows[0]["compute_only_ms"] > 0
        assert r["wire_ms"] == pytest.approx(sum(r["wire_bytes_per_step"].values()) / (meta["link_GBps"] * 1e6))
        assert r["overlap_efficiency"] == pytest.approx(r["step_ms"] / max(r["compute_only_ms"], r["wire_ms"]))


def test_a_given_link_rate_is_taken_as_is():
    """--link-gbps skips the probe (no collective: no topology needed); Gb/s -> bytes/s."""
    cfg = dataclasses.replace(_config(), link_gbps=8.0)
    assert train_bench.link_rate(cfg, topo=None) == 1e9


def _config() -> train_bench.BenchConfig:
    args = train_bench._parser().parse_args(["--models", "tiny"])
    return train_bench.resolve(args, "test", on_gpu=False)


@pytest.mark.timeout(120)
def test_world_of_one_runs_two_level_presets_one_level(tmp_path, capsys):
    out = tmp_path / "one.json"
    rc = train_bench.main(["--steps", "1", "--warmup", "0", "--micro-batch", "1", "--seq-len", "32",
                           "--engine", "halfbyte,fsdp2", "--presets", "sdp4bit", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sdp4bit: 1 node: two-level gradients run one level" in printed and "codec %" in printed
    row, fsdp2_row = json.loads(out.read_text())["rows"]
    assert row["comm"].startswith("weights qwd") and "grads one-level int4/g128/sr/H32" in row["comm"]
    assert row["wire_bytes_per_step"] == {"intra": 0, "inter": 0} and row["codec_ms"] > 0
    assert row["overlap_efficiency"] is None and row["wire_ms"] is None  # a world of one: no wire
    # FSDP2 on one rank runs no collective: no codec share to show, and the row says why
    assert fsdp2_row["codec_ms"] is None and fsdp2_row["codec_pct"] is None
    assert "fsdp2 on a world of 1: FSDP2 calls no collective" in " ".join(fsdp2_row["notes"])
    assert "FSDP2 calls no collective, so its rows measure nothing of the codec" in printed


def test_recorder_separates_codec_inside_waits():
    rec = train_bench.Recorder(torch.device("cpu"))

    def codec(name: str = "decode_sum", seconds: float = 0.05) -> None:
        with timing.region("codec", name):
            time.sleep(seconds)

    def transfer_then_decode() -> None:
        with timing.region("wait", "comm"):
            time.sleep(0.1)
            codec()

    def pack_inside_encode() -> None:  # nested steps count once, as the outermost
        with timing.region("codec", "encode_chunks"):
            codec("pack_messages", 0.02)

    with timing.installed(rec):
        rec.active, rec.phase = True, "optimizer"
        codec()  # outside any wait
        transfer_then_decode()
        pack_inside_encode()
        rec.active = False
        codec()  # not recorded
    codec()  # no timer installed any more
    t = rec.totals()
    assert t["codec"] == pytest.approx(0.12, abs=0.03) and t["codec:decode_sum"] == pytest.approx(0.1, abs=0.03)
    assert t["codec:encode_chunks"] == pytest.approx(0.02, abs=0.015) and "codec:pack_messages" not in t
    assert t["exposed"] == pytest.approx(0.1, abs=0.03) and t["exposed:optimizer"] == t["exposed"]
    assert rec.calls == {"decode_sum": 2, "encode_chunks": 1}


def test_results_default_under_runs_bench_of_the_current_directory(tmp_path, monkeypatch, capsys):
    """Without --out the JSON lands in ./runs/bench/ (ignored by git), never in benchmarks/results/,
    and the run says where."""
    monkeypatch.chdir(tmp_path)
    assert train_bench.main(["--models", "tiny", "--steps", "1", "--warmup", "0", "--micro-batch", "1",
                             "--seq-len", "16", "--presets", "baseline"]) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert [str(p.parent) for p in written] == ["runs/bench"] and written[0].name.startswith("bench-train-")
    assert f"wrote {written[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--presets", "baseline,nope"], "--presets ['nope']: choose from plain, baseline"),
    (["--models", "7b"], "--models ['7b']: choose from tiny"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the context of model tiny (128)"),
    (["--workers", "3", "--gpus-per-node", "2"], "--gpus-per-node 2 must divide --workers 3"),
    (["--dtype", "fp8"], "--dtype must be one of auto, bf16, fp32"),
    (["--vocab-size", "1"], "--vocab-size must be >= 2"),
    (["--engine", "ddp"], "--engine ['ddp']: choose from halfbyte, fsdp2"),
    (["--presets", "plain"], "--presets plain is FSDP2 without halfbyte: add --engine fsdp2"),
    (["--link-gbps", "0"], "--link-gbps must be a positive number"),
    (["--out", "."], "--out . is a directory; name the file"),  # a traceback after the whole run before
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    assert train_bench.main(["--models", "tiny", *argv]) == 2  # a later --models wins
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_world_of_one_on_cuda_times_with_events(tmp_path):
    """The CUDA path times with events, read only after the device synchronized (CPU tests use clocks)."""
    out = tmp_path / "gpu.json"
    rc = train_bench.main(["--models", "tiny", "--steps", "2", "--warmup", "1", "--micro-batch", "2",
                           "--seq-len", "64", "--engine", "halfbyte,fsdp2", "--presets", "plain,baseline,sdp4bit",
                           "--out", str(out)])
    assert rc == 0
    rows = {(row["engine"], row["preset"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("halfbyte", "baseline"), ("halfbyte", "sdp4bit"), ("fsdp2", "plain"),
                         ("fsdp2", "baseline"), ("fsdp2", "sdp4bit")}
    assert rows["halfbyte", "sdp4bit"]["codec_ms"] > 0 and rows["halfbyte", "baseline"]["peak_mem_bytes"] > 0
    # FSDP2's mixed precision: bf16 all-gathers; on one GPU no collective runs, so no codec share
    assert rows["fsdp2", "sdp4bit"]["dtype"] == "bfloat16" and rows["fsdp2", "sdp4bit"]["codec_pct"] is None
    for row in rows.values():
        phases = sum(row[f"{p}_ms"] for p in train_bench.PHASES)
        assert row["step_ms"] > 0 and phases == pytest.approx(row["step_ms"], rel=0.05)
