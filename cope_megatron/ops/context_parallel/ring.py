"""Context-parallel chunk layout and the ring that carries key/value chunks between ranks.

Megatron-Core's load-balanced causal split: the sequence is cut into 2·CP chunks of
c = S / (2·CP) tokens and CP rank r holds chunks r and 2·CP − 1 − r (head and tail), so
every rank has the same causal work. Megatron has the batch slicing
(``get_batch_on_this_cp_rank``) and the process groups, but its ring attention lives in
TransformerEngine (CUDA only, and blind to CoPE's carried gate sums); this module is the
part all our CP attentions share: which (query chunk, key chunk) pairs a rank computes,
which parts of a pair lie inside one document, and a ring of point-to-point exchanges that
shows every rank every other rank's chunks, one at a time, and brings gradients for them
home.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cope_megatron.ops.heads import reduce_kv_heads


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


@dataclass(frozen=True)
class Part:
    """Query rows ``rows`` of a pair's chunk against its keys ``keys`` (chunk-local), all in
    one document whose first token is at global position ``start`` (0 without document
    boundaries); ``causal``: row r of the part sees its keys up to r (top-left aligned)."""

    rows: slice
    keys: slice
    causal: bool
    start: int = 0


@dataclass(frozen=True)
class Documents:
    """Where each batch row's documents begin, on the host. Which parts of a pair lie inside
    one document is host arithmetic on these (``document_parts``), so an attention call
    copies them from the device once (``of``), not once per pair and pass: on a GPU each
    copy waits for everything queued before it."""

    firsts: tuple[tuple[int, ...], ...]  # per batch row: each document's first token, from 0
    length: int  # tokens in a row

    @classmethod
    def of(cls, starts: torch.Tensor | None) -> Documents | None:
        """From ``starts`` [b, S], each token's document start (``model.documents``)."""
        if starts is None:
            return None
        changes = torch.nonzero(starts[:, 1:] != starts[:, :-1]).tolist()  # (row, token − 1)
        firsts = [[0] for _ in range(starts.shape[0])]
        for row, before in changes:
            firsts[row].append(before + 1)
        return cls(tuple(map(tuple, firsts)), starts.shape[1])

    def runs(self, row: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """(first token, count) of each document that tokens lo…hi−1 of batch row ``row``
        belong to, in order: its first token may lie before lo, count is within lo…hi−1."""
        firsts = self.firsts[row]
        i, runs = bisect.bisect_right(firsts, lo) - 1, []
        while i < len(firsts) and firsts[i] < hi:
            end = firsts[i + 1] if i + 1 < len(firsts) else self.length
            runs.append((firsts[i], min(end, hi) - max(firsts[i], lo)))
            i += 1
        return runs

    def ranges(self, row: int) -> list[tuple[int, int]]:
        """The (first, end) token ranges of batch row ``row``'s documents."""
        firsts = self.firsts[row]
        return list(zip(firsts, firsts[1:] + (self.length,)))


def document_parts(pair: ChunkPair, c: int, docs: Documents | None
                   ) -> list[tuple[slice, list[Part]]]:
    """What a pair computes, as (batch rows, parts): the whole pair without document
    boundaries; with them, the parts of the pair inside one document, so that a pair's code
    runs unchanged on each. Documents are contiguous, so a key chunk before the rows' chunk
    is seen only by the rows of the one document reaching back into it (a prefix of the
    rows, a suffix of the keys), and the diagonal pair is one causal square per document."""
    whole = [Part(slice(0, c), slice(0, c), pair.diagonal)]
    if docs is None:
        return [(slice(None), whole)]
    q0, k0 = pair.q_global * c, pair.k_global * c
    per_row = [_row_parts(docs.runs(row, q0, q0 + c), pair.diagonal, k0, c)
               for row in range(len(docs.firsts))]
    if all(parts == per_row[0] for parts in per_row):
        return [(slice(None), per_row[0])]
    return [(slice(i, i + 1), parts) for i, parts in enumerate(per_row)]


def pair_parts(pair: ChunkPair, c: int, docs: Documents | None
               ) -> Iterator[tuple[Part, tuple, tuple, tuple]]:
    """Each ``Part`` of ``pair`` (``document_parts``) with the indices (batch, head, token)
    of its query rows and of its keys in a rank's [b, h, 2c, ...] tensors, and of its rows
    in a chunk's [b, h, c, ...] tensors (a pair's carries)."""
    for batch, parts in document_parts(pair, c, docs):
        for part in parts:
            yield (part, (batch, slice(None), _offset(part.rows, pair.q * c)),
                   (batch, slice(None), _offset(part.keys, pair.k * c)),
                   (batch, slice(None), part.rows))


def part_key(pair: ChunkPair, part: Part, batch: slice) -> tuple:
    """What names a pair's part (``pair_parts``; ``batch``: its batch rows) from a forward
    to its backward, for the records a CP op keeps of how far each part's work went."""
    return pair.q, pair.k_global, batch.start, part.rows.start


def _offset(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)


def _row_parts(runs: list[tuple[int, int]], diagonal: bool, k0: int, c: int) -> list[Part]:
    """``document_parts`` of one batch row, given its query chunk's document ``runs``."""
    if not diagonal:
        first, count = runs[0]
        if first >= k0 + c:
            return []
        return [Part(slice(0, count), slice(max(first - k0, 0), c), False, first)]
    parts, r0 = [], 0
    for first, n in runs:
        parts.append(Part(slice(r0, r0 + n), slice(r0, r0 + n), True, first))
        r0 += n
    return parts


class ContextParallel:
    """One CP group: its size, this rank's place in it and the chunk layout."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]
        self.wait_seconds = 0.0  # spent waiting on the ring's exchanges (benchmarks read it)

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
        """Send ``tensors`` to the next rank and receive the previous rank's, asynchronously.
        The returned ``wait`` gives the received tensors once both directions are done and
        lets go of the sent ones; it is called once."""
        tensors = [t.contiguous() for t in tensors]
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag)
               for tag, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag)
                for tag, r in enumerate(recv)]
        reqs = dist.batch_isend_irecv(ops)

        def wait() -> list[torch.Tensor]:
            start = time.perf_counter()
            for req in reqs:
                req.wait()
            self.wait_seconds += time.perf_counter() - start
            # The requests hold the sent tensors: dropped here, not when the caller next
            # rebinds the variable holding ``wait`` (a whole step later).
            received = recv[:]
            reqs.clear()
            recv.clear()
            return received

        return wait

    def ring(self, tensors: Sequence[torch.Tensor], visit: Callable[..., None]) -> None:
        """Call ``visit(owner, owner's tensors)`` once for every rank of the group, starting
        with this one; the next rank's tensors are in flight while ``visit`` runs."""
        tensors = list(tensors)
        for step in range(self.size):
            incoming = self._start(tensors) if step + 1 < self.size else None
            visit((self.rank - step) % self.size, tensors)
            tensors = incoming() if incoming is not None else None

    def ring_backward(self, tensors: Sequence[torch.Tensor], visit: Callable[..., None],
                      dtype: torch.dtype, start: Sequence[torch.Tensor] | None = None
                      ) -> list[torch.Tensor]:
        """Gradients for every rank's ``tensors``, summed at their owner: ``visit(owner,
        owner's tensors, acc)`` adds into ``acc`` (shaped like them, in ``dtype``) the
        gradients for the owner's tensors. Returns this rank's total, plus ``start`` (sums
        already made for its tensors) where given.

        An owner's sums begin as zeros at the first rank that visits its tensors and travel
        behind them, each rank adding into the received sum: one set of sums held while
        computing, not three (new, received, and the last one sent); the price is that a
        hand-over, a copy over the link, is not hidden behind compute (``wait_seconds``
        counts it). This rank's own tensors are visited last, into the sum the others
        handed home, so a sum makes CP − 1 hops, not a round trip of CP from its owner; the
        first exchange then has nothing to overlap. The next owner's tensors are posted once
        the sum handed on is gone, so a rank holds at most three sets at once: the visited
        tensors, the next ones in flight and one set of sums.
        """
        own = list(tensors)

        def zeros() -> list[torch.Tensor]:  # every rank's tensors are shaped as this one's
            return [torch.zeros(t.shape, dtype=dtype, device=t.device) for t in own]

        visited = self._start(own)() if self.size > 1 else None
        travelling = None
        for step in range(1, self.size):
            acc = travelling() if travelling is not None else zeros()
            incoming = self._start(visited) if step + 1 < self.size else None
            visit((self.rank - step) % self.size, visited, acc)
            # The visited tensors go (their send done) before the sums are handed on.
            visited = incoming() if incoming is not None else None
            travelling, acc = self._start(acc), None
        total = travelling() if travelling is not None else zeros()
        visit(self.rank, own, total)
        for t, s in zip(total, start or ()):
            t += s
        return total


def expanded(acc: list[torch.Tensor], heads: int) -> list[torch.Tensor]:
    """Accumulators over all ``heads`` query heads for ``acc``'s: the same tensor where it
    has that many heads, zeros for grouped key/value heads (``fold_expanded`` adds them
    back)."""
    return [a if a.shape[1] == heads else
            a.new_zeros(a.shape[0], heads, *a.shape[2:]) for a in acc]


def fold_expanded(acc: list[torch.Tensor], full: list[torch.Tensor]) -> None:
    """Add ``expanded``'s zeros, once filled, into the grouped heads' accumulators."""
    for a, f in zip(acc, full):
        if f is not a:
            a += reduce_kv_heads(f, a.shape[1])


def rows(t: torch.Tensor, chunk: int, c: int) -> torch.Tensor:
    """Local chunk ``chunk`` (0 head, 1 tail) of a [b, h, 2c, ...] tensor, as a view."""
    return t[:, :, chunk * c:(chunk + 1) * c]
