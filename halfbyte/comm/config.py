"""What travels on the wire: CommConfig (weights and gradients, with named presets), shared by every
engine that uses halfbyte's collectives (halfbyte.engine, halfbyte.fsdp)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from halfbyte.quant import QuantSpec

WEIGHT_MODES = ("full", "direct", "qwd")
GRAD_MODES = ("full", "one-level", "two-level")


@dataclass(frozen=True)
class CommConfig:
    """How weights are all-gathered and gradients reduce-scattered.

    Every spec here is 4 or 8 bits: these hops run every step, without error feedback, on the Triton
    kernels on GPU; QuantSpec's 2 bits are refused (they serve OuterConfig.spec).

    weights:         "full"   all-gather the master shard cast to the replica dtype (bf16 on GPU);
                     "direct" all-gather the master shard quantized with `weight_spec` (ZeRO++ qwZ);
                     "qwd"    all-gather the quantized difference master - replica and add it (SDP4Bit).
    weight_spec:     codec for "direct" / "qwd"; must be None for "full".
    grads:           "full"      uncompressed reduce-scatter in the replica dtype;
                     "one-level" one quantized all-to-all over all ranks with `grad_spec`;
                     "two-level" `grad_intra_spec` within a node, then `grad_spec` across nodes.
    grad_spec:       codec of the (inter-node) gradient hop; None for "full".
    grad_intra_spec: codec of the intra-node hop; only for "two-level". Values stay in the Hadamard
                     domain between the hops, so both specs must use the same Hadamard block.
    """

    weights: str = "full"
    weight_spec: QuantSpec | None = None
    grads: str = "full"
    grad_spec: QuantSpec | None = None
    grad_intra_spec: QuantSpec | None = None

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"CommConfig.weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.grads not in GRAD_MODES:
            raise ValueError(f"CommConfig.grads must be one of {GRAD_MODES}, got {self.grads!r}")
        for name in ("weight_spec", "grad_spec", "grad_intra_spec"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantSpec):
                raise ValueError(f"CommConfig.{name} must be a QuantSpec or None, got {value!r}")
            if value is not None and value.bits == 2:  # QuantSpec's 2 bits are for outer.spec
                raise ValueError(f"CommConfig.{name}.bits must be 4 or 8, got 2: 2-bit values are only for "
                                 "the outer exchange of local updates (outer.spec, with error feedback); "
                                 "every-step hops have no error feedback and no 2-bit kernel")

        if self.weights == "full" and self.weight_spec is not None:
            raise ValueError("CommConfig.weight_spec is only used with weights='direct' or 'qwd'; "
                             "set it to None for weights='full'")
        if self.weights != "full" and self.weight_spec is None:
            raise ValueError(f"CommConfig.weights={self.weights!r} needs a weight_spec (e.g. "
                             "QuantSpec(bits=4, group_size=2048, rounding='stochastic'))")

        if self.grads == "full" and (self.grad_spec is not None or self.grad_intra_spec is not None):
            raise ValueError("CommConfig.grad_spec / grad_intra_spec are only used with "
                             "grads='one-level' or 'two-level'; set them to None for grads='full'")
        if self.grads != "full" and self.grad_spec is None:
            raise ValueError(f"CommConfig.grads={self.grads!r} needs a grad_spec")
        if self.grads == "one-level" and self.grad_intra_spec is not None:
            raise ValueError("CommConfig.grad_intra_spec is only used with grads='two-level'; "
                             "set it to None for grads='one-level'")
        if self.grads == "two-level":
            if self.grad_intra_spec is None:
                raise ValueError("CommConfig.grads='two-level' needs a grad_intra_spec for the "
                                 "intra-node hop (e.g. int8, group 128)")
            if self.grad_intra_spec.hadamard != self.grad_spec.hadamard:
                raise ValueError(
                    "CommConfig two-level grads stay in the Hadamard domain between hops, so "
                    f"grad_intra_spec.hadamard ({self.grad_intra_spec.hadamard}) must equal "
                    f"grad_spec.hadamard ({self.grad_spec.hadamard})")

    # ---- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> CommConfig:
        """A named configuration: baseline zeropp sdp4bit qw4 qwd tlq tlq-hs."""
        if name not in PRESETS:
            raise ValueError(f"unknown CommConfig preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[name]()

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(PRESETS)

    # ---- derived ------------------------------------------------------------------------------
    def specs(self) -> list[QuantSpec]:
        return [s for s in (self.weight_spec, self.grad_intra_spec, self.grad_spec) if s is not None]

    @property
    def alignment(self) -> int:
        """Every shard is a multiple of this: each group and Hadamard block in use fits whole."""
        align = 1
        for s in self.specs():
            align = math.lcm(align, s.group_size, s.hadamard or 1)
        return align

    def for_nodes(self, nodes: int) -> tuple[CommConfig, str | None]:
        """The config to run on `nodes` (possibly emulated) nodes, and a note when it had to change.

        The one place where the single-node rule lives: two-level gradients need an inter-node hop,
        so on one node they run one level with the inter-node codec (the same bytes per value, no
        int8 intra hop and no middle requantize). Every caller (trainer, bench, tests) uses this.
        """
        if self.grads != "two-level" or nodes >= 2:
            return self, None
        note = (f"1 node: two-level gradients run one level with the inter-node codec {self.grad_spec} "
                "(no intra-node hop, no middle requantize)")
        return dataclasses.replace(self, grads="one-level", grad_intra_spec=None), note

    def describe(self) -> str:
        """One line for logs, e.g. 'weights qwd int4/g2048/sr | grads two-level int8/... -> int4/...'."""
        w = self.weights if self.weight_spec is None else f"{self.weights} {self.weight_spec}"
        if self.grads == "two-level":
            g = f"two-level intra {self.grad_intra_spec} -> inter {self.grad_spec}"
        elif self.grads == "one-level":
            g = f"one-level {self.grad_spec}"
        else:
            g = "full"
        return f"weights {w} | grads {g}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CommConfig:
        """The inverse of to_dict (e.g. from a checkpoint's JSON)."""
        specs = ("weight_spec", "grad_spec", "grad_intra_spec")
        return cls(**{k: (QuantSpec(**v) if k in specs and v is not None else v) for k, v in d.items()})


def _int4_weights() -> QuantSpec:
    return QuantSpec(bits=4, group_size=2048, symmetric=True, rounding="stochastic")


def _tlq(hadamard: int) -> CommConfig:
    return CommConfig(
        grads="two-level",
        grad_intra_spec=QuantSpec(bits=8, group_size=128, rounding="stochastic", hadamard=hadamard),
        grad_spec=QuantSpec(bits=4, group_size=128, rounding="stochastic", hadamard=hadamard),
    )


PRESETS: dict[str, Callable[[], CommConfig]] = {
    "baseline": lambda: CommConfig(),
    "zeropp": lambda: CommConfig(
        weights="direct", weight_spec=QuantSpec(bits=8, group_size=2048, rounding="nearest"),
        grads="two-level",
        grad_intra_spec=QuantSpec(bits=4, group_size=128, rounding="nearest"),
        grad_spec=QuantSpec(bits=4, group_size=128, rounding="nearest"),
    ),
    "sdp4bit": lambda: dataclasses.replace(_tlq(32), weights="qwd", weight_spec=_int4_weights()),
    "qw4": lambda: CommConfig(weights="direct", weight_spec=_int4_weights()),
    "qwd": lambda: CommConfig(weights="qwd", weight_spec=_int4_weights()),
    "tlq": lambda: _tlq(0),
    "tlq-hs": lambda: _tlq(32),
}
