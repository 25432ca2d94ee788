"""Schedules as test cases, shared by the tests of the definitions, of the op's
evaluation and of the GPU: short ones for every step, long ones at sampled steps."""

import random

from noam_ext import Noam, WarmupConstant, WarmupCosine, WarmupInverseSqrt, WarmupLinear, WarmupStableDecay
from noam_ext.schedules import DECAY_SHAPES

# Short schedules, tested at every step from 0 to well past their end.
SHORT = {
    "constant": WarmupConstant(7),
    "constant-no-warmup": WarmupConstant(0),
    "linear": WarmupLinear(7, 50),
    "linear-floor": WarmupLinear(7, 50, min_lr_ratio=0.1),
    "linear-no-warmup": WarmupLinear(0, 13),
    "cosine": WarmupCosine(7, 50),
    "cosine-floor": WarmupCosine(7, 50, min_lr_ratio=0.1),
    "cosine-1.5-cycles": WarmupCosine(7, 50, min_lr_ratio=0.05, num_cycles=1.5),
    "cosine-one-decay-step": WarmupCosine(3, 4),
    **{f"wsd-{shape}": WarmupStableDecay(7, 10, 20, decay=shape, min_lr_ratio=0.1) for shape in DECAY_SHAPES},
    "wsd-no-stable": WarmupStableDecay(5, 0, 9, decay="cosine"),
    "inverse-sqrt": WarmupInverseSqrt(7),
    "inverse-sqrt-timescale": WarmupInverseSqrt(7, timescale=20),
    "inverse-sqrt-short-timescale-floor": WarmupInverseSqrt(8, timescale=3, min_lr_ratio=0.4),
    "inverse-sqrt-no-warmup": WarmupInverseSqrt(0),
    "noam": Noam(64, 10),
}
# 1e6-step schedules, tested at their switch points and at random steps.
LONG = {
    "linear": WarmupLinear(2000, 10**6, min_lr_ratio=0.1),
    "cosine": WarmupCosine(2000, 10**6),
    "cosine-floor": WarmupCosine(2000, 10**6, min_lr_ratio=0.1),
    **{f"wsd-{shape}": WarmupStableDecay(2000, 798_000, 200_000, decay=shape, min_lr_ratio=0.01)
       for shape in DECAY_SHAPES},
    "inverse-sqrt": WarmupInverseSqrt(2000),
    "constant": WarmupConstant(2000),
    "noam": Noam(512, 4000),
}


def end_of(schedule) -> int:
    """The first step of a schedule's tail (its floor, or its plain decay)."""
    if isinstance(schedule, (WarmupLinear, WarmupCosine)):
        return schedule.total_steps
    if isinstance(schedule, WarmupStableDecay):
        return schedule.warmup_steps + schedule.stable_steps + schedule.decay_steps
    return 3 * max(schedule.warmup_steps, 1)


def short_steps(schedule) -> list[int]:
    """Every step of a short schedule, and 20 past its end."""
    return list(range(end_of(schedule) + 20))


def sampled_steps(schedule, count: int = 200) -> list[int]:
    """Each switch point and its neighbours, random steps, and steps past the end."""
    points = {0, 1, schedule.warmup_steps, end_of(schedule), 10**7, 2**53}
    if isinstance(schedule, WarmupStableDecay):
        points.add(schedule.warmup_steps + schedule.stable_steps)
    steps = {p + d for p in points for d in (-1, 0, 1) if 0 <= p + d <= 2**53}
    rng = random.Random(18)
    steps.update(rng.randrange(0, end_of(schedule) + 1000) for _ in range(count))
    return sorted(steps)
