"""`halfbyte simulate`: projected step time, tokens/s and speedup per mode (cost model in costmodel.py).

    halfbyte simulate --model 1.3b --nodes 16 --gpus-per-node 8 --inter-gbps 100 --compute-ms 250
    halfbyte simulate --model 1.3b --nodes 2 --gpus-per-node 1 --inter-gbps 32 \
        --compute-from benchmarks/results/h200-x2/at-8be0148/train-1gpu-350m-1.3b.json
    halfbyte simulate --model 1.3b --nodes 2 --gpus-per-node 4 --sweep-inter-gbps 10,25,50,100,200,400 \
        --plot sweep.png --json sweep.json
    halfbyte simulate --sdp4bit-table --json table.json --plot table.png
    halfbyte simulate --calibrate benchmarks/results/comm-cpu-gloo-2x1.json \
        --predict benchmarks/results/comm-cpu-gloo-2x2.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from halfbyte.bench import costmodel as cm
from halfbyte.bench import out_problems
from halfbyte.comm.config import CommConfig
from halfbyte.quant import QuantSpec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halfbyte simulate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(cm.MODELS), help="GPT preset (layers, hidden, seq 2048)")
    m.add_argument("--params", type=float, help="parameter count instead of --model, e.g. 1.3e9")
    m.add_argument("--layers", type=int, help="layers (with --params)")
    m.add_argument("--seq-len", type=int, default=2048, help="sequence length (with --params)")
    m.add_argument("--tokens-per-step", type=int,
                   help="tokens in one global batch (default: one sequence per data-parallel rank)")
    h = p.add_argument_group("hardware")
    h.add_argument("--nodes", type=int, default=16)
    h.add_argument("--gpus-per-node", type=int, default=8)
    h.add_argument("--intra-gbps", type=float, default=1600.0, help="NVLink Gb/s per GPU per direction")
    h.add_argument("--inter-gbps", type=float, default=100.0, help="inter-node Gb/s (see --nic)")
    h.add_argument("--nic", choices=cm.NIC_MODES, default="per-gpu",
                   help="--inter-gbps is one GPU's own NIC (rail-optimized) or the node's, shared by its GPUs")
    h.add_argument("--intra-latency-us", type=float, default=1.0, help="per ring step inside a node")
    h.add_argument("--inter-latency-us", type=float, default=5.0, help="per ring step across nodes")
    h.add_argument("--all-to-all-efficiency", type=float, default=1.0,
                   help="share of the link bandwidth all-to-alls reach vs a ring (0.7 measured for NCCL over "
                        "TCP sockets; docs/simulate.md)")
    w = p.add_argument_group("step")
    w.add_argument("--compute-ms", type=float, help="compute time per step (e.g. from `halfbyte bench train`)")
    w.add_argument("--compute-from", type=Path,
                   help="a `halfbyte bench train` JSON: compute, optimizer and forward share from its "
                        "baseline row for --model, waits on communication taken out, the optimizer "
                        "rescaled to this data-parallel size; tokens per step from its batch")
    w.add_argument("--mfu", type=float, default=0.4,
                   help="without --compute-ms: compute = FLOPs / (mfu * peak) * pipeline bubble")
    w.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    w.add_argument("--tp", type=int, default=1, help="tensor parallel degree")
    w.add_argument("--pp", type=int, default=1, help="pipeline parallel degree")
    w.add_argument("--grad-accum", type=int, default=1)
    w.add_argument("--bucket-numel", type=int, default=25_000_000)
    w.add_argument("--no-overlap", action="store_true", help="communication fully exposed (Megatron default)")
    w.add_argument("--grad-bytes", type=int, default=2, help="uncompressed gradient element bytes (4 = fp32)")
    w.add_argument("--weight-bytes", type=int, default=2, help="uncompressed weight element bytes")
    w.add_argument("--codec-tbps", type=float, default=1.0, help="codec kernels, TB/s read + written")
    w.add_argument("--modes", default=",".join(CommConfig.preset_names()), help="comma-separated presets")
    o = p.add_argument_group("output")
    o.add_argument("--sweep-inter-gbps", help="comma-separated inter-node Gb/s values to sweep")
    o.add_argument("--sweep-clusters", help="with --sweep-inter-gbps: comma-separated NODESxGPUS, e.g. 2x4,16x8")
    o.add_argument("--sdp4bit-table", action="store_true", help="reproduce SDP4Bit's Table 2 setting")
    o.add_argument("--calibrate", type=Path, help="fit alpha-beta to a `halfbyte bench comm` JSON and compare")
    o.add_argument("--predict", type=Path,
                   help="with --calibrate: predict another `halfbyte bench comm` JSON with the fitted numbers")
    o.add_argument("--json", type=Path, help="write results here")
    o.add_argument("--plot", type=Path, help="write a PNG here (sweep or table)")
    return p


# ---- argument handling -------------------------------------------------------------------------
def _model(args: argparse.Namespace) -> cm.ModelShape:
    if (args.model is None) == (args.params is None):
        raise ValueError("give exactly one of --model or --params")
    if args.model:
        return cm.MODELS[args.model]
    if args.layers is None:
        raise ValueError("--params needs --layers")
    return cm.ModelShape.from_params(args.params, args.layers, args.seq_len)


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    valid = CommConfig.preset_names()
    bad = [m for m in modes if m not in valid]
    if bad or not modes:
        raise ValueError(f"--modes must name presets from {', '.join(valid)}; got {text!r}")
    return modes


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{flag} values must be > 0, got {text!r}")
    return values


def _clusters(args: argparse.Namespace) -> list[tuple[int, int]]:
    if not args.sweep_clusters:
        return [(args.nodes, args.gpus_per_node)]
    shapes = []
    for item in args.sweep_clusters.split(","):
        try:
            nodes, gpus = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sweep-clusters entries must look like 16x8, got {item!r}") from None
        shapes.append((nodes, gpus))
    return shapes


def _setup(args: argparse.Namespace, model: cm.ModelShape, nodes: int, gpus: int,
           inter_gbps: float) -> tuple[cm.Cluster, cm.Workload]:
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--grad-accum", args.grad_accum),
                        ("--tokens-per-step", args.tokens_per_step)):
        if value is not None and value < 1:  # they divide; a --tokens-per-step 0 was taken for the default
            raise ValueError(f"{flag} must be >= 1, got {value}")
    cluster = cm.Cluster(nodes, gpus, intra_gbps=args.intra_gbps, inter_gbps=inter_gbps,
                         intra_latency_us=args.intra_latency_us, inter_latency_us=args.inter_latency_us,
                         nic=args.nic, all_to_all_efficiency=args.all_to_all_efficiency)
    M, L = cm.dp_layout(cluster, args.tp, args.pp)
    tokens = args.tokens_per_step or M * L * model.seq_len
    optimizer, forward_fraction = 0.0, cm.Workload.forward_fraction
    if args.compute_from is not None:
        if args.compute_ms is not None:
            raise ValueError("give --compute-ms or --compute-from, not both")
        compute, optimizer, forward_fraction, rank_tokens = measured_compute(args.compute_from, args.model, M * L)
        if args.tokens_per_step is not None and args.tokens_per_step != rank_tokens * M * L:
            raise ValueError(f"--tokens-per-step {args.tokens_per_step}: the compute in {args.compute_from} "
                             f"is for {rank_tokens} tokens per rank, {rank_tokens * M * L} in all")
        tokens = rank_tokens * M * L
    elif args.compute_ms is not None:
        if not args.compute_ms >= 0:
            raise ValueError(f"--compute-ms must be >= 0, got {args.compute_ms}")
        compute = args.compute_ms / 1e3
    else:
        compute = cm.compute_seconds(model, tokens, cluster.world, args.mfu, args.peak_tflops,
                                     args.pp, args.grad_accum)
    wl = cm.Workload(compute_s=compute, tokens_per_step=tokens, tp=args.tp, pp=args.pp,
                     grad_accum=args.grad_accum, bucket_numel=args.bucket_numel,
                     overlap=not args.no_overlap, weight_bytes=args.weight_bytes,
                     grad_bytes=args.grad_bytes, codec_tbps=args.codec_tbps, optimizer_s=optimizer,
                     forward_fraction=forward_fraction)
    return cluster, wl


def measured_compute(path: Path, model: str | None, dp_world: int) -> tuple[float, float, float, int]:
    """(compute s, optimizer s, forward share of the passes, tokens per rank) per step from the
    baseline row for `model` of a `halfbyte bench train` JSON. Waits on communication are taken out
    of each phase; the optimizer (and zero_grad) works on a 1/W shard, so its time is rescaled from
    the measured world size to `dp_world`."""
    if model is None:
        raise ValueError("--compute-from needs --model (the row to read)")
    try:
        result = json.loads(path.read_text())
        world, meta = result["meta"]["world_size"], result["meta"]
        rows = [r for r in result["rows"] if r["model"] == model and r["preset"] == "baseline"
                and r.get("engine", "halfbyte") == "halfbyte"]  # the engine the cost model models
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--compute-from {path}: not a `halfbyte bench train` JSON ({err})") from None
    if not rows:
        raise ValueError(f"--compute-from {path} has no baseline row for model {model}")
    row = rows[0]
    waits = row["exposed_comm_ms_by_phase"]
    fwd, bwd = (row[f"{p}_ms"] - waits.get(p, 0.0) for p in ("forward", "backward"))
    if not (fwd > 0 and bwd > 0):
        raise ValueError(f"--compute-from {path}: the {model} baseline row has no forward/backward time")
    opt = (row["optimizer_ms"] - waits.get("optimizer", 0.0) + row["zero_grad_ms"]) * world / dp_world
    rank_tokens = meta["micro_batch"] * meta["grad_accum"] * meta["seq_len"][model]
    return (fwd + bwd + opt) / 1e3, opt / 1e3, fwd / (fwd + bwd), rank_tokens


# ---- the three jobs ----------------------------------------------------------------------------
def _table(estimates: list[cm.StepEstimate]) -> str:
    head = (f"{'mode':<9}{'step ms':>10}{'compute':>9}{'exposed':>9}{'comm':>9}{'codec':>8}"
            f"{'inter MB':>10}{'intra MB':>10}{'tokens/s':>12}{'speedup':>9}")
    rows = [head, "-" * len(head)]
    for e in estimates:
        rows.append(f"{e.mode:<9}{e.step_s * 1e3:>10.1f}{e.compute_s * 1e3:>9.1f}{e.exposed_s * 1e3:>9.1f}"
                    f"{e.comm_s * 1e3:>9.1f}{e.codec_s * 1e3:>8.1f}{e.inter_bytes / 1e6:>10.0f}"
                    f"{e.intra_bytes / 1e6:>10.0f}{e.tokens_per_s:>12.0f}{e.speedup:>8.2f}x")
    return "\n".join(rows)


def run_single(args: argparse.Namespace) -> dict:
    model, modes = _model(args), _modes(args.modes)
    cluster, wl = _setup(args, model, args.nodes, args.gpus_per_node, args.inter_gbps)
    estimates = cm.simulate(modes, model.params, cluster, wl)
    print(f"{model.name}: {model.params / 1e9:.2f}B params, {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs, "
          f"tp {wl.tp} pp {wl.pp}, {wl.tokens_per_step} tokens/step, inter {cluster.inter_gbps:g} Gb/s "
          f"({cluster.nic}), overlap {wl.overlap}")
    print(_table(estimates))
    return {"model": asdict(model) | {"params": model.params}, "cluster": asdict(cluster),
            "workload": asdict(wl), "results": [e.to_dict() for e in estimates]}


def run_sweep(args: argparse.Namespace) -> dict:
    model, modes = _model(args), _modes(args.modes)
    bandwidths = _floats(args.sweep_inter_gbps, "--sweep-inter-gbps")
    curves = []
    for nodes, gpus in _clusters(args):
        speedups: dict[str, list[float]] = {m: [] for m in modes}
        step_ms: dict[str, list[float]] = {m: [] for m in modes}
        for gbps in bandwidths:
            cluster, wl = _setup(args, model, nodes, gpus, gbps)
            for e in cm.simulate(modes, model.params, cluster, wl):
                speedups[e.mode].append(e.speedup)
                step_ms[e.mode].append(e.step_s * 1e3)
        curves.append({"nodes": nodes, "gpus_per_node": gpus, "compute_ms": wl.compute_s * 1e3,
                       "tokens_per_step": wl.tokens_per_step, "speedup": speedups, "step_ms": step_ms})
        print(f"\n{model.name}, {nodes} x {gpus} GPUs, compute {wl.compute_s * 1e3:.1f} ms/step: speedup vs baseline")
        print(f"{'Gb/s':>8}" + "".join(f"{m:>9}" for m in modes))
        for i, gbps in enumerate(bandwidths):
            print(f"{gbps:>8g}" + "".join(f"{speedups[m][i]:>8.2f}x" for m in modes))
    out = {"model": asdict(model) | {"params": model.params}, "inter_gbps": bandwidths, "nic": args.nic,
           "overlap": not args.no_overlap, "curves": curves}
    if args.plot:
        _plot_sweep(out, args.plot)
    return out


def run_sdp4bit_table(args: argparse.Namespace) -> dict:
    rows, fits = [], {}
    for platform in cm.PLATFORMS:
        runs = [r for r in cm.SDP4BIT_TABLE2 if r.platform == platform]
        fit = cm.fit_platform(runs, args.codec_tbps)
        fits[platform] = fit
        for r in runs:
            pred = cm.predict_run(r, fit["inter_gbps_per_gpu"], fit["compute_tflops"], args.codec_tbps)
            rows.append({"platform": platform, "model": r.model, "tp": r.tp, "pp": r.pp,
                         "published": asdict(r), "simulated": pred,
                         "implied": cm.implied_bandwidth(r, args.codec_tbps)})
    print("SDP4Bit Table 2 vs the cost model (Megatron setting: no overlap, fp32 gradient reduce-scatter).")
    for platform, fit in fits.items():
        print(f"  {cm.PLATFORMS[platform].name}: fitted {fit['inter_gbps_per_gpu']:.0f} Gb/s per GPU, "
              f"compute {fit['compute_tflops']:.0f} TFLOPs/GPU, rms log error {fit['rms_log_error']:.3f}")
    print(f"{'platform':<9}{'model':<6}{'tp/pp':>6}{'base TF pub/sim':>17}{'SDP4Bit TF pub/sim':>20}"
          f"{'speedup pub/sim':>17}{'implied Gb/s':>14}{'implied TF':>12}")
    for row in rows:
        pub, sim, imp = row["published"], row["simulated"], row["implied"]
        print(f"{row['platform']:<9}{row['model']:<6}{row['tp']:>3}/{row['pp']:<2}"
              f"{pub['baseline_tflops']:>9.1f}/{sim['baseline_tflops']:<7.1f}"
              f"{pub['sdp4bit_tflops']:>11.1f}/{sim['sdp4bit_tflops']:<8.1f}"
              f"{pub['speedup']:>9.2f}/{sim['speedup']:<7.2f}"
              f"{imp['inter_gbps_per_gpu']:>14.1f}{imp['compute_tflops']:>12.1f}")
    out = {"platforms": {k: asdict(v) for k, v in cm.PLATFORMS.items()}, "fits": fits, "rows": rows,
           "codec_tbps": args.codec_tbps}
    if args.plot:
        _plot_table(out, args.plot)
    return out


# ---- calibration against measured collectives --------------------------------------------------
RECORD_KEYS = ("collective", "mode", "spec", "intra_spec", "dtype_bytes", "nodes", "gpus_per_node", "numel",
               "seconds")
FIT_TERMS = ("alpha", "link", "codec")  # seconds per latency step, per wire byte, per codec byte


def _spec(fields: dict | None, where: str) -> QuantSpec | None:
    if fields is None:
        return None
    try:
        return QuantSpec(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: not QuantSpec fields ({err})") from None


def load_comm_records(path: Path) -> list[dict]:
    """The records of a `halfbyte bench comm` JSON ({"records": [...]}, or a bare list of records;
    the format is described in halfbyte/bench/comm.py)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # missing, unreadable, not JSON
        why = getattr(err, "strerror", None) or err
        raise ValueError(f"{path}: not a `halfbyte bench comm` JSON ({why})") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected {{'records': [...]}} from `halfbyte bench comm`, or a list of records")
    for i, rec in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}")
        if rec["collective"] not in ("all_gather", "reduce_scatter"):
            raise ValueError(f"{path}: record {i} collective must be all_gather or reduce_scatter, "
                             f"got {rec['collective']!r}")
        if rec["dtype_bytes"] not in (1, 2, 4):
            raise ValueError(f"{path}: record {i} dtype_bytes must be 1, 2 or 4, got {rec['dtype_bytes']!r}")
        if not rec["seconds"] > 0:
            raise ValueError(f"{path}: record {i} seconds must be > 0, got {rec['seconds']!r}")
        _spec(rec["spec"], f"{path}: record {i} spec")
        if _spec(rec["intra_spec"], f"{path}: record {i} intra_spec") and rec["spec"] is None:
            raise ValueError(f"{path}: record {i} has an intra_spec but no spec (the inter-node hop's)")
    return records


