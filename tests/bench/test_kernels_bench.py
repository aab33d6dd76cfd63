"""`halfbyte bench kernels`: the measurement plan (warm-up, interleaving, L2 rotation, batch sizes),
the statistics of a row, run-to-run comparison and the command line; a small real run on a GPU."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from halfbyte.bench import kernels


def _case(numel: int = 16 << 20, bytes_moved: int = 10**9) -> kernels.Case:
    return kernels.Case("k", numel, bytes_moved, bytes_moved // 2, lambda i, cfg: None, lambda i: None, 2)


def test_warm_up_waits_for_a_stable_copy_and_the_minimum_time():
    readings = iter([1.0, 2.0, 3.0, 4.0, 4.2, 4.2, 4.21, 4.2, 4.2, 4.2, 4.2, 4.2])
    now = itertools.count(0.0, 0.25)  # each reading takes 0.25 s
    warm = kernels.warm_up(lambda: next(readings), min_s=0.5, max_s=10.0, window=5, tolerance=0.01,
                           clock=lambda: next(now))
    assert warm.stable and warm.tbps[-5:] == [4.2, 4.2, 4.21, 4.2, 4.2] and len(warm.tbps) == 9
    # stable from the start, but the minimum time not yet reached: it keeps going
    readings = iter([4.2] * 50)
    now = itertools.count(0.0, 0.25)
    warm = kernels.warm_up(lambda: next(readings), min_s=2.0, max_s=10.0, clock=lambda: next(now))
    assert warm.stable and warm.seconds == 2.0 and len(warm.tbps) == 8


def test_warm_up_gives_up_at_max_s_and_says_so():
    drifting = itertools.count(1.0, 0.1)  # +10%, +9%, ... never within 1%
    now = itertools.count(0.0, 0.5)
    warm = kernels.warm_up(lambda: next(drifting), min_s=0.1, max_s=3.0, clock=lambda: next(now))
    assert not warm.stable and warm.seconds == 3.0 and len(warm.tbps) == 6


def test_interleave_alternates_which_runs_first():
    order = []
    timers = {name: (lambda name=name: order.append(name) or len(order)) for name in ("kernel", "copy", "eager")}
    times = kernels.interleave(timers, 3)
    assert order == ["kernel", "copy", "eager", "eager", "copy", "kernel", "kernel", "copy", "eager"]
    assert times == {"kernel": [1, 6, 7], "copy": [2, 5, 8], "eager": [3, 4, 9]}


def test_row_takes_the_share_of_the_copy_per_repeat():
    """A repeat where the clock dropped slows the kernel and its copy alike: per-repeat ratios see
    through it, where a ratio of medians would not."""
    row = kernels.make_row(_case(), "default", kernel_ms=[2.0, 4.0, 2.0, 2.2], copy_ms=[1.0, 2.0, 1.0, 1.0],
                           eager_ms=[2.5, 5.0, 2.5, 2.5], calls=16, ref_ms=25.0)
    assert row.pct_of_copy == pytest.approx(50.0) and row.pct_min == pytest.approx(100 / 2.2)
    assert row.pct_max == pytest.approx(50.0)
    assert (row.ms, row.ms_min, row.ms_max, row.copy_ms) == (2.1, 2.0, 4.0, 1.0)
    assert row.eager_pct_of_copy == pytest.approx(40.0) and row.eager_ms == 2.5
    assert row.tbps == pytest.approx(1e9 / 2.1 / 1e9) and row.speedup_vs_reference == pytest.approx(10.0)
    assert row.repeats == 4 and row.calls == 16 and row.input_sets == 2
    assert kernels.summarize([3.0, 1.0, 2.0]) == kernels.Stat(2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="one kernel, copy and eager time per repeat"):
        kernels.make_row(_case(), "default", [1.0], [1.0, 2.0], [1.0], 8, None)
    with pytest.raises(ValueError, match="at least one"):
        kernels.summarize([])


def test_input_sets_keep_every_call_out_of_l2_and_batches_cover_every_set():
    l2 = 50 << 20
    for input_bytes in (1 << 20, 16 << 20, 64 << 20, 1 << 30):
        sets = kernels.n_sets(input_bytes, l2)
        # between two uses of a set, the other sets stream > 3x the L2 through it
        assert sets >= 2 and ((sets - 1) * input_bytes >= 3 * l2 or sets == kernels.MAX_SETS)
    assert kernels.n_sets(1 << 30, l2) == 2 and kernels.n_sets(16 << 20, l2) == 11
    assert kernels.calls_for(0.5, 10.0, 2) == 21  # about 10 ms of device time
    assert kernels.calls_for(0.001, 10.0, 2) == kernels.MAX_CALLS
    assert kernels.calls_for(0.001, 10.0, 151) == kernels.MAX_CALLS and kernels.calls_for(5.0, 1.0, 151) == 151


def _row(kernel: str, numel: int, pct: float) -> kernels.Row:
    row = kernels.make_row(_case(numel), "default", [1.0], [pct / 100], [1.0], 8, None)
    row.kernel = kernel
    return row


def test_compare_holds_rows_from_16m_to_the_tolerance():
    old = [{"kernel": "a", "numel": 16 << 20, "config": "default", "pct_of_copy": 80.0},
           {"kernel": "a", "numel": 4 << 20, "config": "default", "pct_of_copy": 80.0}]
    lines, agree = kernels.compare(old, [_row("a", 16 << 20, 82.0), _row("a", 4 << 20, 40.0)], 3.0)
    assert agree and "80.0% -> 82.0% of copy (+2.5%)" in lines[0] and "-50.0%" in lines[1]
    lines, agree = kernels.compare(old, [_row("a", 16 << 20, 77.0), _row("b", 16 << 20, 50.0)], 3.0)
    assert not agree and lines[0].endswith("<- beyond 3%") and lines[1].endswith("not in the earlier run")
    assert kernels.compare(old, [_row("a", 4 << 20, 10.0)], 3.0)[1] is None  # nothing >= 16M to hold


def test_markdown_names_device_command_and_spread():
    meta = {"device": "NVIDIA H200", "command": "halfbyte bench kernels --sizes 16M", "torch": "2.11",
            "triton": "3.6", "repeats": 7, "warmup": {"seconds": 2.5, "stable": True}}
    md = kernels.to_markdown(meta, [_row("quantize int8/g128/H32 from bf16", 16 << 20, 78.0)])
    assert md.startswith("# Kernel benchmark: NVIDIA H200") and "`halfbyte bench kernels --sizes 16M`" in md
    assert "| quantize int8/g128/H32 from bf16 | 16M | default |" in md and "78.0% (78.0-78.0)" in md
    assert "median (min-max) over 7 interleaved repeats" in md


def test_command_line_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [{"kernel": "a"}]}')
    assert kernels.main(["--compare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows lack config, numel, pct_of_copy" in err
    assert kernels.main(["--compare", str(tmp_path / "missing.json")]) == 2
    assert "not a `halfbyte bench kernels` JSON" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.main(["--sizes", "1M"]) == 2
    assert capsys.readouterr().err == "halfbyte bench kernels: needs a CUDA GPU (torch.cuda.is_available() is False)\n"
    for flag in ("--out", "--md"):  # checked before the GPU: a directory failed after the first row
        assert kernels.main([flag, str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"halfbyte bench kernels: {flag} {tmp_path} is a directory; name the " \
                                          f"file, e.g. {flag} {tmp_path / 'results.json'}\n"
    assert kernels.main(["--out", str(tmp_path), "--md", str(tmp_path)]) == 2  # both named, in one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path} is a directory" in err and f"--md {tmp_path} is a" in err
    for argv in (["--repeats", "0"], ["--sizes", "16Q"], ["--rep-ms", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            kernels.main(argv)
        assert exit_.value.code == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_run_on_the_gpu(tmp_path, capsys):
    """The graph/eager timing runs end to end: spreads bracket the medians, the device time is not
    above the eager time by more than noise, and --compare against itself agrees."""
    pytest.importorskip("triton")
    out = tmp_path / "k.json"
    argv = ["--sizes", "1M", "--only", "dequantize_sum.*W=2|quantize_messages", "--repeats", "3",
            "--rep-ms", "2", "--warmup-s", "1", "--out", str(out)]
    assert kernels.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["device"] == torch.cuda.get_device_name() and data["command"].startswith("halfbyte bench kernels")
    names = [r["kernel"] for r in data["rows"]]
    assert all(re.search(argv[3], n) for n in names) and data["warmup"]["seconds"] > 0
    assert any(n.startswith("dequantize_sum") for n in names) and any(n.startswith("quantize_messages") for n in names)
    for r in data["rows"]:
        assert r["pct_min"] <= r["pct_of_copy"] <= r["pct_max"] and r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["calls"] >= r["input_sets"] >= 2 and r["ms"] <= 1.1 * r["eager_ms"]
        assert r["reference_ms"] > 0
    assert out.with_suffix(".md").read_text().startswith("# Kernel benchmark:")
    assert kernels.main([*argv, "--compare", str(out), "--out", str(tmp_path / "again.json")]) == 0
    assert "against" in capsys.readouterr().out


def test_every_case_runs_and_moves_the_bytes_it_counts():
    """Each case's inputs and calls are well formed (run here with the reference on the CPU, the
    cases the GPU run times), what a call writes is the written part of bytes_moved, and each case
    rotates enough input sets for its own input size."""
    from halfbyte.quant import reference

    numel = 1 << 16
    cases = kernels.build_cases(numel, 1 << 20, reference, device="cpu")
    names = [c.kernel for c in cases]
    assert len(names) == len(set(names)) == 12
    assert "quantize_messages int8/g128/sr/H32 from bf16, 4 msgs x 2 chunks" in names
    assert "reduce_requantize_messages int8/g128/sr/H32->int4/g128/sr/H32 W=4, 2 msgs" in names
    for case in cases:
        assert case.numel == numel and case.sets == kernels.n_sets(case.input_bytes, 1 << 20)
        out = case.ours(case.sets - 1, {})
        data = out.data if hasattr(out, "data") and not isinstance(out, torch.Tensor) else out
        written = data.numel() * data.element_size()  # accumulate: its read is in input_bytes
        assert case.bytes_moved == case.input_bytes + written, case.kernel
        case.ref(0)
