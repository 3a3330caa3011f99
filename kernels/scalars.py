"""The scalar table: the float64 slot layout every optimizer group keeps on its device, and the lr profiles.

Each parameter group owns one small float64 tensor on its device. The host writes the
hyper-parameters (the *inputs*) only when they change; every step the optimizer's scalar
kernel (or, on the CPU path, its host twin ``advance``) reads the inputs and the running
*state* (step count, lr_max, weight sum), advances the state and writes the *outputs* that the
element-wise update reads. Nothing in a step reads a device value back on the host. What an
output slot holds is the optimizer's to say (COEF is one number for Schedule-Free, another for
AdamW); a new optimizer reuses the slots it can and adds the ones it needs here.
"""

from __future__ import annotations

import math
from enum import IntEnum


class Profile(IntEnum):
    """Learning-rate profile after warm-up (AdamW only; Schedule-Free needs none)."""

    CONSTANT = 0
    LINEAR = 1
    COSINE = 2
    REX = 3


# Inputs: written by the host when a hyper-parameter changes.
LR = 0  # base (peak) learning rate of the group
BETA1 = 1  # β1, or the SGD momentum
BETA2 = 2
EPS = 3
WD = 4  # weight decay λ
WARMUP = 5  # warm-up steps
R = 6  # Schedule-Free polynomial weight power
WLR_POWER = 7  # Schedule-Free weight_lr_power
EVAL_W = 8  # lerp weight y -> x: 1 - 1/β1
TRAIN_W = 9  # lerp weight x -> y: 1 - β1
TOTAL = 10  # profile length in steps (warm-up included)
MIN_LR = 11  # profile floor
REX_D = 12  # REX shape parameter d
N_INPUTS = 13
# State: advanced by every step.
K = 13  # steps taken so far
LR_MAX = 14
WSUM = 15
# Outputs: what the element-wise update of this step reads.
GAMMA = 16  # scheduled learning rate of this step
C = 17  # Schedule-Free averaging weight c = weight / Σweight
BIAS2 = 18  # SF: 1 - β2^t; AdamW: sqrt(1 - β2^t)
COEF = 19  # SF: γ·(β1·(1-c) - 1); AdamW: γ / (1 - β1^t)
DECAY = 20  # AdamW: 1 - γ·λ
N_SLOTS = 21

INITIAL_STATE = (0.0, -1.0, 0.0)  # K, LR_MAX, WSUM as the schedulefree package starts them


def profile_lr(profile: Profile, k: float, base: float, warmup: float, total: float, min_lr: float, d: float) -> float:
    """Learning rate of step index k (0-based): linear warm-up to base, then the profile down to min_lr."""
    if k < warmup:
        return base * ((k + 1) / warmup)
    if profile == Profile.CONSTANT:
        return base
    z = min(max((k - warmup) / (total - warmup), 0.0), 1.0)
    if profile == Profile.LINEAR:
        shape = 1.0 - z
    elif profile == Profile.COSINE:
        shape = 0.5 * (1.0 + math.cos(math.pi * z))
    else:
        shape = (1.0 - z) / (1.0 - d * z)
    return min_lr + (base - min_lr) * shape
