"""Static instruction counts of the codec's Triton kernels for an H100/H200 (sm_90), on any machine
with Triton: no GPU needed (issue 22; docs/kernels.md, "What bounds the slow kernels").

Each variant is compiled as the host code launches it (halfbyte.quant.triton_kernels' launch_config,
_unroll and _decode_run; pointers and sizes marked 16-byte divisible, as at training sizes), then read
back with Triton's own cuobjdump: registers, shared memory (what Triton allocates per program),
SASS instructions per thread of one program (NOPs not counted), instructions per byte moved, and the
ceiling that instruction issue alone sets (132 SMs x 4 schedulers x one warp-instruction per cycle
at 1.98 GHz, against a 4.25 TB/s copy). Static counts overstate what runs (prologues, masked tails),
so a ceiling bounds what issue allows from below; ncu on a GPU measures the real one.

    python scripts/kernel_sass.py                      # the table (markdown) on stdout
    python scripts/kernel_sass.py --json sass.json     # and every row as JSON
    python scripts/kernel_sass.py --only stochastic    # rows whose name contains the text
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ISSUE_PER_S = 132 * 4 * 1.98e9  # H200: warp-instructions per second, all schedulers busy
COPY_BYTES_PER_S = 4.25e12  # H200 device copy, bytes read + written per second (docs/kernels.md)


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: str  # "quantize", "reduce_requantize" or "dequantize_sum"
    in_bits: int | None = None  # quantize: None (float input); else the input code's bits
    out_bits: int | None = None  # quantize / reduce_requantize: the output code's bits
    group: int = 128
    log2_h: int = 5
    stochastic: bool = False
    dtype: str = "bf16"  # quantize: input; dequantize_sum: output
    W: int = 1
    subtract: bool = False  # qWD: quantize x - sub


VARIANTS = [
    Variant("quantize int8 H32, fp32 in", "quantize", out_bits=8, dtype="fp32"),
    Variant("quantize int8 H32, bf16 in", "quantize", out_bits=8),
    Variant("quantize int8 H32, bf16 in, stochastic (sdp4bit hop 1)", "quantize", out_bits=8, stochastic=True),
    Variant("quantize int4 H32, bf16 in, stochastic (sdp4bit one level)", "quantize", out_bits=4, stochastic=True),
    *(Variant(f"reduce_requantize int8 -> int4 W={w}", "reduce_requantize", 8, 4, W=w) for w in (2, 4, 8)),
    *(Variant(f"reduce_requantize int8 -> int4 W={w}, stochastic (sdp4bit)", "reduce_requantize", 8, 4,
              stochastic=True, W=w) for w in (2, 4, 8)),
    *(Variant(f"dequantize_sum int4 H32 W={w}, fp32 out", "dequantize_sum", 4, dtype="fp32", W=w) for w in (2, 4, 8)),
    Variant("qWD quantize int4 g2048, stochastic, fp32 - bf16", "quantize", out_bits=4, group=2048, log2_h=0,
            stochastic=True, dtype="fp32", subtract=True),
]


def compile_variant(v: Variant, tk, triton, target) -> tuple[object, int, int]:
    """(compiled kernel, threads per program, bytes one program moves)."""
    from halfbyte.quant.spec import QuantSpec

    from triton.compiler import ASTSource

    if v.kernel == "quantize":
        fn, runs = tk._quantize_kernel, v.log2_h > 0
        bg, warps = tk.launch_config(v.group, runs=runs)
        ptr = {"x_ptr": f"*{v.dtype}", "sub_ptr": "*bf16" if v.subtract else f"*{v.dtype}", "out_ptr": "*u8"}
        const = dict(BG=bg, GS=v.group, BITS=v.out_bits, SYMMETRIC=True, STOCHASTIC=v.stochastic, LOG2_H=v.log2_h,
                     HAS_SUB=v.subtract, VEC=min(16 // (4 if v.dtype == "fp32" else 2), v.group, tk._RUN.value),
                     PIECES=False)
        values = bg * v.group
        in_bytes = values * ((4 if v.dtype == "fp32" else 2) + (2 if v.subtract else 0))
        out_bytes = QuantSpec(bits=v.out_bits, group_size=v.group).wire_nbytes(values)
    elif v.kernel == "reduce_requantize":
        fn = tk._reduce_requantize_kernel
        bg, warps = tk.launch_config(v.group, runs=True)
        ptr = {"chunks_ptr": "*u8", "out_ptr": "*u8"}
        const = dict(BG=bg, GS=v.group, IN_BITS=v.in_bits, IN_SYMMETRIC=True, OUT_BITS=v.out_bits,
                     OUT_SYMMETRIC=True, STOCHASTIC=v.stochastic, PADDED=False, MESSAGES=False, **tk._unroll(v.W))
        values = bg * v.group
        in_bytes = v.W * QuantSpec(bits=v.in_bits, group_size=v.group).wire_nbytes(values)
        out_bytes = QuantSpec(bits=v.out_bits, group_size=v.group).wire_nbytes(values)
    else:
        fn = tk._dequantize_sum_kernel
        spec = QuantSpec(bits=v.in_bits, group_size=v.group, hadamard=1 << v.log2_h if v.log2_h else None)
        run = tk._decode_run(spec, v.W)
        bg, warps = tk.launch_config(v.group, runs=run > 0)
        ptr = {"chunks_ptr": "*u8", "out_ptr": f"*{v.dtype}"}
        const = dict(BG=bg, GS=v.group, BITS=v.in_bits, SYMMETRIC=True, LOG2_H=v.log2_h, ACCUMULATE=False,
                     SCALE=False, RUN=run, **tk._unroll(v.W))
        values = bg * v.group
        in_bytes = v.W * spec.wire_nbytes(values)
        out_bytes = values * (4 if v.dtype == "fp32" else 2)
    names = fn.arg_names
    unaligned = {"seed", "W", "scale", "pieces"}
    sig = {n: ptr.get(n, "constexpr" if n in const else "fp32" if n == "scale" else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in const and n not in unaligned}
    options = {"num_warps": warps, "enable_fp_fusion": False}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=target, options=options)
    return kernel, 32 * warps, in_bytes + out_bytes


def read_cubin(cubin: bytes, cuobjdump: str) -> dict:
    """Registers and the SASS opcode counts of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m and m.group(1) != "NOP":
            ops[m.group(1)] += 1
    regs = re.search(r"REG:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else None, "sass_per_thread": sum(ops.values()),
            "ops": dict(ops.most_common())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write every row (with its opcode counts) here")
    ap.add_argument("--only", default="", help="only the rows whose name contains this text")
    args = ap.parse_args(argv)
    if args.json and not args.json.parent.is_dir():
        print(f"kernel_sass.py: --json {args.json}: no directory {args.json.parent}", file=sys.stderr)
        return 2
    variants = [v for v in VARIANTS if args.only in v.name]
    if not variants:
        print(f"kernel_sass.py: --only {args.only!r} matches no row (rows: python scripts/kernel_sass.py)",
              file=sys.stderr)
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        print("kernel_sass.py: needs Triton (pip install triton): it compiles the kernels for sm_90", file=sys.stderr)
        return 2
    from halfbyte.quant import triton_kernels as tk

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        print(f"kernel_sass.py: Triton {triton.__version__} has no {cuobjdump} to read the compiled kernels",
              file=sys.stderr)
        return 2
    rows = []
    print("| kernel (variant) | warps | regs | shared B | SASS/thread | I2F | instructions per byte "
          "| issue ceiling, % of copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        kernel, threads, nbytes = compile_variant(v, tk, triton, GPUTarget("cuda", 90, 32))
        info = {**read_cubin(kernel.asm["cubin"], cuobjdump), "shared_bytes": kernel.metadata.shared}
        per_byte = info["sass_per_thread"] * threads / nbytes
        ceiling = 100 * ISSUE_PER_S / (per_byte / 32) / COPY_BYTES_PER_S
        i2f = sum(n for op, n in info["ops"].items() if op.startswith("I2F"))
        rows.append({"name": v.name, "warps": threads // 32, "bytes_per_program": nbytes, "i2f": i2f,
                     "instructions_per_byte": round(per_byte, 2), "issue_ceiling_pct": round(ceiling, 1), **info})
        print(f"| {v.name} | {threads // 32} | {info['regs']} | {info['shared_bytes']} | {info['sass_per_thread']} | "
              f"{i2f} | {per_byte:.1f} | {ceiling:.0f}% |", flush=True)
    if args.json:
        command = shlex.join(["python", "scripts/kernel_sass.py", *(sys.argv[1:] if argv is None else argv)])
        args.json.write_text(json.dumps({"device": "none: compiled for sm_90 (H100/H200), not run",
                                         "command": command, "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
