"""`halfbyte bench kernels`: the fused codec kernels against a device-to-device copy and the reference.

For each hot-path kernel and size it times (triton.testing.do_bench, median, L2 flushed before each
call, inputs rotated) our Triton kernel, a copy moving the same bytes (read + written) in the same
run, and the plain-torch reference; prints a table and writes JSON (+ a markdown table).
Bandwidth counts bytes read + written: the fewest bytes the operation must move.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from halfbyte.quant import reference
from halfbyte.quant.spec import QuantSpec

INT8_H32 = QuantSpec(bits=8, group_size=128, hadamard=32)
INT4_H32 = QuantSpec(bits=4, group_size=128, hadamard=32)
INT4_QWD = QuantSpec(bits=4, group_size=2048, rounding="stochastic")
INT4_G2048 = QuantSpec(bits=4, group_size=2048)
# (tile_values, num_warps) tried by --sweep
SWEEP = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


@dataclass
class Case:
    """One kernel at one size: `ours(cfg)` and `ref()` run it on input set i (rotated)."""

    kernel: str
    numel: int
    bytes_moved: int  # read + written
    ours: Callable[[int, dict], object]
    ref: Callable[[int], object]
    sets: int


@dataclass
class Row:
    kernel: str
    numel: int
    config: str
    ms: float
    tbps: float
    copy_ms: float
    copy_tbps: float
    pct_of_copy: float
    reference_ms: float | None
    speedup_vs_reference: float | None
    bytes_moved: int


def _parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", s.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like 16M, 262144 or 1G, got {s!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def _fmt_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _n_sets(input_bytes: int, l2_bytes: int) -> int:
    """Enough input sets that consecutive calls never find their inputs in L2."""
    return max(1, min(8, -(-4 * l2_bytes // max(input_bytes, 1))))


def build_cases(numel: int, l2_bytes: int, tk) -> list[Case]:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(numel)

    def randn(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(n, device=dev, generator=gen).to(dtype)

    cases: list[Case] = []
    # TLq-HS hop 1: rotate + int8 quantize the gradient
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        k = _n_sets(numel * dtype.itemsize, l2_bytes)
        xs = [randn(numel, dtype) for _ in range(k)]
        cases.append(Case(
            f"quantize {INT8_H32} from {tag}", numel, numel * dtype.itemsize + INT8_H32.wire_nbytes(numel),
            lambda i, cfg, xs=xs: tk.quantize(xs[i], INT8_H32, **cfg),
            lambda i, xs=xs: reference.quantize(xs[i], INT8_H32), k))
    # TLq-HS middle hop: W int8 chunks -> sum -> int4, staying rotated
    for W in (2, 4, 8):
        n = numel // W
        nbytes = INT8_H32.wire_nbytes(n)
        k = _n_sets(W * nbytes, l2_bytes)
        chunk_sets = [torch.stack([reference.quantize(randn(n), INT8_H32, rotate=False).data for _ in range(W)])
                      for _ in range(k)]
        cases.append(Case(
            f"reduce_requantize {INT8_H32}->{INT4_H32} W={W}", numel, W * nbytes + INT4_H32.wire_nbytes(n),
            lambda i, cfg, c=chunk_sets, n=n: tk.reduce_requantize(c[i], INT8_H32, n, INT4_H32, **cfg),
            lambda i, c=chunk_sets, n=n: reference.reduce_requantize(c[i], INT8_H32, n, INT4_H32), k))
    # TLq-HS last hop: W int4 chunks -> sum -> inverse Hadamard -> fp32
    for W in (2, 4, 8):
        n = numel // W
        nbytes = INT4_H32.wire_nbytes(n)
        k = _n_sets(W * nbytes, l2_bytes)
        chunk_sets = [torch.stack([reference.quantize(randn(n), INT4_H32, rotate=False).data for _ in range(W)])
                      for _ in range(k)]
        out = torch.empty(n, device=dev)
        cases.append(Case(
            f"dequantize_sum {INT4_H32} W={W} -> fp32", numel, W * nbytes + 4 * n,
            lambda i, cfg, c=chunk_sets, n=n, out=out: tk.dequantize_sum(c[i], INT4_H32, n, out=out, **cfg),
            lambda i, c=chunk_sets, n=n, out=out: reference.dequantize_sum(c[i], INT4_H32, n, out=out), k))
    # qWD: quantize (fp32 master - bf16 replica) with stochastic rounding; replica += decode
    k = _n_sets(6 * numel, l2_bytes)
    masters = [randn(numel) for _ in range(k)]
    replicas = [(m + randn(numel) * 1e-3).to(torch.bfloat16) for m in masters]
    cases.append(Case(
        f"quantize {INT4_QWD} fp32-bf16 (qWD)", numel, 6 * numel + INT4_QWD.wire_nbytes(numel),
        lambda i, cfg: tk.quantize(masters[i], INT4_QWD, seed=i, subtract=replicas[i], **cfg),
        lambda i: reference.quantize(masters[i], INT4_QWD, seed=i, subtract=replicas[i]), k))
    packs = [reference.quantize(randn(numel) * 1e-3, INT4_G2048) for _ in range(k)]
    cases.append(Case(
        f"dequantize {INT4_G2048} accumulate bf16 (qWD)", numel, INT4_G2048.wire_nbytes(numel) + 4 * numel,
        lambda i, cfg: tk.dequantize(packs[i], out=replicas[i], accumulate=True, **cfg),
        lambda i: reference.dequantize(packs[i], out=replicas[i], accumulate=True), k))
    return cases


def _time(fn: Callable[[int], object], sets: int, rep_ms: int) -> float:
    from triton.testing import do_bench

    state = {"i": 0}

    def call() -> None:
        fn(state["i"] % sets)
        state["i"] += 1

    return float(do_bench(call, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


class CopyTimer:
    """Device-to-device copy of a given number of bytes (read + written), cached per size."""

    def __init__(self, l2_bytes: int, rep_ms: int) -> None:
        self.l2_bytes, self.rep_ms, self.cache = l2_bytes, rep_ms, {}

    def ms(self, bytes_moved: int) -> float:
        n = bytes_moved // 2
        if n not in self.cache:
            k = _n_sets(n, self.l2_bytes)
            src = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda") for _ in range(k)]
            dst = torch.empty(n, dtype=torch.uint8, device="cuda")
            self.cache[n] = _time(lambda i: dst.copy_(src[i]), k, self.rep_ms)
            del src, dst
        return self.cache[n]


def run(sizes: list[int], *, with_reference: bool, sweep: bool, rep_ms: int, only: str | None) -> list[Row]:
    from halfbyte.quant import triton_kernels as tk

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy = CopyTimer(l2, rep_ms)
    rows: list[Row] = []
    for numel in sizes:
        for case in build_cases(numel, l2, tk):
            if only and not re.search(only, case.kernel):
                continue
            configs = [("default", {})]
            if sweep:
                configs += [(f"tile={t},warps={w}", {"tile_values": t, "num_warps": w}) for t, w in SWEEP]
            ref_ms = _time(case.ref, case.sets, rep_ms) if with_reference else None
            copy_ms = copy.ms(case.bytes_moved)
            for name, cfg in configs:
                ms = _time(lambda i, cfg=cfg: case.ours(i, cfg), case.sets, rep_ms)
                tbps, copy_tbps = case.bytes_moved / ms / 1e9, case.bytes_moved / copy_ms / 1e9
                row = Row(case.kernel, numel, name, ms, tbps, copy_ms, copy_tbps, 100 * tbps / copy_tbps,
                          ref_ms, (ref_ms / ms) if ref_ms else None, case.bytes_moved)
                rows.append(row)
                print(_fmt_row(row), flush=True)
            del case
        torch.cuda.empty_cache()
    return rows


_HEADER = f"{'kernel':<62} {'size':>5} {'config':<20} {'ms':>8} {'TB/s':>6} {'copy TB/s':>9} {'% copy':>7} {'vs ref':>7}"


def _fmt_row(r: Row) -> str:
    ref = f"{r.speedup_vs_reference:6.1f}x" if r.speedup_vs_reference else "      -"
    return (f"{r.kernel:<62} {_fmt_size(r.numel):>5} {r.config:<20} {r.ms:8.3f} {r.tbps:6.2f} "
            f"{r.copy_tbps:9.2f} {r.pct_of_copy:6.1f}% {ref:>7}")


def to_markdown(meta: dict, rows: list[Row]) -> str:
    lines = [
        f"# Kernel benchmark: {meta['device']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"torch {meta['torch']}, triton {meta['triton']}. TB/s counts bytes read + written; "
        "copy = a device-to-device copy of the same bytes in the same run; median of do_bench "
        "(L2 flushed before each call).",
        "",
        "| kernel | size | config | ms | TB/s | copy TB/s | % of copy | reference ms | speedup vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref_ms = f"{r.reference_ms:.2f}" if r.reference_ms else "-"
        speed = f"{r.speedup_vs_reference:.1f}x" if r.speedup_vs_reference else "-"
        lines.append(f"| {r.kernel} | {_fmt_size(r.numel)} | {r.config} | {r.ms:.3f} | {r.tbps:.2f} | "
                     f"{r.copy_tbps:.2f} | {r.pct_of_copy:.0f}% | {ref_ms} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="halfbyte bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=_parse_size, nargs="+", default=[16 << 20, 64 << 20, 256 << 20],
                   help="values per operation (default: 16M 64M 256M)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/kernels-<gpu-name>.json)")
    p.add_argument("--md", type=Path, default=None, help="markdown table path (default: --out with .md)")
    p.add_argument("--no-reference", action="store_true", help="skip timing the plain-torch reference")
    p.add_argument("--sweep", action="store_true", help="also time each kernel at several tile/warp configs")
    p.add_argument("--only", default=None, help="regex: run only kernels whose name matches")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("halfbyte bench kernels: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("halfbyte bench kernels: needs Triton (pip install triton)", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    out = args.out or Path("benchmarks/results") / f"kernels-{_slug(device)}.json"
    md = args.md or out.with_suffix(".md")
    command = "halfbyte bench kernels " + " ".join(argv)
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__}\n{_HEADER}", flush=True)
    rows = run(args.sizes, with_reference=not args.no_reference, sweep=args.sweep, rep_ms=args.rep_ms,
               only=args.only)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": command.strip(),
            "bandwidth": "TB/s = (bytes read + bytes written) / time"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    md.write_text(to_markdown(meta, rows))
    print(f"wrote {out} and {md}")
    return 0
