#!/usr/bin/env python3
"""Draws a pipeline schedule's timeline as a PNG chart.

    meshtrain-plan --pp 4 --micro-batch-size 2 --pp-schedule zb-h1 --timeline-json t.json
    python3 scripts/plot_schedule.py t.json zb-h1.png

One row per pp rank, one box per compute action (F forward, B whole backward, I input
gradient, W weight gradient) labelled with its micro-batch; a later virtual stage is hatched.
Needs Debian's python3-matplotlib.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"F": "#4c72b0", "B": "#55a868", "I": "#dd8452", "W": "#8172b3"}


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_schedule.py TIMELINE.json OUT.png")
    timeline = json.load(open(sys.argv[1]))
    ranks = timeline["ranks"]
    stages = max((a["stage"] for row in ranks for a in row), default=0) + 1
    span = max((a["end"] for row in ranks for a in row), default=1)
    fig, ax = plt.subplots(figsize=(max(6, span * 0.35), 0.6 * len(ranks) + 1.2))
    for r, row in enumerate(ranks):
        for a in row:
            later_chunk = (a["stage"] // len(ranks)) % 2 == 1
            ax.barh(len(ranks) - 1 - r, a["end"] - a["begin"], left=a["begin"], height=0.8,
                    color=COLORS[a["kind"]], edgecolor="white", hatch="//" if later_chunk else None)
            ax.text((a["begin"] + a["end"]) / 2, len(ranks) - 1 - r, str(a["micro_batch"]),
                    ha="center", va="center", color="white", fontsize=8)
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(len(ranks)))])
    ax.set_xlim(0, span)
    ax.set_xlabel("time (one unit = one chunk's forward)")
    ax.set_title(f"{timeline['schedule']}: bubble {timeline['idle_fraction']:.3f} "
                 f"({stages} stages)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, ["forward", "backward", "input gradient", "weight gradient"],
              loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