def record_cost(rec: dict) -> cm.CollectiveCost:
    """The cost model's view of one measured collective: the same accounting and algorithm (ring,
    all-to-all or two-level) as the simulation, with unit link speeds (only bytes and steps are used)."""
    M, L, db = int(rec["nodes"]), int(rec["gpus_per_node"]), int(rec["dtype_bytes"])
    cluster, wl = cm.Cluster(M, L), cm.Workload(compute_s=0.0, tokens_per_step=1)
    spec, intra = _spec(rec["spec"], "spec"), _spec(rec["intra_spec"], "intra_spec")
    if rec["collective"] == "all_gather":
        shard = int(rec["numel"]) // (M * L)
        return cm.all_gather_cost(spec, shard, 1, M, L, cluster, wl, elem_bytes=db, source_bytes=db)
    return cm.reduce_scatter_cost(spec, intra, int(rec["numel"]), 1, M, L, cluster, wl, elem_bytes=db)


def _features(rec: dict) -> tuple[float, float, float]:
    """(latency steps, bytes sent by this rank, codec bytes) of one measured collective."""
    cost = record_cost(rec)
    return float(cost.steps), cost.intra_bytes + cost.inter_bytes, cost.codec_bytes


def _compare(records: list[dict], coef: list[float]) -> dict:
    """Each record's predicted seconds (and its codec part) next to the measured ones."""
    import numpy as np

    features = np.array([_features(r) for r in records])
    predicted = features @ np.asarray(coef)
    measured = np.array([r["seconds"] for r in records])
    rel = predicted / measured - 1
    rows = []
    for r, f, p, e in zip(records, features, predicted, rel):
        measured_wire = r.get("wire_intra_bytes", 0) + r.get("wire_inter_bytes", 0)
        rows.append(r | {"predicted_seconds": float(p), "predicted_codec_seconds": float(f[2] * coef[2]),
                         "rel_error": float(e), "model_wire_bytes": float(f[1]),
                         "wire_bytes_match": "wire_intra_bytes" not in r or measured_wire == f[1]})
    by_mode = {}
    for mode in dict.fromkeys(r["mode"] for r in records):  # where the model errs shows why
        errors = [row["rel_error"] for row in rows if row["mode"] == mode]
        by_mode[mode] = {"median_rel_error": float(np.median(errors)), "records": len(errors)}
    return {"median_abs_rel_error": float(np.median(np.abs(rel))), "max_abs_rel_error": float(np.abs(rel).max()),
            "by_mode": by_mode, "rows": rows}


