"""`halfbyte bench kernels`: the fused codec kernels against a device-to-device copy and the reference.

For each hot-path kernel and size it reports the kernel's device time, its time per call as the
engine sees it, and both as a share of a copy moving the same bytes (read + written) in the same run.
Bandwidth counts bytes read + written: the fewest bytes the operation must move. The method, and why:

  warm-up     a GPU idles at a low clock (an H200 at 345 MHz) and ramps up under load: a timed copy
              loop runs until its bandwidth is stable (--warmup-s at most), and a short one before
              each kernel, so no row times the ramp;
  L2          consecutive calls read different input sets whose bytes together exceed 3x the L2
              (H200: 50 MB): no call finds its inputs in cache, at any size (the role of a flush);
  device      one CUDA graph replays N calls (N so that a replay takes about --rep-ms, and at least
              one call per input set): device time per call, without host launch cost;
  eager       the same N calls launched one by one, CUDA events around all N: the time per call as
              the engine sees it, host launch cost included where it exceeds the kernel's run time;
  interleave  every repeat replays the kernel's graph and the copy's graph back to back, alternating
              which goes first, so a clock or thermal drift moves both alike;
  repeats     --repeats such pairs: a row gives the median and the spread (min..max over repeats)
              of the kernel's share of the copy, and median times.
`--compare OLD.json` prints each row's change against an earlier run (run-to-run agreement).
Output: a table on stdout, JSON and a markdown table naming the device and the command (--out,
default runs/bench/kernels-<gpu>.json under the current directory).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from halfbyte.bench import DEFAULT_RESULTS_DIR, out_problems
from halfbyte.quant import reference
from halfbyte.quant.spec import QuantSpec

INT8_H32 = QuantSpec(bits=8, group_size=128, hadamard=32)
INT4_H32 = QuantSpec(bits=4, group_size=128, hadamard=32)
INT4_QWD = QuantSpec(bits=4, group_size=2048, rounding="stochastic")
INT4_G2048 = QuantSpec(bits=4, group_size=2048)
# sdp4bit's gradient specs: what its two-level hops run (the rows above time nearest rounding)
INT8_H32_SR = QuantSpec(bits=8, group_size=128, hadamard=32, rounding="stochastic")
INT4_H32_SR = QuantSpec(bits=4, group_size=128, hadamard=32, rounding="stochastic")
# (tile_values, num_warps) tried by --sweep
SWEEP = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]
# The two-level hops as the collectives run them on M nodes of L GPUs: hop 1 quantizes L messages of
# M strided chunks each; the middle hop sums L peers' messages and writes M messages
TWO_LEVEL_M, TWO_LEVEL_L = 2, 4
L2_FACTOR = 3  # consecutive calls' input sets span this many L2 sizes
MAX_SETS, MAX_CALLS = 256, 1024
MIN_CALLS = 8
# rows at or above this size are the ones a run-to-run comparison holds to --tolerance
COMPARED_FROM = 16 << 20


@dataclass
class Case:
    """One kernel at one size: `ours(i, cfg)` and `ref(i)` run it on input set i."""

    kernel: str
    numel: int
    bytes_moved: int  # read + written
    input_bytes: int  # read (what must not be found in L2)
    ours: Callable[[int, dict], object]
    ref: Callable[[int], object]
    sets: int


@dataclass(frozen=True)
class Stat:
    """Median and spread of repeated measurements."""

    median: float
    min: float
    max: float


def summarize(values: Sequence[float]) -> Stat:
    if not values:
        raise ValueError("summarize needs at least one value")
    return Stat(statistics.median(values), min(values), max(values))


@dataclass
class Row:
    kernel: str
    numel: int
    config: str
    ms: float  # device time per call (graph replay), median over repeats
    ms_min: float
    ms_max: float
    eager_ms: float  # time per call launched one by one, median over repeats
    tbps: float
    copy_ms: float
    copy_tbps: float
    pct_of_copy: float  # median over repeats of copy time / kernel device time
    pct_min: float
    pct_max: float
    eager_pct_of_copy: float  # median over repeats of copy time / eager time per call
    reference_ms: float | None
    speedup_vs_reference: float | None  # reference eager time / ours eager time
    bytes_moved: int
    repeats: int
    calls: int  # calls per graph replay and per eager loop
    input_sets: int


def make_row(case: Case, config: str, kernel_ms: Sequence[float], copy_ms: Sequence[float],
             eager_ms: Sequence[float], calls: int, ref_ms: float | None) -> Row:
    """A row from per-repeat times: the share of the copy is taken per repeat (each kernel replay
    next to its own copy replay), then summarized."""
    if not len(kernel_ms) == len(copy_ms) == len(eager_ms):
        raise ValueError("one kernel, copy and eager time per repeat")
    pct = summarize([100 * c / k for k, c in zip(kernel_ms, copy_ms)])
    eager_pct = summarize([100 * c / e for e, c in zip(eager_ms, copy_ms)])
    k, c, e = summarize(kernel_ms), summarize(copy_ms), summarize(eager_ms)
    return Row(case.kernel, case.numel, config, k.median, k.min, k.max, e.median,
               case.bytes_moved / k.median / 1e9, c.median, case.bytes_moved / c.median / 1e9,
               pct.median, pct.min, pct.max, eager_pct.median, ref_ms,
               ref_ms / e.median if ref_ms else None, case.bytes_moved, len(kernel_ms), calls, case.sets)


def interleave(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every timer once per repeat, in the given order on even repeats and reversed on odd ones
    (so neither always runs first after a pause); per timer, its results in repeat order."""
    names = list(timers)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(timers[name]())
    return out


