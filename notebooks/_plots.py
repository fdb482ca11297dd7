"""Drawing helpers shared by the notebooks (the notebooks drive the real classes; this only draws).

Every figure the notebooks save lands in ``notebooks/figures/`` (the README shows one per
notebook), or in ``$PICO_VLLM_FIGURES`` when set (the test suite, which must not rewrite them).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from pico_vllm.engine.block_manager import BlockManager
from pico_vllm.engine.sequence import Sequence

FIGURES = Path(os.environ.get("PICO_VLLM_FIGURES") or Path(__file__).parent / "figures")
PALETTE = plt.get_cmap("tab10").colors


def save(fig: Figure, name: str) -> Path:
    """Write ``fig`` to ``notebooks/figures/NAME.png`` (what the README links to)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def draw_pool(ax: Axes, manager: BlockManager, seqs: list[Sequence], title: str, columns: int = 8) -> None:
    """The pool as a grid of blocks: coloured by the sequence(s) holding it (split when shared),
    grey-hatched when free but still caching a prefix (evictable), white when free. Each cell
    shows its block id and, when in use, its refcount."""
    colour = {seq.request_id: PALETTE[i % len(PALETTE)] for i, seq in enumerate(seqs)}
    owners: dict[int, list[str]] = {}
    for seq in seqs:
        for block_id in seq.block_table:
            owners.setdefault(block_id, []).append(seq.request_id)
    rows = -(-manager.num_blocks // columns)
    for block in manager.blocks:
        x, y = block.block_id % columns, rows - 1 - block.block_id // columns
        holders = owners.get(block.block_id, [])
        if holders:
            width = 1 / len(holders)
            for i, holder in enumerate(holders):
                ax.add_patch(Rectangle((x + i * width, y), width, 1, color=colour[holder], alpha=0.8))
        elif block.hash is not None:
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor="0.85", hatch="//", edgecolor="0.5"))
        ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
        label = f"{block.block_id}" + (f"\nref {block.ref_count}" if block.ref_count else "")
        ax.text(x + 0.5, y + 0.5, label, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, columns)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"pool blocks (block_size {manager.block_size}); {manager.num_free_blocks} allocatable")
    ax.set_title(title, fontsize=10)
    legend = [Patch(color=colour[s.request_id], alpha=0.8, label=s.request_id) for s in seqs]
    legend.append(Patch(facecolor="0.85", hatch="//", edgecolor="0.5", label="cached, evictable"))
    ax.legend(handles=legend, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(legend),
              frameon=False)


def draw_steps(ax: Axes, steps: list[dict], budget: int, title: str) -> None:
    """One stacked bar per step: decode tokens and prefill tokens against the token budget;
    markers for admissions (triangles up) and preemptions (crosses)."""
    index = [s["step"] for s in steps]
    decode = [s["decode_tokens"] for s in steps]
    prefill = [s["prefill_tokens"] for s in steps]
    ax.bar(index, decode, color=PALETTE[0], label="decode tokens")
    ax.bar(index, prefill, bottom=decode, color=PALETTE[1], label="prefill tokens")
    ax.axhline(budget, color="black", linestyle="--", linewidth=0.8, label="token budget")
    for s in steps:
        top = s["decode_tokens"] + s["prefill_tokens"]
        if s["admitted"]:
            ax.plot(s["step"], top + 0.6, "^", color=PALETTE[2])
            ax.text(s["step"], top + 1.2, ",".join(s["admitted"]), ha="center", fontsize=6, rotation=90)
        if s["preempted"]:
            ax.plot(s["step"], budget + 1, "x", color=PALETTE[3], markersize=8)
    ax.plot([], [], "^", color=PALETTE[2], label="admitted")
    ax.plot([], [], "x", color=PALETTE[3], label="preempted")
    ax.set_ylim(0, budget * 1.4)  # room for the admission labels
    ax.set_xlabel("step")
    ax.set_ylabel("tokens computed in the step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")


def draw_group_tables(ax: Axes, tables: list[list[int]], windows: tuple, no_block: int) -> None:
    """One row per layer group: each block-table entry as a cell, coloured when the group holds
    a block there (its id printed), white when a sliding group gave the block back."""
    for row, (table, window) in enumerate(zip(tables, windows)):
        for col, block_id in enumerate(table):
            held = block_id != no_block
            colour = PALETTE[0] if window is None else PALETTE[1]
            ax.add_patch(Rectangle((col, -row), 0.95, 0.9, facecolor=colour if held else "white",
                                   edgecolor="grey"))
            if held:
                ax.text(col + 0.47, -row + 0.45, str(block_id), ha="center", va="center", fontsize=7,
                        color="white")
    ax.set_xlim(0, max(len(t) for t in tables))
    ax.set_ylim(-len(tables) + 1, 1)
    labels = [f"group {g}: " + ("global" if w is None else f"window {w}") for g, w in enumerate(windows)]
    ax.set_yticks([-r + 0.45 for r in range(len(tables))], labels)
    ax.set_xlabel("block index in the sequence (block_size tokens each)")
    ax.legend(handles=[Patch(color=PALETTE[1], label="held by a sliding group"),
                       Patch(color=PALETTE[0], label="held by the global group"),
                       Patch(facecolor="white", edgecolor="grey", label="given back (NO_BLOCK)")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
