"""The ``weights`` section of a recipe."""
from __future__ import annotations

from dataclasses import dataclass, field

from quantsink.errors import check

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_ALGORITHMS = ("rtn", "gptq")
SUPPORTED_OUTLIER_SCORES = ("absmax_x_norm", "absmax")
SUPPORTED_EMBEDDING_BITS = (None, 8)
SUPPORTED_SCALE_STATS = ("mean", "duo", "absmax")


@dataclass
class WeightConfig:
    """Group-wise weight quantization of the decoder's Linear layers.

    Groups run along the input channels (a partial last group is allowed).
    ``outlier_channels`` input channels per layer are kept in fp16, chosen by
    ``outlier_score`` from calibration statistics; ``massive_outliers`` forces the
    model's strongest massive-activation channels (at most a quarter of the slots) among
    them. ``clip_search`` picks each group's range by a small MSE grid search (``clip_grid``
    shrink steps down to ``min_clip``), the squared error weighted per input channel by
    ``diag(H)`` (GPTQ) or ``act_absmax**2`` (RTN); an unweighted search raised SmolLM2's
    RTN g128 perplexity (26.3 -> 29.2), a weighted one lowered GPTQ's (22.2 -> 21.3).
    GPTQ uses ``damp`` × mean(diag H) as Tikhonov damping and ``act_order`` (static groups).
    ``embedding_bits`` / ``lm_head_bits`` (None or 8) store the token embedding / lm_head as
    int8 rows with one fp16 scale each (:mod:`quantsink.weights.embedding`); when the model
    ties them, both must be equal and the shared tensor is quantized once.
    MoE experts are quantized one by one, GPTQ on the tokens routed to each; an expert that
    receives fewer than ``expert_min_tokens`` calibration tokens falls back to RTN (reported).
    ``scale_search`` (AWQ-style, :mod:`quantsink.weights.scale_search`) scales each Linear group's
    input channels by ``mean|x| ** alpha`` (``alpha`` searched over ``scale_grid`` steps in [0, 1)
    by the group's output error), folds ``1/s`` into the preceding norm / v_proj / up_proj, and
    quantizes the scaled weights; the fp16 outlier channels, if any, are chosen first and left
    unscaled. ``scale_stats`` are the candidate families: ``mean`` (AWQ's mean|x|), ``duo``
    (AWQ's duo scaling, ``mean|x| ** alpha / mean|W|_row-normalised ** (1 - alpha)``), ``absmax``.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    algorithm: str = "gptq"
    outlier_channels: int = 32
    outlier_score: str = "absmax_x_norm"
    massive_outliers: bool = True
    clip_search: bool = True
    clip_grid: int = 10
    min_clip: float = 0.75
    damp: float = 0.01
    act_order: bool = False
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    embedding_bits: int | None = None
    lm_head_bits: int | None = None
    expert_min_tokens: int = 128
    scale_search: bool = False
    scale_grid: int = 20
    scale_stats: list[str] = field(default_factory=lambda: ["mean"])

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
        check(self.outlier_score in SUPPORTED_OUTLIER_SCORES,
              f"weights.outlier_score={self.outlier_score!r} is not supported; "
              f"allowed: {list(SUPPORTED_OUTLIER_SCORES)}")
        check(self.clip_grid >= 1, f"weights.clip_grid must be >= 1, got {self.clip_grid}")
        check(0.0 < self.min_clip <= 1.0,
              f"weights.min_clip must be in (0, 1], got {self.min_clip}")
        check(0.0 < self.damp < 1.0, f"weights.damp must be in (0, 1), got {self.damp}")
        for name in ("embedding_bits", "lm_head_bits"):
            v = getattr(self, name)
            check(v is None or (type(v) is int and v in SUPPORTED_EMBEDDING_BITS),
                  f"weights.{name}={v!r} is not supported; allowed: "
                  f"{list(SUPPORTED_EMBEDDING_BITS)} (null = keep floating point)")
        check(type(self.scale_search) is bool,
              f"weights.scale_search={self.scale_search!r} is not supported; allowed: true, false")
        check(type(self.scale_grid) is int and 2 <= self.scale_grid <= 1000,
              f"weights.scale_grid={self.scale_grid!r} is not supported; allowed: an integer 2..1000 "
              "(the exponents 0, 1/n, ..., (n-1)/n)")
        stats = self.scale_stats
        check(isinstance(stats, list) and bool(stats) and len(set(stats)) == len(stats)
              and set(stats) <= set(SUPPORTED_SCALE_STATS),
              f"weights.scale_stats={stats!r} is not supported; allowed: a non-empty list without "
              f"repeats of {list(SUPPORTED_SCALE_STATS)}")
        check(self.expert_min_tokens >= 1,
              f"weights.expert_min_tokens must be >= 1, got {self.expert_min_tokens}")