def calibrate(records: list[dict]) -> dict:
    """Fit seconds = alpha * steps + bytes / link bandwidth + codec bytes / codec rate to measured
    collectives and report each record's error.

    Emulated nodes share one host's loopback, so one link class. Least squares on the relative
    error (sizes span decades: absolute residuals would fit the largest records only), with every
    coefficient >= 0: the best of the fits on each subset of terms whose coefficients all are.
    """
    import numpy as np

    features = np.array([_features(r) for r in records])
    measured = np.array([r["seconds"] for r in records])
    weighted = features / measured[:, None]
    best, coef = np.inf, np.zeros(3)
    for mask in range(1, 8):
        cols = [j for j in range(3) if mask >> j & 1 and features[:, j].any()]
        if not cols:
            continue
        c = np.linalg.lstsq(weighted[:, cols], np.ones(len(records)), rcond=None)[0]
        residual = float(np.sum((weighted[:, cols] @ c - 1) ** 2))
        if (c >= 0).all() and residual < best:
            best, coef = residual, np.zeros(3)
            coef[cols] = c
    return {
        "alpha_us": float(coef[0] * 1e6),
        "link_GBps": float(1 / coef[1] / 1e9) if coef[1] > 0 else math.inf,
        "codec_GBps": float(1 / coef[2] / 1e9) if coef[2] > 0 else math.inf,
        "coefficients": dict(zip(FIT_TERMS, map(float, coef))),
        **_compare(records, list(coef)),
    }


