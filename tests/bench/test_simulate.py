"""Cost model and `halfbyte simulate`: byte counts, monotonicity, exposure, published table, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from halfbyte.bench import comm as comm_bench
from halfbyte.bench import costmodel as cm
from halfbyte.bench import simulate, train_bench
from halfbyte.comm import accounting
from halfbyte.comm.config import CommConfig

MODES = list(CommConfig.preset_names())


def _setup(nodes=4, gpus=8, inter=100.0, compute=0.1, overlap=True, **kw):
    cluster = cm.Cluster(nodes, gpus, inter_gbps=inter)
    return cluster, cm.Workload(compute_s=compute, tokens_per_step=1 << 20, overlap=overlap, **kw)


# ---- byte counts -------------------------------------------------------------------------------
def test_weight_gather_bytes_follow_quantspec():
    M, L, shard = 4, 8, 1 << 20
    cluster, wl = _setup(M, L)
    comm = CommConfig.preset("sdp4bit")
    cost = cm.weight_gather_cost(comm, shard, 1, M, L, cluster, wl)
    ring_total = (M * L - 1) * comm.weight_spec.wire_nbytes(shard)  # a ring forwards W-1 shards
    assert cost.intra_bytes + cost.inter_bytes == pytest.approx(ring_total)
    assert cost.inter_bytes == pytest.approx(ring_total / L)  # one boundary hop per GPU and channel
    full = cm.weight_gather_cost(CommConfig.preset("baseline"), shard, 1, M, L, cluster, wl)
    assert full.intra_bytes + full.inter_bytes == pytest.approx((M * L - 1) * shard * 2)


def test_two_level_bytes_match_accounting_and_design_formula():
    M, L, numel = 4, 8, 32 * 1 << 20
    cluster, wl = _setup(M, L)
    comm = CommConfig.preset("sdp4bit")
    cost = cm.grad_reduce_cost(comm, numel, 1, M, L, cluster, wl)
    ref = accounting.reduce_scatter_two_level_bytes(numel, comm.grad_intra_spec, comm.grad_spec, M, L)
    assert (cost.intra_bytes, cost.inter_bytes) == (ref["intra"], ref["inter"])
    # DESIGN: inter bytes per GPU = N/L * (M-1)/M * bits/8 (exact here: N splits into whole groups)
    assert cost.inter_bytes == pytest.approx(numel / L * (M - 1) / M * comm.grad_spec.bits_per_value / 8)
    # One-level all-to-all puts L times more on the NIC than two-level.
    one = cm.grad_reduce_cost(replace(comm, grads="one-level", grad_intra_spec=None), numel, 1, M, L, cluster, wl)
    assert one.inter_bytes == pytest.approx(L * cost.inter_bytes)


def test_buckets_scale_linearly():
    cluster, wl = _setup()
    comm = CommConfig.preset("zeropp")
    one = cm.grad_reduce_cost(comm, 1 << 22, 1, 4, 8, cluster, wl)
    five = cm.grad_reduce_cost(comm, 1 << 22, 5, 4, 8, cluster, wl)
    assert five.inter_bytes == 5 * one.inter_bytes and five.seconds == pytest.approx(5 * one.seconds)


# ---- modes and bandwidth -----------------------------------------------------------------------
def test_baseline_speedup_is_one_and_quantized_modes_move_fewer_bytes():
    cluster, wl = _setup(inter=10.0)  # the NIC is the bottleneck
    est = {e.mode: e for e in cm.simulate(MODES, 1_300_000_000, cluster, wl)}
    assert est["baseline"].speedup == 1.0
    for mode in MODES[1:]:
        assert est[mode].inter_bytes < est["baseline"].inter_bytes, mode
        assert est[mode].speedup >= 1.0, mode
    assert est["sdp4bit"].inter_bytes < est["zeropp"].inter_bytes  # int4 vs int8 weights


@pytest.mark.parametrize("overlap", [True, False])
def test_speedup_monotone_in_bandwidth(overlap):
    """More inter-node bandwidth: every mode gets faster, and while the NIC is the bottleneck
    (here below ~228 Gb/s: the baseline ring puts 7/8 of its bytes on 1600 Gb/s NVLink, 1/8 on the
    NIC) compression matters less. Once overlap hides all but one bucket's fill/drain, the speedup
    may wobble by that much."""
    prev_step, prev_speedup = None, None
    for gbps in (10, 25, 50, 100, 150, 200):
        cluster, wl = _setup(inter=gbps, overlap=overlap)
        base, sdp = cm.simulate(["baseline", "sdp4bit"], 1_300_000_000, cluster, wl)
        if prev_step is not None:
            assert base.step_s <= prev_step[0] and sdp.step_s <= prev_step[1]
            assert sdp.speedup <= prev_speedup + (1e-3 if overlap else 1e-12)
        prev_step, prev_speedup = (base.step_s, sdp.step_s), sdp.speedup
    assert prev_speedup < 1.5


def test_codec_stays_on_the_critical_path_when_the_wire_is_hidden():
    """With overlap, compute hides wire time but not the codec (it runs on the compute stream):
    with compute long enough to hide everything, sdp4bit is slower than baseline by its codec."""
    cluster, wl = _setup(inter=400.0, compute=20.0)
    base, sdp = cm.simulate(["baseline", "sdp4bit"], 1_300_000_000, cluster, wl)
    assert sdp.codec_s > 0 and sdp.speedup < 1.0
    assert sdp.exposed_s - sdp.codec_s == pytest.approx(base.exposed_s, abs=0.02)  # one bucket's fill/drain
    assert sdp.step_s == pytest.approx(wl.compute_s + sdp.exposed_s)


def test_optimizer_time_hides_no_communication():
    """Moving compute from the passes into the optimizer keeps compute but exposes more wire time."""
    cluster, wl = _setup(inter=25.0, compute=0.3)
    for mode in ("baseline", "sdp4bit"):
        (free,) = cm.simulate([mode], 1_300_000_000, cluster, wl)[-1:]
        (opt,) = cm.simulate([mode], 1_300_000_000, cluster, replace(wl, optimizer_s=0.1))[-1:]
        assert opt.compute_s == free.compute_s and opt.step_s > free.step_s, mode
    with pytest.raises(ValueError, match="optimizer_s"):
        replace(wl, optimizer_s=0.5)


def test_compute_from_reads_the_baseline_row_of_bench_train(tmp_path, capsys):
    """--compute-from: the measured phases minus their waits, the optimizer rescaled to the target
    data-parallel size, tokens per step from the measured per-rank batch."""
    path = tmp_path / "train.json"
    # the model named: left to the default, a CUDA host would bench 125m, and no tiny row would exist
    assert train_bench.main(["--models", "tiny", "--steps", "1", "--warmup", "0", "--micro-batch", "2",
                             "--seq-len", "16", "--presets", "baseline", "--out", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    waits = row["exposed_comm_ms_by_phase"]
    fwd, bwd = row["forward_ms"] - waits["forward"], row["backward_ms"] - waits["backward"]
    opt = row["optimizer_ms"] - waits["optimizer"] + row["zero_grad_ms"]
    compute, optimizer, share, tokens = simulate.measured_compute(path, "tiny", 4)
    assert compute * 1e3 == pytest.approx(fwd + bwd + opt / 4) and optimizer * 1e3 == pytest.approx(opt / 4)
    assert share == pytest.approx(fwd / (fwd + bwd)) and tokens == 2 * 16

    # the CLI, with the row relabelled as a model simulate knows
    data = json.loads(path.read_text())
    data["rows"][0]["model"], data["meta"]["seq_len"] = "125m", {"125m": 16}
    path.write_text(json.dumps(data))
    out = tmp_path / "sim.json"
    assert simulate.main(["--model", "125m", "--nodes", "2", "--gpus-per-node", "2", "--modes", "baseline",
                          "--compute-from", str(path), "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["compute_s"] * 1e3 == pytest.approx(fwd + bwd + opt / 4)
    assert result["tokens_per_s"] * result["step_s"] == pytest.approx(4 * 2 * 16)

    for argv, message in ((["--model", "350m"], "no baseline row for model 350m"),
                          (["--model", "125m", "--compute-ms", "5"], "not both"),
                          (["--model", "125m", "--tokens-per-step", "7"], "32 tokens per rank")):
        assert simulate.main([*argv, "--compute-from", str(path)]) == 2
        assert message in capsys.readouterr().err
    path.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a `halfbyte bench train` JSON"):
        simulate.measured_compute(path, "125m", 1)


def test_nic_shared_per_node_is_l_times_slower():
    per_gpu = cm.Cluster(4, 8, inter_gbps=100, nic="per-gpu")
    per_node = replace(per_gpu, inter_gbps=800, nic="per-node")
    assert per_node.inter_bytes_per_s == pytest.approx(per_gpu.inter_bytes_per_s)


def test_all_to_all_efficiency_slows_only_all_to_all_wire_time():
    cluster, wl = _setup(nodes=2, gpus=4, inter=100.0)
    slow = replace(cluster, all_to_all_efficiency=0.5)
    numel = 1 << 24
    ring = cm.reduce_scatter_cost(None, None, numel, 1, 2, 4, cluster, wl, elem_bytes=2)
    assert cm.reduce_scatter_cost(None, None, numel, 1, 2, 4, slow, wl, elem_bytes=2) == ring
    spec = CommConfig.preset("sdp4bit").grad_spec
    for intra in (None, CommConfig.preset("sdp4bit").grad_intra_spec):  # one-level all-to-all, two-level
        fast = cm.reduce_scatter_cost(spec, intra, numel, 1, 2, 4, cluster, wl, elem_bytes=2)
        half = cm.reduce_scatter_cost(spec, intra, numel, 1, 2, 4, slow, wl, elem_bytes=2)
        latency = cm.reduce_scatter_cost(spec, intra, numel, 1, 2, 4, replace(cluster, intra_gbps=1e12,
                                         inter_gbps=1e12), wl, elem_bytes=2).wire_s
        assert half.wire_s - latency == pytest.approx(2 * (fast.wire_s - latency), rel=1e-6)
        assert (half.codec_s, half.intra_bytes, half.inter_bytes) == (fast.codec_s, fast.intra_bytes, fast.inter_bytes)
    with pytest.raises(ValueError, match="all_to_all_efficiency"):
        replace(cluster, all_to_all_efficiency=0.0)


# ---- exposure ----------------------------------------------------------------------------------
def test_exposure_without_overlap_is_all_communication():
    assert cm.exposed_time(0.3, 0.5, 10, 1.0, 2.0, overlap=False) == pytest.approx(0.8)


def test_exposure_with_overlap():
    # Cheap communication: only the first gather bucket and the last reduce bucket show.
    assert cm.exposed_time(0.1, 0.2, 10, 1.0, 2.0, overlap=True) == pytest.approx(0.01 + 0.02)
    # Communication longer than compute: the excess shows, plus the pipeline fill/drain.
    exposed = cm.exposed_time(3.0, 4.0, 10, 1.0, 2.0, overlap=True)
    assert exposed == pytest.approx((3.0 - 1.0 + 0.1) + (4.0 - 2.0 + 0.2))
    # A single bucket cannot overlap at all.
    assert cm.exposed_time(0.3, 0.5, 1, 1.0, 2.0, overlap=True) == pytest.approx(0.8)


def test_overlap_never_slower_than_exposed():
    for gbps in (10, 100, 400):
        cluster, wl = _setup(inter=gbps, overlap=True)
        for a, b in zip(cm.simulate(MODES, 2_700_000_000, cluster, wl),
                        cm.simulate(MODES, 2_700_000_000, cluster, replace(wl, overlap=False))):
            assert a.compute_s <= a.step_s <= b.step_s


def test_single_node_has_no_inter_traffic():
    cluster, wl = _setup(nodes=1, gpus=8)
    for est in cm.simulate(MODES, 350_000_000, cluster, wl):
        assert est.inter_bytes == 0 and est.intra_bytes > 0


def test_tp_pp_layout():
    cluster = cm.Cluster(16, 4)
    assert cm.dp_layout(cluster, 1, 1) == (16, 4)
    assert cm.dp_layout(cluster, 4, 1) == (16, 1)
    assert cm.dp_layout(cluster, 4, 2) == (8, 1)  # SDP4Bit's A100 13B/18B
    assert cm.dp_layout(cm.Cluster(16, 8), 4, 1) == (16, 2)
    assert cm.pipeline_bubble(2, 1) == 2.0 and cm.pipeline_bubble(4, 12) == pytest.approx(1.25)


# ---- the published table -----------------------------------------------------------------------
def test_model_shapes_and_flops():
    assert cm.MODELS["1.3b"].params == pytest.approx(1.3e9, rel=0.05)
    assert cm.MODELS["18b"].params == pytest.approx(18e9, rel=0.05)
    m = cm.MODELS["6.7b"]
    assert m.flops_per_token() == pytest.approx(6 * m.params, rel=0.25)  # 6N plus attention
    run = cm.SDP4BIT_TABLE2[-1]  # 18B on H800: 2.06 s and 0.50 s per step
    assert cm.published_step_s(run, run.baseline_tflops) == pytest.approx(2.06, rel=0.01)


def test_sdp4bit_h800_row_is_reproduced_by_the_fit():
    """One bandwidth and one compute rate explain all five H800 rows within 10 %."""
    runs = [r for r in cm.SDP4BIT_TABLE2 if r.platform == "h800"]
    fit = cm.fit_platform(runs)
    assert 20 < fit["inter_gbps_per_gpu"] < 200
    for r in runs:
        pred = cm.predict_run(r, fit["inter_gbps_per_gpu"], fit["compute_tflops"])
        assert pred["speedup"] == pytest.approx(r.speedup, rel=0.10), r.model


def test_implied_bandwidth_reproduces_both_published_step_times():
    run = cm.SDP4BIT_TABLE2[5]
    imp = cm.implied_bandwidth(run)
    params, cluster, wl = cm.published_setup(run, imp["inter_gbps_per_gpu"], imp["compute_s"])
    base, sdp = cm.simulate(["baseline", "sdp4bit"], params, cluster, wl)
    assert base.step_s == pytest.approx(imp["baseline_step_s"], rel=1e-6)
    assert sdp.step_s == pytest.approx(imp["sdp4bit_step_s"], rel=1e-4)


# ---- calibration against `halfbyte bench comm` records ------------------------------------------
def _wire(collective: str, mode: str, numel: int, M: int, L: int) -> dict[str, int]:
    """Bytes the collective records, straight from the accounting (what bench comm measures)."""
    spec, intra = comm_bench.MODES[mode]
    if collective == "all_gather":
        return accounting.all_gather_bytes(numel // (M * L), spec or 2, M, L)
    if intra is not None and L > 1:
        return accounting.reduce_scatter_two_level_bytes(numel, intra, spec, M, L)
    return accounting.reduce_scatter_bytes(numel, spec or 2, M, L)


def _synthetic_bench_file(path, M, L, alpha, link, codec) -> list[dict]:
    """A bench-comm JSON whose times follow the cost model exactly (s/step, s/byte, s/codec byte)."""
    records = []
    for collective in comm_bench.COLLECTIVES:
        for mode in comm_bench.MODES:
            if mode == "two-level" and collective == "all_gather":
                continue
            for numel in (1 << 16, 1 << 20, 1 << 22):
                rec = comm_bench.make_record(collective, mode, numel, M, L, [1.0], _wire(collective, mode, numel, M, L))
                steps, nbytes, cbytes = simulate._features(rec)
                t = alpha * steps + link * nbytes + codec * cbytes
                records.append(comm_bench.make_record(collective, mode, numel, M, L, [t * 1.1, t],
                                                      _wire(collective, mode, numel, M, L)))
    path.write_text(json.dumps({"meta": {"backend": "gloo"}, "records": records}))
    return records


def test_record_cost_models_each_bench_mode_with_its_algorithm(tmp_path):
    records = _synthetic_bench_file(tmp_path / "c.json", 2, 2, 1e-4, 1e-9, 1e-9)
    algorithms = {(r["collective"], r["mode"]): simulate.record_cost(r).algorithm for r in records}
    assert algorithms == {
        ("reduce_scatter", "bf16"): "ring", ("reduce_scatter", "int8"): "all-to-all",
        ("reduce_scatter", "int4"): "all-to-all", ("reduce_scatter", "int4+H"): "all-to-all",
        ("reduce_scatter", "two-level"): "two-level", ("all_gather", "bf16"): "ring",
        ("all_gather", "int8"): "ring", ("all_gather", "int4"): "ring", ("all_gather", "int4+H"): "ring"}
    # One GPU per node: the two-level reduce-scatter is its inter hop alone, as the collective runs it.
    rec = comm_bench.make_record("reduce_scatter", "two-level", 1 << 20, 2, 1, [1.0], {"intra": 0, "inter": 0})
    one = comm_bench.make_record("reduce_scatter", "int4+H", 1 << 20, 2, 1, [1.0], {"intra": 0, "inter": 0})
    assert simulate._features(rec) == simulate._features(one)


def test_calibrate_fits_one_layout_and_predicts_the_other(tmp_path):
    alpha, link, codec = 50e-6, 1 / 2e9, 1 / 0.5e9
    fit_path, other = tmp_path / "2x1.json", tmp_path / "2x2.json"
    _synthetic_bench_file(fit_path, 2, 1, alpha, link, codec)
    _synthetic_bench_file(other, 2, 2, alpha, link, codec)
    out = tmp_path / "cal.json"
    assert simulate.main(["--calibrate", str(fit_path), "--predict", str(other), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    fit, prediction = data["fit"], data["prediction"]
    assert fit["alpha_us"] == pytest.approx(50, rel=1e-6)
    assert fit["link_GBps"] == pytest.approx(2.0, rel=1e-6)
    assert fit["codec_GBps"] == pytest.approx(0.5, rel=1e-6)
    assert fit["max_abs_rel_error"] < 1e-6 and prediction["max_abs_rel_error"] < 1e-6
    assert all(r["wire_bytes_match"] for r in fit["rows"] + prediction["rows"])
    assert {r["nodes"] * r["gpus_per_node"] for r in prediction["rows"]} == {4}
    assert set(prediction["by_mode"]) == set(comm_bench.MODES)


def test_calibrate_keeps_coefficients_non_negative():
    # Times that fall with size would need a negative cost per byte: that term drops out instead.
    records = [comm_bench.make_record("all_gather", "bf16", n, 2, 1, [t], {"intra": 0, "inter": n})
               for n, t in ((1 << 16, 3e-3), (1 << 20, 2e-3), (1 << 22, 1e-3))]
    fit = simulate.calibrate(records)
    assert all(c >= 0 for c in fit["coefficients"].values())
    assert fit["link_GBps"] == float("inf") and fit["alpha_us"] > 0


@pytest.mark.timeout(120)
def test_bench_comm_output_feeds_calibrate(tmp_path):
    """A real (tiny) `halfbyte bench comm` run on 2 gloo ranks as 2 nodes, read by --calibrate as is:
    the bytes the collectives sent are the bytes the cost model prices."""
    bench = tmp_path / "comm.json"
    assert comm_bench.main(["--workers", "2", "--gpus-per-node", "1", "--sizes", "4K,16K", "--iters", "1",
                            "--warmup", "0", "--repeats", "2", "--out", str(bench)]) == 0
    data = json.loads(bench.read_text())
    assert data["meta"]["backend"] == "gloo" and data["meta"]["repeats"] == 2
    assert all(len(r["seconds_repeats"]) == 2 and r["seconds"] == min(r["seconds_repeats"])
               for r in data["records"])
    out = tmp_path / "cal.json"
    assert simulate.main(["--calibrate", str(bench), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["fit"]["rows"]
    assert len(rows) == 2 * 9  # 5 reduce-scatter + 4 all-gather modes, 2 sizes
    assert all(r["wire_bytes_match"] for r in rows)


def test_calibrate_rejects_bad_records(tmp_path):
    good = comm_bench.make_record("all_gather", "int4", 4096, 2, 1, [1e-3], {"intra": 0, "inter": 1056})
    path = tmp_path / "bad.json"
    for change, message in (({"collective": "broadcast"}, "collective"),
                            ({"spec": {"bits": 3}}, "spec"),
                            ({"spec": {"bits": 4, "colour": 1}}, "not QuantSpec fields"),
                            ({"spec": None, "intra_spec": good["spec"]}, "intra_spec but no spec"),
                            ({"seconds": 0}, "seconds must be > 0"),
                            ({"dtype_bytes": 3}, "dtype_bytes")):
        path.write_text(json.dumps({"records": [good | change]}))
        with pytest.raises(ValueError, match=message):
            simulate.load_comm_records(path)
    path.write_text(json.dumps([{"mode": "sdp4bit", "collective": "all_gather"}]))
    with pytest.raises(ValueError, match="lacks"):
        simulate.load_comm_records(path)
    assert simulate.main(["--predict", str(path)]) == 2


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_single_and_sweep(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert simulate.main(["--model", "1.3b", "--nodes", "2", "--gpus-per-node", "4", "--inter-gbps", "10",
                          "--compute-ms", "300", "--modes", "baseline,sdp4bit", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["results"]] == ["baseline", "sdp4bit"]
    assert data["results"][0]["speedup"] == 1.0 and data["results"][1]["speedup"] > 1.0
    assert data["command"].startswith("halfbyte simulate --model 1.3b")
    assert "sdp4bit" in capsys.readouterr().out

    plot = tmp_path / "s.png"
    assert simulate.main(["--params", "1.3e9", "--layers", "24", "--sweep-inter-gbps", "10,100,400",
                          "--sweep-clusters", "2x4,16x8", "--plot", str(plot), "--json", str(out)]) == 0
    curves = json.loads(out.read_text())["curves"]
    assert len(curves) == 2 and plot.stat().st_size > 0
    for c in curves:
        assert c["speedup"]["baseline"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2"], "exactly one of --model or --params"),
    (["--params", "1e9"], "--params needs --layers"),
    (["--model", "1.3b", "--modes", "baseline,fp3"], "--modes"),
    (["--model", "1.3b", "--gpus-per-node", "4", "--tp", "8"], "tensor parallel size"),
    (["--model", "1.3b", "--nic", "per-gpu", "--inter-gbps", "0"], "inter_gbps"),
    (["--model", "1.3b", "--sweep-inter-gbps", "10,x"], "--sweep-inter-gbps"),
    (["--model", "1.3b", "--sweep-inter-gbps", "10", "--sweep-clusters", "2by4"], "--sweep-clusters"),
    (["--model", "1.3b", "--mfu", "1.5"], "mfu"),
    (["--model", "1.3b", "--plot", "x.png"], "--plot needs"),
    # each was a traceback, exit code 1 (a division by zero; a missing file; --json after the run)
    (["--model", "1.3b", "--tp", "0"], "--tp must be >= 1, got 0"),
    (["--model", "1.3b", "--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--calibrate", "nope.json"], "nope.json: not a `halfbyte bench comm` JSON (No such file or directory)"),
    (["--model", "1.3b", "--json", "."], "--json . is a directory; name the file"),
    (["--sdp4bit-table", "--plot", "."], "--plot . is a directory; name the file, e.g. --plot plot.png"),  # ..png
    (["--sdp4bit-table", "--json", ".", "--plot", "."], "--json . is a directory; name the file, e.g. --json "
     "results.json; --plot . is a directory"),  # only --json's was named
    (["--model", "1.3b", "--tokens-per-step", "0"], "--tokens-per-step must be >= 1, got 0"),  # 0 was the default
])
def test_cli_errors(argv, message, capsys):
    assert simulate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_dataclass_validation():
    with pytest.raises(ValueError, match="Cluster.nic"):
        cm.Cluster(2, 4, nic="shared")
    with pytest.raises(ValueError, match="Workload.grad_bytes"):
        cm.Workload(compute_s=1.0, tokens_per_step=1, grad_bytes=3)
    with pytest.raises(ValueError, match="ModelShape.layers"):
        cm.ModelShape("x", 0, 64)
    with pytest.raises(ValueError, match="modes"):
        cm.simulate([], 10, cm.Cluster(1, 2), cm.Workload(compute_s=1.0, tokens_per_step=1))
