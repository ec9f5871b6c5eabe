"""The sink map: which tokens a sink-aware KV cache keeps in fp16.

Two kinds of attention sinks are told apart:

* **positional** sinks are leading positions (usually just position 0) that draw a large
  share of the attention whatever token sits there;
* **content** sinks are token ids that draw a large share of the attention wherever they
  occur (for SmolLM2-135M on WikiText: `` the`` and the lone space before digits, in layers
  2-10). The mass sits mostly on a token's strongest occurrence in a text, usually its first;
  a cache that keeps every occurrence in fp16 is on the safe side.

Per-layer detail (which layers, how much mass) is kept for reports and for caches that
want to treat layers differently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from quantsink.config import from_dict, to_dict
from quantsink.errors import check


@dataclass
class SinkMap:
    """Positions and token ids to keep in fp16, with per-layer evidence.

    ``positional_detail`` rows: ``{"position", "layers", "mass"}`` (``mass``: the share of
    attention the position draws, averaged over heads, queries and windows, one value per
    listed layer). ``content_detail`` rows: ``{"token_id", "token", "layers", "mass",
    "ratio_to_uniform"}`` (``mass``: mean share of attention the token draws from queries at
    least ``local_window`` tokens later; ``ratio_to_uniform``: the same relative to uniform
    attention).
    """

    positional: list[int]
    content_token_ids: list[int] = field(default_factory=list)
    num_layers: int = 0
    positional_detail: list[dict] = field(default_factory=list)
    content_detail: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(all(isinstance(p, int) and p >= 0 for p in self.positional),
              f"sink positions must be non-negative integers, got {self.positional}")
        check(all(isinstance(t, int) and t >= 0 for t in self.content_token_ids),
              f"content sink token ids must be non-negative integers, got {self.content_token_ids}")
        self.positional = sorted(set(self.positional))
        self.content_token_ids = sorted(set(self.content_token_ids))

    @classmethod
    def first(cls, n: int) -> "SinkMap":
        """The first ``n`` positions as sinks, no content sinks (no calibration needed)."""
        check(isinstance(n, int) and n >= 0, f"number of sink positions must be an integer >= 0, got {n!r}")
        return cls(positional=list(range(n)))

    def positions_for_layer(self, layer: int) -> list[int]:
        """Positions detected as sinks in ``layer`` (all of ``positional`` when no detail is known)."""
        if not self.positional_detail:
            return list(self.positional)
        return [row["position"] for row in self.positional_detail if layer in row["layers"]]

    def content_ids_for_layer(self, layer: int) -> list[int]:
        """Token ids detected as content sinks in ``layer`` (all when no detail is known)."""
        if not self.content_detail:
            return list(self.content_token_ids)
        return [row["token_id"] for row in self.content_detail if layer in row["layers"]]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SinkMap":
        """Inverse of :meth:`to_dict`; unknown keys and wrong types are rejected."""
        return from_dict(cls, d, "sink map")