def _print_rows(title: str, result: dict) -> None:
    print(f"{title}: median |error| {result['median_abs_rel_error']:.1%}, max {result['max_abs_rel_error']:.1%}")
    print(f"  {'collective':<15}{'mode':<11}{'values':>9}{'layout':>7}{'measured ms':>13}{'spread':>8}"
          f"{'model ms':>10}{'codec':>7}{'error':>8}  wire bytes")
    for r in result["rows"]:
        spread = f"{r['spread']:.0%}" if "spread" in r else "-"
        print(f"  {r['collective']:<15}{r['mode']:<11}{r['numel']:>9}{r['nodes']:>4}x{r['gpus_per_node']:<2}"
              f"{r['seconds'] * 1e3:>13.2f}{spread:>8}{r['predicted_seconds'] * 1e3:>10.2f}"
              f"{r['predicted_codec_seconds'] / r['predicted_seconds']:>7.0%}{r['rel_error']:>+8.1%}  "
              f"{'= model' if r['wire_bytes_match'] else 'DIFFER from the model'}")
    print("  median signed error per mode: " + ", ".join(
        f"{mode} {m['median_rel_error']:+.0%}" for mode, m in result["by_mode"].items()))


def run_calibrate(args: argparse.Namespace) -> dict:
    fit = calibrate(load_comm_records(args.calibrate))
    print(f"fitted on {len(fit['rows'])} records of {args.calibrate}: alpha {fit['alpha_us']:.1f} us per step, "
          f"link {fit['link_GBps']:.3g} GB/s, codec {fit['codec_GBps']:.3g} GB/s (bytes read + written)")
    _print_rows("in sample", fit)
    out = {"calibrate": str(args.calibrate), "fit": fit}
    if args.predict:
        coef = [fit["coefficients"][t] for t in FIT_TERMS]
        predicted = _compare(load_comm_records(args.predict), coef)
        _print_rows(f"out of sample, {args.predict}", predicted)
        out |= {"predict": str(args.predict), "prediction": predicted}
    return out


