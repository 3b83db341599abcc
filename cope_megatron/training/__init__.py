"""The loop's helpers: LR schedule, step metrics, the non-finite guard, preemption."""
