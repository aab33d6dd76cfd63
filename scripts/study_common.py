"""What the study scripts (local_updates_study.py, gpu_study.py, convergence_study.py) share: reading
metrics, the validation-loss figure, and where the Python-source corpus comes from."""

from __future__ import annotations

import json
import site
from pathlib import Path

# Large installed packages whose Python files make the GPU studies' corpus (nothing is redistributed:
# it is rebuilt on the machine that trains).
CORPUS_PACKAGES = ("torch", "transformers", "jax", "scipy", "sympy", "sklearn", "pandas", "numpy", "matplotlib")


def corpus_dirs(packages: tuple[str, ...] = CORPUS_PACKAGES) -> list[str]:
    """The installed directories of `packages` (those present), sorted, so that a machine with the
    same packages tokenizes the same files in the same order."""
    return sorted({str(Path(root) / pkg) for root in site.getsitepackages() for pkg in packages
                   if (Path(root) / pkg).is_dir()})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_val_loss(rows: list[dict], path: Path, title: str) -> None:
    """Validation curves (`val_curve`: [[step, loss], ...]), whole run and second half side by side;
    local-update runs (`outer_steps` > 0) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, tail) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    steps = max(step for row in rows for step, _ in row["val_curve"])
    for row, color in zip(rows, colors):
        xs, ys = zip(*row["val_curve"])
        style = "--" if row["outer_steps"] else "-"
        for ax in (full, tail):
            ax.plot(xs, ys, style, marker=".", color=color, label=row["label"])
    late = [loss for row in rows for step, loss in row["val_curve"] if step >= steps / 2]
    tail.set_xlim(steps / 2 - 8, steps + 8)
    tail.set_ylim(min(late) - 0.02, max(late) + 0.02)
    full.set_title(title)
    tail.set_title("second half")
    for ax in (full, tail):
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    full.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
