"""scripts/kernel_sass.py: static SASS counts of the codec kernels for sm_90, compiled without a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import kernel_sass

try:
    import triton

    # the script reads the kernels back with the cuobjdump that Triton's CUDA backend ships
    HAVE_TRITON = Path(triton.__file__).parent.joinpath("backends", "nvidia", "bin", "cuobjdump").exists()
except ImportError:
    HAVE_TRITON = False


def test_without_triton_it_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert kernel_sass.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Triton" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--json", "/nonexistent-dir/sass.json"], "no directory /nonexistent-dir"),
    (["--only", "no such kernel"], "matches no row"),
], ids=["json-dir", "only"])
def test_bad_options_get_one_line(argv, message, capsys):
    assert kernel_sass.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton with its cuobjdump (compiles for sm_90; no GPU needed)")
def test_counts_the_instructions_of_a_compiled_kernel(tmp_path: Path, capsys):
    out = tmp_path / "sass.json"
    assert kernel_sass.main(["--only", "quantize int8 H32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "kernel_sass.py --only" in result["command"] and "sm_90" in result["device"]
    rows = {r["name"]: r for r in result["rows"]}
    assert len(rows) == 3 and len(capsys.readouterr().out.splitlines()) == 2 + 3
    for r in rows.values():
        assert r["sass_per_thread"] == sum(r["ops"].values()) > 100 and 0 < r["regs"] <= 255
        assert r["ops"]["STG"] >= 1 and r["issue_ceiling_pct"] > 0
    # the same work per value over more bytes (fp32 input): fewer instructions per byte
    fp32, bf16 = rows["quantize int8 H32, fp32 in"], rows["quantize int8 H32, bf16 in"]
    assert fp32["instructions_per_byte"] < 0.7 * bf16["instructions_per_byte"]
    # stochastic rounding adds the Philox draws
    assert rows["quantize int8 H32, bf16 in, stochastic (sdp4bit hop 1)"]["sass_per_thread"] > bf16["sass_per_thread"]
