"""The context-parallel ring's buffers: what a rank holds while the ring runs. Every CP
attention (CoPE, the softmax ring, FoX, stick-breaking) goes around it, so a buffer it
keeps a step too long is per-rank memory in all of them (issue 34). Ranks are processes
on gloo; buffers are counted by the storages torch allocates while the ring runs."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_cp_attention import _init, spawn

SIZE = 1024  # elements of each ring tensor


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages torch ops allocate while active and that are still alive, and
    the most ever alive at once (views and in-place results are not new storages)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in
                 torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in self.live or storage.data_ptr() in given:
                continue
            self.live[id(storage)] = storage.nbytes()
            weakref.finalize(storage, self._freed, id(storage))
            self.peak = max(self.peak, sum(self.live.values()))
        return out


def _ring_worker(rank: int, world: int, store: str) -> None:
    cp = _init(rank, world, store)
    mine = [torch.full((SIZE,), float(rank)) for _ in range(2)]  # two tensors, as K and V
    one_set = 2 * SIZE * mine[0].element_size()

    def visit(owner: int, tensors: list[torch.Tensor], acc=None) -> None:
        assert [int(t[0]) for t in tensors] == [owner, owner]
        if acc is not None:
            for a in acc:  # in place: the visit itself allocates nothing
                a += (rank + 1) * (owner + 1)  # who added what for whom, in the total

    with LiveStorages() as forward:
        cp.ring(mine, visit)
    # The tensors visited and the next owner's in flight; the last sent are freed once
    # the exchange is done, not a step later.
    assert forward.peak <= 2 * one_set, forward.peak / one_set

    sent = []
    exchange = cp._start

    def counted(tensors):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return exchange(tensors)

    cp._start = counted
    with LiveStorages() as backward:
        total = cp.ring_backward(mine, visit, torch.float32)
    # And one set of gradient sums: the one handed on is freed before the next arrives.
    assert backward.peak <= 3 * one_set, backward.peak / one_set
    # The owner visits its own tensors last, into the sum the others handed home: its
    # tensors and its sums each make CP − 1 hops, not a round trip.
    assert sum(sent) == 2 * (world - 1) * one_set, sum(sent) / one_set
    # Every rank's part for this rank's tensors, once each, and nothing for another's.
    want = (rank + 1) * world * (world + 1) / 2
    for t in total:
        assert torch.equal(t, torch.full((SIZE,), want))
    start = [torch.full((SIZE,), 0.5) for _ in range(2)]
    for t in cp.ring_backward(mine, visit, torch.float32, start=start):
        assert torch.equal(t, torch.full((SIZE,), want + 0.5))
    dist.destroy_process_group()


@pytest.mark.integration
def test_ring_holds_one_step_of_buffers(tmp_path):
    # 4 ranks: from the third step on a rank has tensors it received to let go of.
    spawn(tmp_path, 4, _ring_worker)
