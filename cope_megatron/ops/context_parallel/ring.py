"""Context-parallel chunk layout and the ring that carries key/value chunks between ranks.

Megatron-Core's load-balanced causal split: the sequence is cut into 2·CP chunks of
c = S / (2·CP) tokens and CP rank r holds chunks r and 2·CP − 1 − r (head and tail), so
every rank has the same causal work. Megatron has the batch slicing
(``get_batch_on_this_cp_rank``) and the process groups, but its ring attention lives in
TransformerEngine (CUDA only, and blind to CoPE's carried gate sums); this module is the
small part both of our CP attentions share: which (query chunk, key chunk) pairs a rank
computes, and a ring of point-to-point exchanges that shows every rank every other rank's
chunks, one at a time, and brings gradients for them home.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ChunkPair:
    """Local query chunk ``q`` (0 head, 1 tail) against the key chunk ``k`` of a rank."""

    q: int
    k: int
    q_global: int
    k_global: int

    @property
    def diagonal(self) -> bool:
        """The rows' own chunk: causal within it."""
        return self.q_global == self.k_global


class ContextParallel:
    """One CP group: its size, this rank's place in it and the chunk layout."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def chunks(self, rank: int) -> tuple[int, int]:
        """Global indices of the two chunks rank ``rank`` holds."""
        return rank, 2 * self.size - 1 - rank

    def pairs(self, owner: int) -> list[ChunkPair]:
        """This rank's causal (query chunk, key chunk) pairs against ``owner``'s chunks."""
        return [ChunkPair(qi, ki, qg, kg)
                for qi, qg in enumerate(self.chunks(self.rank))
                for ki, kg in enumerate(self.chunks(owner)) if kg <= qg]

    def positions(self, chunk: int, length: int, device: torch.device) -> torch.Tensor:
        """Global token positions of a chunk of ``length`` tokens."""
        return torch.arange(chunk * length, (chunk + 1) * length, device=device)

    def _start(self, tensors: Sequence[torch.Tensor]):
        """Send ``tensors`` to the next rank and receive the previous rank's, asynchronously."""
        tensors = [t.contiguous() for t in tensors]
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag)
               for tag, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag)
                for tag, r in enumerate(recv)]
        reqs = dist.batch_isend_irecv(ops)

        def wait() -> list[torch.Tensor]:
            for req in reqs:
                req.wait()
            return recv

        return wait

    def ring(self, tensors: Sequence[torch.Tensor],
             visit: Callable[[int, list[torch.Tensor]], list[torch.Tensor] | None]
             ) -> list[torch.Tensor] | None:
        """Call ``visit(owner, owner's tensors)`` once for every rank of the group, starting
        with this one; the next rank's tensors are in flight while ``visit`` runs.

        If ``visit`` returns gradients for the owner's tensors (it must then do so at every
        step, zeros where it has none), they travel along the ring behind the tensors,
        summed on the way, and this rank's own total is returned.
        """
        tensors = list(tensors)
        travelling = None
        for step in range(self.size):
            incoming = self._start(tensors) if step + 1 < self.size else None
            grads = visit((self.rank - step) % self.size, tensors)
            if grads is not None:
                if travelling is not None:
                    grads = [g.add_(r) for g, r in zip(grads, travelling())]
                travelling = self._start(grads)
            if incoming is not None:
                tensors = incoming()
        return travelling() if travelling is not None else None


def rows(t: torch.Tensor, chunk: int, c: int) -> torch.Tensor:
    """Local chunk ``chunk`` (0 head, 1 tail) of a [b, h, 2c, ...] tensor, as a view."""
    return t[:, :, chunk * c:(chunk + 1) * c]
