"""Ranking metrics over the whole KB.

Rank of the gold entity = 1 + the number of entities whose score is strictly higher. Entities
with exactly the gold's score are *ties*: they do not push the gold down (a tie-free model gets
the same rank either way), but they are counted and reported, so a degenerate model that gives
many entities the same score cannot hide behind them.
"""

from __future__ import annotations

import torch
from torch import Tensor

HITS_AT = (1, 3, 5, 10, 20)


class NonFiniteScoreError(ValueError):
    """Some score rows hold NaN or an infinity: no rank can be read from them.

    ``rows`` are positions in the score matrix given to :func:`gold_ranks` (callers translate them
    to mentions and add the split to the message)."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


def gold_ranks(scores: Tensor, gold_index: Tensor) -> tuple[Tensor, Tensor]:
    """scores [M, N] (every entity), gold_index [M] -> (rank [M] long, ties [M] long).

    A NaN or infinite score anywhere in a row is an error (NonFiniteScoreError): NaN compares false
    with everything, so counting ``score > gold`` would give a NaN gold rank 1 and -1 ties."""
    finite = torch.isfinite(scores).all(dim=1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).view(-1).tolist()
        raise NonFiniteScoreError(f"{len(rows)} score row(s) hold NaN or inf (rows {rows[:5]})", rows)
    gold = scores.gather(1, gold_index.view(-1, 1))
    higher = (scores > gold).sum(dim=1)
    ties = (scores == gold).sum(dim=1) - 1
    return higher + 1, ties


def summarize(ranks: Tensor, ties: Tensor | None = None) -> dict[str, float]:
    """Hits@k and MRR in percent, MR, the number of mentions, and tie statistics."""
    ranks = ranks.double()
    n = ranks.numel()
    if n == 0:
        raise ValueError("no ranks to summarize")
    out: dict[str, float] = {f"H@{k}": 100.0 * (ranks <= k).double().mean().item() for k in HITS_AT}
    out["MRR"] = 100.0 * (1.0 / ranks).mean().item()
    out["MR"] = ranks.mean().item()
    out["mentions"] = n
    if ties is not None:
        out["ties_total"] = int(ties.sum().item())
        out["mentions_with_ties"] = int((ties > 0).sum().item())
    return out
