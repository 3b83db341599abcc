"""A logit bias as a pure function of global query and key positions: the one form in which
every biased attention (one process with the bias materialized, FlexAttention, the
context-parallel ring) receives a position encoding's bias.

``fn(q_pos, k_pos, *tensors)`` gives the bias per head at positions that broadcast against
each other, [heads, *shape], for causal pairs (q_pos ≥ k_pos; what it gives above the
diagonal is masked by the caller). ``tensors`` are all it is differentiated in, so a
consumer that cannot keep the whole [s, s] bias alive (the ring's backward) recomputes a
block from them and differentiates it there. A bias of the distance i − j alone (ALiBi, T5,
Kerple) is a table [heads, n] read at i − j (``by_distance``): O(s), and FlexAttention
reads it per (head, distance) in-kernel. One that depends on the query position too (FIRE)
is computed per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def by_distance(q_pos: torch.Tensor, k_pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table`` [heads, n] at the distances q_pos − k_pos (clamped at 0 above the diagonal,
    so every index is in range)."""
    return table[:, (q_pos - k_pos).clamp(min=0)]


@dataclass(frozen=True)
class PositionBias:
    fn: Callable[..., torch.Tensor]
    tensors: tuple[torch.Tensor, ...]
    at: Callable[..., torch.Tensor] | None = None
    """``at(q_pos, k_pos, head, *tensors)``: the bias of one head at one pair, for a consumer
    that evaluates it score by score (FlexAttention's ``score_mod``), written without
    reductions where ``fn`` has one: compiled FlexAttention cannot lower a reduction there
    (pytorch#148107, #139836). None: ``fn``'s heads indexed, which is all pointwise."""

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.fn(q_pos, k_pos, *self.tensors)

    def score(self, q_pos: torch.Tensor, k_pos: torch.Tensor, head: torch.Tensor
              ) -> torch.Tensor:
        """The bias of head ``head`` at one (query, key) pair (``at``)."""
        if self.at is not None:
            return self.at(q_pos, k_pos, head, *self.tensors)
        return self(q_pos, k_pos)[head]

    def block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[heads, len(rows), len(cols)]: query positions ``rows`` against keys ``cols``."""
        return self(rows[:, None], cols[None, :])

    @property
    def distance_table(self) -> torch.Tensor | None:
        """The [heads, n] table of a bias of distance alone; None for any other."""
        return self.tensors[0] if self.fn is by_distance else None


def distance_bias(table: torch.Tensor) -> PositionBias:
    """The bias ``table[h, i − j]``: table [heads, n], n ≥ every distance it is read at."""
    return PositionBias(by_distance, (table,))
