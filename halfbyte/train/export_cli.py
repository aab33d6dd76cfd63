"""`halfbyte export RUN_DIR --out DIR [--format safetensors|hf|pt]`: a run's weights as plain files.

Reads a checkpoint (a run directory's newest, or the checkpoint directory given) without starting
any process group: the fp32 master weights (`model.<fqn>`, whole, whatever the number of ranks that
wrote them), frozen parameters and persistent buffers, by parameter name. Formats:

  safetensors  DIR/model.safetensors (needs the safetensors package)
  pt           DIR/model.pt, a torch.save'd state dict
  hf           for runs of `--model hf:<dir>`: DIR/config.json (and the model directory's tokenizer
               and generation files) + DIR/model.safetensors with transformers' own names, so that
               `AutoModelForCausalLM.from_pretrained(DIR)` loads it; a tied output embedding is
               written once, as save_pretrained does

Runs with local updates hold one model per island: `--island K` picks one (default 0). DIR must not
exist or be empty: nothing is overwritten.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from halfbyte.engine import checkpoint
from halfbyte.train.paths import file_in_the_way
from halfbyte.train.prepare_cli import OneLineParser

FORMATS = ("safetensors", "hf", "pt")
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt")


class ExportError(ValueError):
    """What the user asked cannot be exported; the message says why."""


def find_checkpoint(path: Path) -> Path:
    """The checkpoint at `path`, or the newest complete one of the run directory `path`."""
    if not path.exists():
        raise ExportError(f"{path} does not exist; pass a checkpoint or a run directory")
    if (path / checkpoint.MARKER).is_file():
        return path
    found = checkpoint.complete_checkpoints(path / "checkpoints")
    if not found:
        raise ExportError(f"{path} is neither a complete checkpoint nor a run directory with one "
                          f"(nothing in {path / 'checkpoints'})")
    return found[-1]


def load_weights(ckpt: Path, island: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model state dict held by a checkpoint (fp32 masters, frozen params, buffers) and its
    meta.json, read in this process alone."""
    meta = checkpoint.verify(ckpt)
    prefixes = sorted(meta["engines"])
    if prefixes == [""]:
        if island is not None:
            raise ExportError(f"{ckpt} holds one model (no islands): drop --island")
        prefix = ""
    else:
        prefix = f"island{island or 0}."
        if prefix not in prefixes:
            raise ExportError(f"{ckpt} holds islands {', '.join(p.rstrip('.') for p in prefixes)}; "
                              f"--island {island} is not one of them")
    stored = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    head = f"{prefix}model."
    state = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in stored.items()
             if key.startswith(head) and hasattr(md, "properties")}
    try:
        # a damaged file makes torch warn too: warnings are shown once the load succeeded
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist: one process
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    except (Exception, CheckpointException) as e:  # data files of the right size but damaged
        raise checkpoint.unreadable(ckpt, e) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return {key[len(head):]: t for key, t in state.items()}, meta


def _hf_state(state: dict[str, torch.Tensor], model_dir: Path) -> dict[str, torch.Tensor]:
    """transformers' names (halfbyte wraps the HF model as `.hf`), a tied output embedding once."""
    config = json.loads((model_dir / "config.json").read_text())
    out = {key.removeprefix("hf."): t for key, t in state.items()}
    if config.get("tie_word_embeddings", True):
        out.pop("lm_head.weight", None)  # from_pretrained ties it back to the input embedding
    return out


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("--format safetensors needs the safetensors package: pip install safetensors "
                          "(or halfbyte[export]); --format pt needs nothing") from None
    save_file({k: t.contiguous() for k, t in state.items()}, str(path), metadata=metadata)


def export(source: Path, out: Path, fmt: str, island: int | None = None) -> Path:
    """Write the weights of `source` (run directory or checkpoint) to the new directory `out`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty directory; choose a new one "
                          "(nothing is overwritten)")
    if (blocker := file_in_the_way(out)) is not None:
        raise ExportError(f"--out {out}: {blocker} is a file, not a directory; choose another --out")
    ckpt = find_checkpoint(source)
    state, meta = load_weights(ckpt, island)
    config = meta["extra"].get("config", {})
    model_name = config.get("model", {}).get("name", "")
    model_dir = Path(model_name[3:]) if model_name.startswith("hf:") else None
    if fmt == "hf":
        if model_dir is None:
            raise ExportError(f"--format hf is for runs of --model hf:<dir>; this run trained {model_name!r}: "
                              "use --format safetensors or pt")
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"--format hf copies {model_dir / 'config.json'}, which no longer exists")
    out.mkdir(parents=True, exist_ok=True)
    info = {"checkpoint": str(ckpt), "step": meta["extra"].get("step"), "format": fmt,
            "model": model_name, "dtype": "master weights as stored (fp32 for trained parameters)"}
    if fmt == "pt":
        torch.save(state, out / "model.pt")
    elif fmt == "safetensors":
        _save_safetensors(state, out / "model.safetensors", {"format": "pt", "source": str(ckpt)})
    else:
        for name in HF_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out / name)
        _save_safetensors(_hf_state(state, model_dir), out / "model.safetensors", {"format": "pt"})
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return out


def export_main(argv: list[str]) -> int:
    parser = OneLineParser(prog="halfbyte export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", required=True, help="new directory to write (must not exist or be empty)")
    parser.add_argument("--format", default="safetensors", help="safetensors | hf | pt (default: safetensors)")
    parser.add_argument("--island", type=int, default=None, help="which island's model, for local-updates runs")
    args = parser.parse_args(argv)
    try:
        out = export(Path(args.source), Path(args.out), args.format, args.island)
    except (ValueError, OSError) as e:  # ExportError, CheckpointError, a file system refusal
        print(f"halfbyte export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}) from {find_checkpoint(Path(args.source))}")
    return 0