# ---- plots -------------------------------------------------------------------------------------
def _plot_sweep(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = out["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    for ax, c in zip(axes[0], curves):
        for mode, ys in c["speedup"].items():
            ax.plot(out["inter_gbps"], ys, marker="o", ms=3, label=mode)
        ax.set_xscale("log")
        ax.set_xlabel(f"inter-node bandwidth, Gb/s ({out['nic']})")
        ax.set_ylabel("speedup vs baseline")
        ax.set_title(f"{out['model']['name']}, {c['nodes']} x {c['gpus_per_node']} GPUs, "
                     f"compute {c['compute_ms']:.0f} ms/step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # as --json does
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_table(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, platform in zip(axes, out["platforms"]):
        rows = [r for r in out["rows"] if r["platform"] == platform]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["published"]["speedup"] for r in rows], 0.4, label="published")
        ax.bar([i + 0.2 for i in x], [r["simulated"]["speedup"] for r in rows], 0.4, label="cost model")
        ax.set_xticks(list(x), [f"{r['model']}\ntp{r['tp']} pp{r['pp']}" for r in rows])
        ax.set_ylabel("SDP4Bit speedup vs baseline")
        ax.set_title(out["platforms"][platform]["name"])
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # as --json does
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.plot and not (args.sdp4bit_table or args.sweep_inter_gbps):
        print("halfbyte simulate: --plot needs --sweep-inter-gbps or --sdp4bit-table", file=sys.stderr)
        return 2
    if args.predict and not args.calibrate:
        print("halfbyte simulate: --predict needs --calibrate (the file to fit on)", file=sys.stderr)
        return 2
    # before the work
    if problem := out_problems([(args.json, "--json", "results.json"), (args.plot, "--plot", "plot.png")]):
        print(f"halfbyte simulate: {problem}", file=sys.stderr)
        return 2
    try:
        if args.calibrate:
            out = run_calibrate(args)
        elif args.sdp4bit_table:
            out = run_sdp4bit_table(args)
        elif args.sweep_inter_gbps:
            out = run_sweep(args)
        else:
            out = run_single(args)
    except ValueError as err:
        print(f"halfbyte simulate: {err}", file=sys.stderr)
        return 2
    if args.json:
        out["command"] = "halfbyte simulate " + shlex.join(argv)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0