@dataclass
class WarmUp:
    seconds: float
    tbps: list[float]
    stable: bool


def warm_up(measure_tbps: Callable[[], float], *, min_s: float, max_s: float, window: int = 5,
            tolerance: float = 0.01, clock: Callable[[], float] = time.monotonic) -> WarmUp:
    """Keep the device busy with `measure_tbps` (a timed copy) until its last `window` readings lie
    within `tolerance` of their median and at least `min_s` passed, or until `max_s` passed."""
    start = clock()
    readings: list[float] = []
    while True:
        readings.append(measure_tbps())
        elapsed = clock() - start
        last = readings[-window:]
        mid = statistics.median(last)
        stable = len(last) == window and all(abs(x - mid) <= tolerance * mid for x in last)
        if (stable and elapsed >= min_s) or elapsed >= max_s:
            return WarmUp(elapsed, readings, stable)


def n_sets(input_bytes: int, l2_bytes: int) -> int:
    """Input sets to rotate so that the calls between two uses of one set read > 3x the L2."""
    return max(2, min(MAX_SETS, -(-L2_FACTOR * l2_bytes // max(input_bytes, 1)) + 1))


def calls_for(est_call_ms: float, rep_ms: float, sets: int) -> int:
    """Calls per timed batch: about rep_ms of device time, and every input set at least once."""
    by_time = int(rep_ms / max(est_call_ms, 1e-6)) + 1
    return max(MIN_CALLS, sets, min(MAX_CALLS, by_time))


# ---- cases ---------------------------------------------------------------------------------------
def build_cases(numel: int, l2_bytes: int, tk, device: str = "cuda") -> list[Case]:
    """The hot-path kernels at `numel` values, `tk` the kernels' module (any module with the codec
    functions runs them: the reference too)."""
    dev = device
    gen = torch.Generator(device=dev).manual_seed(numel)

    def randn(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(n, device=dev, generator=gen).to(dtype)

    cases: list[Case] = []
    # TLq-HS hop 1: rotate + int8 quantize the gradient
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        read = numel * dtype.itemsize
        k = n_sets(read, l2_bytes)
        xs = [randn(numel, dtype) for _ in range(k)]
        cases.append(Case(
            f"quantize {INT8_H32} from {tag}", numel, read + INT8_H32.wire_nbytes(numel), read,
            lambda i, cfg, xs=xs: tk.quantize(xs[i], INT8_H32, **cfg),
            lambda i, xs=xs: reference.quantize(xs[i], INT8_H32), k))
    # sdp4bit's hop 1 as the collective runs it: L messages of M strided chunks, read in place
    M, L = TWO_LEVEL_M, TWO_LEVEL_L
    c = numel // (M * L)
    if c % INT8_H32_SR.group_size == 0:
        read = numel * 2
        k = n_sets(read, l2_bytes)
        views = [randn(numel, torch.bfloat16).view(M, L, c).transpose(0, 1) for _ in range(k)]
        cases.append(Case(
            f"quantize_messages {INT8_H32_SR} from bf16, {L} msgs x {M} chunks", numel,
            read + L * INT8_H32_SR.wire_nbytes(M * c), read,
            lambda i, cfg, v=views: tk.quantize_messages(v[i], INT8_H32_SR, seed=i, **cfg),
            lambda i, v=views: reference.quantize_messages(v[i], INT8_H32_SR, seed=i), k))
    # TLq-HS middle hop: W int8 chunks -> sum -> int4, staying rotated
    for W in (2, 4, 8):
        n = numel // W
        nbytes = INT8_H32.wire_nbytes(n)
        k = n_sets(W * nbytes, l2_bytes)
        chunk_sets = [torch.stack([reference.quantize(randn(n), INT8_H32, rotate=False).data for _ in range(W)])
                      for _ in range(k)]
        cases.append(Case(
            f"reduce_requantize {INT8_H32}->{INT4_H32} W={W}", numel, W * nbytes + INT4_H32.wire_nbytes(n),
            W * nbytes,
            lambda i, cfg, c=chunk_sets, n=n: tk.reduce_requantize(c[i], INT8_H32, n, INT4_H32, **cfg),
            lambda i, c=chunk_sets, n=n: reference.reduce_requantize(c[i], INT8_H32, n, INT4_H32), k))
    # sdp4bit's middle hop as the collective runs it: L peers' int8 messages -> M int4 messages
    m = numel // (M * L)
    if m % INT4_H32_SR.group_size == 0:
        nbytes = INT8_H32_SR.wire_nbytes(M * m)
        k = n_sets(L * nbytes, l2_bytes)
        chunk_sets = [torch.stack([reference.quantize(randn(M * m), INT8_H32_SR, rotate=False, seed=w).data
                                   for w in range(L)]) for _ in range(k)]
        cases.append(Case(
            f"reduce_requantize_messages {INT8_H32_SR}->{INT4_H32_SR} W={L}, {M} msgs", numel,
            L * nbytes + M * INT4_H32_SR.wire_nbytes(m), L * nbytes,
            lambda i, cfg, c=chunk_sets, m=m: tk.reduce_requantize_messages(c[i], INT8_H32_SR, M, m, INT4_H32_SR,
                                                                            seed=i, **cfg),
            lambda i, c=chunk_sets, m=m: reference.reduce_requantize_messages(c[i], INT8_H32_SR, M, m, INT4_H32_SR,
                                                                              seed=i), k))
    # TLq-HS last hop: W int4 chunks -> sum -> inverse Hadamard -> fp32
    for W in (2, 4, 8):
        n = numel // W
        nbytes = INT4_H32.wire_nbytes(n)
        k = n_sets(W * nbytes, l2_bytes)
        chunk_sets = [torch.stack([reference.quantize(randn(n), INT4_H32, rotate=False).data for _ in range(W)])
                      for _ in range(k)]
        out = torch.empty(n, device=dev)
        cases.append(Case(
            f"dequantize_sum {INT4_H32} W={W} -> fp32", numel, W * nbytes + 4 * n, W * nbytes,
            lambda i, cfg, c=chunk_sets, n=n, out=out: tk.dequantize_sum(c[i], INT4_H32, n, out=out, **cfg),
            lambda i, c=chunk_sets, n=n, out=out: reference.dequantize_sum(c[i], INT4_H32, n, out=out), k))
    # qWD: quantize (fp32 master - bf16 replica) with stochastic rounding; replica += decode
    k = n_sets(6 * numel, l2_bytes)
    masters = [randn(numel) for _ in range(k)]
    replicas = [(m + randn(numel) * 1e-3).to(torch.bfloat16) for m in masters]
    cases.append(Case(
        f"quantize {INT4_QWD} fp32-bf16 (qWD)", numel, 6 * numel + INT4_QWD.wire_nbytes(numel), 6 * numel,
        lambda i, cfg: tk.quantize(masters[i], INT4_QWD, seed=i, subtract=replicas[i], **cfg),
        lambda i: reference.quantize(masters[i], INT4_QWD, seed=i, subtract=replicas[i]), k))
    read = INT4_G2048.wire_nbytes(numel) + 2 * numel  # the delta and the replica it is added to
    k = n_sets(read, l2_bytes)
    packs = [reference.quantize(randn(numel) * 1e-3, INT4_G2048) for _ in range(k)]
    targets = [randn(numel, torch.bfloat16) for _ in range(k)]
    cases.append(Case(
        f"dequantize {INT4_G2048} accumulate bf16 (qWD)", numel, read + 2 * numel, read,
        lambda i, cfg: tk.dequantize(packs[i], out=targets[i], accumulate=True, **cfg),
        lambda i: reference.dequantize(packs[i], out=targets[i], accumulate=True), k))
    return cases


# ---- device timing --------------------------------------------------------------------------------
class Batch:
    """N calls (call i on input set i % sets), timed as one CUDA-graph replay or launched eagerly."""

    def __init__(self, fn: Callable[[int], object], sets: int, calls: int) -> None:
        self.fn, self.sets, self.calls = fn, sets, calls
        for i in range(min(sets, calls)):  # compile and allocate before capturing
            fn(i)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for i in range(calls):
                fn(i % sets)
        torch.cuda.synchronize()

    def device_ms(self) -> float:
        """Device time per call: one replay of the captured calls."""
        return _elapsed_ms(self.graph.replay) / self.calls

    def eager_ms(self) -> float:
        """Time per call launched one by one from Python (host launch cost included)."""

        def launch_all() -> None:
            for i in range(self.calls):
                self.fn(i % self.sets)

        return _elapsed_ms(launch_all) / self.calls


def _elapsed_ms(work: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def estimate_call_ms(fn: Callable[[int], object], sets: int) -> float:
    """Rough time per call (eager, after a compile call): sizes the batches."""
    fn(0)
    probes = min(sets, 4)
    return _elapsed_ms(lambda: [fn(i) for i in range(probes)]) / probes


class Copies:
    """Device-to-device copies moving a given number of bytes (read + written), as Batches."""

    WARM_BYTES = 1 << 30  # copied per call while warming up

    def __init__(self, l2_bytes: int) -> None:
        self.l2_bytes = l2_bytes
        self._warm: Batch | None = None

    def batch(self, bytes_moved: int, calls: int) -> Batch:
        n = bytes_moved // 2
        k = n_sets(n, self.l2_bytes)
        src = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda") for _ in range(k)]
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        return Batch(lambda i: dst.copy_(src[i]), k, max(calls, k))

    def warm(self, seconds: float, *, min_s: float = 0.0) -> WarmUp:
        """Busy 1 GiB copies until their bandwidth is stable (at least min_s, at most seconds)."""
        if self._warm is None:
            self._warm = self.batch(2 * self.WARM_BYTES, 8)
        b = self._warm
        return warm_up(lambda: 2 * self.WARM_BYTES / b.device_ms() / 1e9, min_s=min_s, max_s=seconds)


def _sm_clock_mhz() -> int | None:
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # needs pynvml (nvidia-ml-py); the clock is a diagnostic only
        return None


def run(sizes: list[int], *, with_reference: bool, sweep: bool, rep_ms: float, repeats: int, only: str | None,
        warmup_s: float, on_row: Callable[[list[Row], dict], None]) -> list[Row]:
    """Every kernel at every size; on_row(rows so far, what the warm-up saw) after each row."""
    from halfbyte.quant import triton_kernels as tk

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = Copies(l2)
    clock_idle = _sm_clock_mhz()
    warm = copies.warm(warmup_s, min_s=min(2.0, warmup_s))
    warm_info = {"seconds": round(warm.seconds, 2), "stable": warm.stable,
                 "copy_tbps_first_last": [round(warm.tbps[0], 3), round(warm.tbps[-1], 3)],
                 "sm_clock_mhz_before_after": [clock_idle, _sm_clock_mhz()], "l2_bytes": l2}
    print(f"warm-up: {warm.seconds:.1f} s, copy {warm.tbps[0]:.2f} -> {warm.tbps[-1]:.2f} TB/s"
          f"{'' if warm.stable else ' (NOT stable: rows may scatter)'}, SM clock "
          f"{clock_idle} -> {warm_info['sm_clock_mhz_before_after'][1]} MHz", flush=True)
    print(_HEADER, flush=True)
    rows: list[Row] = []
    for numel in sizes:
        for case in build_cases(numel, l2, tk):
            if only and not re.search(only, case.kernel):
                continue
            configs = [("default", {})]
            if sweep:
                configs += [(f"tile={t},warps={w}", {"tile_values": t, "num_warps": w}) for t, w in SWEEP]
            ref_ms = None
            if with_reference:  # eager, a few calls: the reference is what the kernels replace
                ref_ms = _elapsed_ms(lambda: [case.ref(i % case.sets) for i in range(3)]) / 3
            for name, cfg in configs:
                ours = lambda i, cfg=cfg: case.ours(i, cfg)  # noqa: E731
                calls = calls_for(estimate_call_ms(ours, case.sets), rep_ms, case.sets)
                kernel = Batch(ours, case.sets, calls)
                copy = copies.batch(case.bytes_moved, calls)
                copies.warm(0.3, min_s=0.2)  # the clocks may have dropped while inputs were built
                times = interleave({"kernel": kernel.device_ms, "copy": copy.device_ms,
                                    "eager": kernel.eager_ms}, repeats)
                row = make_row(case, name, times["kernel"], times["copy"], times["eager"], calls, ref_ms)
                rows.append(row)
                print(_fmt_row(row), flush=True)
                on_row(rows, warm_info)
                del kernel, copy  # their graphs hold the outputs of every captured call
            del case
        torch.cuda.empty_cache()
    return rows


# ---- reporting ----------------------------------------------------------------------------------
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


_HEADER = (f"{'kernel':<76} {'size':>5} {'config':<16} {'dev us':>9} {'eager us':>9} {'TB/s':>6} "
           f"{'copy TB/s':>9} {'% copy (min-max)':>17} {'eager %':>8} {'vs ref':>7}")


def _fmt_row(r: Row) -> str:
    ref = f"{r.speedup_vs_reference:6.1f}x" if r.speedup_vs_reference else "      -"
    spread = f"{r.pct_of_copy:5.1f} ({r.pct_min:.0f}-{r.pct_max:.0f})"
    return (f"{r.kernel:<76} {_fmt_size(r.numel):>5} {r.config:<16} {1e3 * r.ms:9.1f} {1e3 * r.eager_ms:9.1f} "
            f"{r.tbps:6.2f} {r.copy_tbps:9.2f} {spread:>17} {r.eager_pct_of_copy:7.1f}% {ref:>7}")


def to_markdown(meta: dict, rows: list[Row]) -> str:
    warm = meta.get("warmup", {})
    lines = [
        f"# Kernel benchmark: {meta['device']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"torch {meta['torch']}, triton {meta['triton']}. TB/s counts bytes read + written; copy = a "
        "device-to-device copy of the same bytes in the same run. Device time: CUDA-graph replay of "
        "N calls (no host launch cost); eager: the same calls launched one by one (as the engine "
        f"sees them). % of copy: median (min-max) over {meta.get('repeats', '?')} interleaved repeats. "
        f"Inputs rotate so that no call finds them in L2. Warm-up: {warm.get('seconds', '?')} s, "
        f"stable: {warm.get('stable', '?')}.",
        "",
        "| kernel | size | config | device us | eager us | TB/s | copy TB/s | % of copy (min-max) | "
        "eager % of copy | reference ms | speedup vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref_ms = f"{r.reference_ms:.2f}" if r.reference_ms else "-"
        speed = f"{r.speedup_vs_reference:.1f}x" if r.speedup_vs_reference else "-"
        lines.append(f"| {r.kernel} | {_fmt_size(r.numel)} | {r.config} | {1e3 * r.ms:.1f} | {1e3 * r.eager_ms:.1f} | "
                     f"{r.tbps:.2f} | {r.copy_tbps:.2f} | {r.pct_of_copy:.1f}% ({r.pct_min:.1f}-{r.pct_max:.1f}) | "
                     f"{r.eager_pct_of_copy:.1f}% | {ref_ms} | {speed} |")
    return "\n".join(lines) + "\n"


def compare(old_rows: list[dict], new_rows: list[Row], tolerance_pct: float) -> tuple[list[str], bool | None]:
    """Lines comparing each new row's % of copy with the same (kernel, size, config) of an earlier
    run, and whether every row >= 16M agrees within tolerance_pct percent (relative); None when no
    such row was in both runs."""
    old = {(r["kernel"], r["numel"], r["config"]): r for r in old_rows}
    lines, agree, held_rows = [], True, 0
    for r in new_rows:
        prev = old.get((r.kernel, r.numel, r.config))
        if prev is None:
            lines.append(f"{r.kernel} {_fmt_size(r.numel)} {r.config}: not in the earlier run")
            continue
        change = 100 * (r.pct_of_copy / prev["pct_of_copy"] - 1)
        held = r.numel >= COMPARED_FROM
        held_rows += held
        ok = abs(change) <= tolerance_pct or not held
        agree &= ok
        flag = "" if ok else f"  <- beyond {tolerance_pct:g}%"
        lines.append(f"{r.kernel} {_fmt_size(r.numel)} {r.config}: {prev['pct_of_copy']:.1f}% -> "
                     f"{r.pct_of_copy:.1f}% of copy ({change:+.1f}%){flag}")
    return lines, agree if held_rows else None


def _load_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's JSON, checked for the fields `compare` reads."""
    try:
        rows = json.loads(path.read_text())["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError("rows must be a list of objects")
        missing = {key for r in rows for key in ("kernel", "numel", "config", "pct_of_copy") if key not in r}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--compare {path}: not a `halfbyte bench kernels` JSON ({err})") from None
    if missing:
        raise ValueError(f"--compare {path}: rows lack {', '.join(sorted(missing))}")
    return rows


def _positive(kind: type) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
        return value
    return parse


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="halfbyte bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_parse_size, nargs="+", default=[16 << 20, 25 << 20, 64 << 20, 256 << 20],
                   help="values per operation, K/M/G = 2**10/20/30 (default: 16M 25M 64M 256M; 25M is about "
                        "the engine's default bucket)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default: {DEFAULT_RESULTS_DIR}/kernels-<gpu-name>.json)")
    p.add_argument("--md", type=Path, default=None, help="markdown table path (default: --out with .md)")
    p.add_argument("--no-reference", action="store_true", help="skip timing the plain-torch reference")
    p.add_argument("--sweep", action="store_true", help="also time each kernel at several tile/warp configs")
    p.add_argument("--only", default=None, help="regex: run only kernels whose name matches")
    p.add_argument("--rep-ms", type=_positive(float), default=10.0,
                   help="device time of one timed batch of calls (default 10)")
    p.add_argument("--repeats", type=_positive(int), default=7,
                   help="interleaved kernel/copy measurements per row (default 7)")
    p.add_argument("--warmup-s", type=_positive(float), default=10.0,
                   help="longest warm-up before the first row (default 10; it stops once the copy is stable)")
    p.add_argument("--compare", type=Path, default=None,
                   help="an earlier run's JSON: print each row's change in %% of copy against it")
    p.add_argument("--tolerance", type=_positive(float), default=3.0,
                   help="with --compare: the relative change allowed for rows >= 16M (default 3%%)")
    args = p.parse_args(argv)

    try:
        old_rows = _load_rows(args.compare) if args.compare else None
    except ValueError as err:
        print(f"halfbyte bench kernels: {err}", file=sys.stderr)
        return 2
    if problem := out_problems([(args.out, "--out", "results.json"), (args.md, "--md", "results.json")]):
        print(f"halfbyte bench kernels: {problem}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("halfbyte bench kernels: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("halfbyte bench kernels: needs Triton (pip install triton)", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    out = args.out or DEFAULT_RESULTS_DIR / f"kernels-{_slug(device)}.json"
    md = args.md or out.with_suffix(".md")
    command = "halfbyte bench kernels " + " ".join(argv)
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": command.strip(),
            "bandwidth": "TB/s = (bytes read + bytes written) / time", "repeats": args.repeats,
            "rep_ms": args.rep_ms,
            "timing": "device: CUDA-graph replay of `calls` calls; eager: the same calls launched one by one; "
                      "medians and min/max over interleaved repeats"}
    out.parent.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[Row], warm: dict) -> None:
        # after every row: a run stopped by a time limit keeps what it measured
        done = {**meta, "warmup": warm}
        out.write_text(json.dumps({**done, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
        md.write_text(to_markdown(done, rows))

    rows = run(args.sizes, with_reference=not args.no_reference, sweep=args.sweep, rep_ms=args.rep_ms,
               repeats=args.repeats, only=args.only, warmup_s=args.warmup_s, on_row=write)
    if not rows:
        print(f"halfbyte bench kernels: no kernel matches --only {args.only!r}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {md}")
    if old_rows is not None:
        lines, agree = compare(old_rows, rows, args.tolerance)
        print(f"against {args.compare}:")
        print("\n".join(lines))
        verdict = {True: "yes", False: "NO", None: "no such row in both runs"}[agree]
        print(f"every row >= {_fmt_size(COMPARED_FROM)} within {args.tolerance:g}%: {verdict}")
    return 0
