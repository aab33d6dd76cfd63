"""What rank 0 shows and writes: a tqdm bar, OUT/metrics.jsonl, TensorBoard events (when installed),
and OUT/loss.png (when matplotlib is installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Rank 0's outputs. On resume, metrics past the resumed step (written after that checkpoint) are
    dropped so the curve continues without duplicates."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, *, resumed: bool):
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        records = read_metrics(self.metrics_path) if resumed else []
        kept = [r for r in records if r["step"] <= start_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.metrics_path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.tb = self._tensorboard(out_dir, start_step)

    def _tensorboard(self, out_dir: Path, start_step: int) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note("TensorBoard logging off (pip install 'halfbyte[tensorboard]' to turn it on)")
            return None
        # purge_step drops events past the resumed step, as for metrics.jsonl
        return SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def note(self, message: str) -> None:
        tqdm.write(message)

    def progress(self, step: int, postfix: str) -> None:
        self.bar.n = step
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()

    def log(self, record: dict[str, Any]) -> None:
        """One line of strict JSON: a non-finite number is written as null."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.bar.close()
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss(metrics_path: Path, png_path: Path, title: str) -> str | None:
    """Train and validation loss against step. Returns a notice when nothing could be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss.png skipped: matplotlib is not installed (pip install 'halfbyte[plot]')"
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None
