"""PNG figures of a calibration (matplotlib, Agg backend).

* ``attention_mass.png``: share of attention on the first positions, layer by layer; a sink
  is a bright column.
* ``massive_activations.png``: largest |residual| per layer for the top channels.
* ``key_channels.png``: per-channel key magnitudes per layer, sinks excluded, next to the
  keys of position 0.
* ``learned_sinks.png`` (models with learned sink logits, e.g. GPT-OSS): the share of the
  attention those logits take, layer by layer and head by head.
"""
from __future__ import annotations

from pathlib import Path

import torch

from quantsink.calibration.artifact import CalibrationResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stack(result: CalibrationResult, kind: str) -> torch.Tensor:
    return torch.stack([result.stats[f"{kind}/{l}"].float() for l in range(result.num_layers)])


def plot_attention_mass(result: CalibrationResult, path: Path) -> None:
    """Heatmap layers x leading positions of the head-averaged attention share."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    mass = _stack(result, "attn_mass").mean(1).clamp(min=1e-4)  # [layers, P]
    fig, ax = plt.subplots(figsize=(9, 6.5))
    im = ax.imshow(mass.numpy(), aspect="auto", cmap="magma", norm=LogNorm(vmin=1e-3, vmax=1.0),
                   origin="lower", interpolation="nearest")
    ax.set_xlabel("key position")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, mass.shape[1], 2))
    ax.set_yticks(range(0, mass.shape[0], 2))
    meta = result.meta
    ax.set_title(f"{Path(result.model).name}: share of attention per key position "
                 f"(mean over heads and queries)\n{meta.get('samples')} windows x {meta.get('seq_len')} "
                 f"tokens; positional sinks: {result.sink_map.positional}")
    fig.colorbar(im, ax=ax, label="attention share (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_massive(result: CalibrationResult, path: Path, top: int = 16) -> None:
    """Heatmap layers x top channels of the largest |residual-stream value|."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    absmax = _stack(result, "resid_absmax")  # [layers, C]
    channels = absmax.amax(0).topk(min(top, absmax.shape[1])).indices.tolist()
    data = absmax[:, channels].clamp(min=1e-2)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", norm=LogNorm(), origin="lower",
                   interpolation="nearest")
    ax.set_xticks(range(len(channels)), [str(c) for c in channels], rotation=60)
    ax.set_yticks(range(0, absmax.shape[0], 2))
    ax.set_xlabel("residual-stream channel (top by max |value|)")
    ax.set_ylabel("layer output")
    medians = result.meta.get("layer_median_abs") or []
    hint = f"; layer medians {min(medians):.2g}-{max(medians):.2g}" if medians else ""
    ax.set_title(f"{Path(result.model).name}: max |activation| per channel{hint}")
    for (l, c) in [(r["layer"], r["channel"]) for r in result.massive if r["channel"] in channels]:
        ax.plot(channels.index(c), l, marker=".", color="red", markersize=3)
    fig.colorbar(im, ax=ax, label="max |value| (log scale); red dot: >= 100x median")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_key_channels(result: CalibrationResult, path: Path) -> None:
    """Per-layer key-channel magnitudes: body tokens (sinks excluded) and position 0."""
    plt = _pyplot()
    keys = _stack(result, "key_absmax")  # [layers, Hkv, D], sinks excluded
    body = keys.flatten(1)  # [layers, Hkv*D]
    first = _stack(result, "key_lead_absmax")[:, 0].flatten(1)
    vmax = float(torch.maximum(body.max(), first.max()))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True, layout="constrained")
    for ax, data, title in ((axes[0], body, "max |key|, sinks excluded"), (axes[1], first, "|key| at position 0")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap="inferno", vmin=0, vmax=vmax, origin="lower",
                       interpolation="nearest")
        heads, dim = keys.shape[1], keys.shape[2]
        ax.set_xticks([h * dim for h in range(heads)], [f"kv head {h}" for h in range(heads)])
        for h in range(1, heads):
            ax.axvline(h * dim - 0.5, color="white", linewidth=0.5)
        ax.set_title(title)
        ax.set_xlabel("key channel (post-RoPE), grouped by KV head")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="|key|")
    fig.suptitle(f"{Path(result.model).name}: key-channel magnitudes per layer")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learned_sinks(result: CalibrationResult, path: Path) -> bool:
    """Heatmap layers x heads of the learned sink logits' share of attention (False: no such sinks)."""
    layers = [l for l in range(result.num_layers) if f"learned_sink_mass/{l}" in result.stats]
    if not layers:
        return False
    plt = _pyplot()
    mass = torch.stack([result.stats[f"learned_sink_mass/{l}"].float() for l in layers])  # [layers, H]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.25 * len(layers) + 2)))
    im = ax.imshow(mass.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, origin="lower",
                   interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, mass.shape[1], max(1, mass.shape[1] // 16)))
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_title(f"{Path(result.model).name}: share of attention on the learned sink logits\n"
                 f"(mean over queries and windows; mean over all: {float(mass.mean()):.3f})")
    fig.colorbar(im, ax=ax, label="attention share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(result: CalibrationResult, out: Path) -> list[Path]:
    """Write the figures into ``out`` (``learned_sinks.png`` only for models with learned
    sink logits); returns their paths."""
    paths = [out / "attention_mass.png", out / "massive_activations.png", out / "key_channels.png"]
    plot_attention_mass(result, paths[0])
    plot_massive(result, paths[1])
    plot_key_channels(result, paths[2])
    if plot_learned_sinks(result, out / "learned_sinks.png"):
        paths.append(out / "learned_sinks.png")
    return paths
