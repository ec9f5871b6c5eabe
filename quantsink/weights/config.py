"""The ``weights`` section of a recipe."""
from __future__ import annotations

from dataclasses import dataclass, field

from quantsink.errors import check

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_ALGORITHMS = ("rtn", "gptq")


@dataclass
class WeightConfig:
    """Group-wise weight quantization of the decoder's Linear layers.

    Groups run along the input channels (a partial last group is allowed).
    ``outlier_channels`` input channels per layer are kept in fp16.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    algorithm: str = "gptq"
    outlier_channels: int = 32
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check(self.bits in SUPPORTED_WEIGHT_BITS,
              f"weights.bits={self.bits} is not supported; allowed: {list(SUPPORTED_WEIGHT_BITS)}")
        check(self.group_size in SUPPORTED_GROUP_SIZES,
              f"weights.group_size={self.group_size} is not supported; "
              f"allowed: {list(SUPPORTED_GROUP_SIZES)}")
        check(self.algorithm in SUPPORTED_ALGORITHMS,
              f"weights.algorithm={self.algorithm!r} is not supported; "
              f"allowed: {list(SUPPORTED_ALGORITHMS)}")
        check(self.outlier_channels >= 0,
              f"weights.outlier_channels must be >= 0, got {self.outlier_channels}")
