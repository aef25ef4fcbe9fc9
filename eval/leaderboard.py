"""Published test numbers (H@1 / H@3 / H@5 / MRR in percent, MR) and the leaderboard table."""

from __future__ import annotations

SOURCES = {
    "MMoE": "MEL-MMoE repository logs",
    "M3EL": "MEL-M3EL repository logs",
    "MIMIC": "MIMIC README",
    "CLIP": "MIMIC README",
    "GHMFC": "MIMIC README",
    "BLINK": "MIMIC README",
}

# dataset -> model -> (H@1, H@3, H@5, MRR, MR or None)
PUBLISHED: dict[str, dict[str, tuple[float, float, float, float, float | None]]] = {
    "wikimel": {
        "MMoE": (90.77, 96.27, 97.41, 93.75, 6.93),
        "M3EL": (88.84, 95.20, 96.71, 92.30, None),
        "MIMIC": (87.98, 95.07, 96.37, 91.82, 11.02),
        "CLIP": (83.23, 92.10, 94.51, 88.23, None),
        "GHMFC": (76.55, 88.40, 92.01, 83.36, None),
        "BLINK": (74.66, 86.63, 90.57, 81.72, None),
    },
    "richpediamel": {
        "MMoE": (85.51, 93.43, 95.31, 89.86, 11.39),
        "M3EL": (82.82, 92.73, 95.34, 88.26, None),
        "MIMIC": (81.02, 91.77, 94.38, 86.95, 55.11),
        "CLIP": (67.78, 85.22, 90.04, 77.57, None),
        "GHMFC": (72.92, 86.85, 90.60, 80.76, None),
        "BLINK": (58.47, 81.51, 88.09, 71.39, None),
    },
    "wikidiverse": {
        "MMoE": (77.57, 89.12, 92.49, 84.23, 72.92),
        "M3EL": (74.06, 86.57, 90.04, 81.29, None),
        "MIMIC": (63.51, 81.04, 86.43, 73.44, 227.08),
        "CLIP": (61.21, 79.63, 85.18, 71.69, None),
        "GHMFC": (60.27, 79.40, 84.74, 70.99, None),
        "BLINK": (57.14, 78.04, 85.32, 69.15, None),
    },
}

COLUMNS = ("H@1", "H@3", "H@5", "MRR", "MR")


def leaderboard_rows(dataset: str, metrics: dict[str, float], run_name: str) -> list[list[str]]:
    """Rows [model, H@1, H@3, H@5, MRR, MR, source], published models first, this run last."""
    rows = []
    for model, values in PUBLISHED.get(dataset, {}).items():
        cells = [f"{v:.2f}" if v is not None else "-" for v in values]
        rows.append([model, *cells, SOURCES[model]])
    rows.append([f"**{run_name}**", *[f"{metrics[c]:.2f}" for c in COLUMNS], "this run"])
    return rows


def leaderboard_markdown(dataset: str, split: str, metrics: dict[str, float], run_name: str) -> str:
    header = ["model", *COLUMNS, "source"]
    lines = [f"### {dataset} ({split})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in leaderboard_rows(dataset, metrics, run_name)]
    if dataset not in PUBLISHED:
        lines += ["", f"No published numbers for {dataset}: only this run is listed."]
    elif split != "test":
        lines += ["", f"Published numbers are test numbers; this row is {split}."]
    return "\n".join(lines) + "\n"
