"""``cope_megatron.train`` with the loss made NaN on one rank at given steps: run under
torchrun by tests/test_nonfinite.py to check that every rank skips the step together.

    torchrun --nproc-per-node 2 tests/poisoned_train.py RANK STEPS CONFIG...
    (STEPS: comma-separated, 1-based; one micro batch per step)
"""

import os
import sys

import cope_megatron.trainer as trainer_module
from cope_megatron.train import main

if __name__ == "__main__":
    rank, steps, *config = sys.argv[1:]
    poisoned = {int(s) for s in steps.split(",")}
    calls, real_loss = [0], trainer_module.loss_sum

    def loss_sum(*args, **kwargs):
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        here = int(os.environ.get("RANK", "0")) == int(rank)
        return loss * float("nan") if here and calls[0] in poisoned else loss

    trainer_module.loss_sum = loss_sum
    main(config)
