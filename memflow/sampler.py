"""The 4-step shifted flow-matching sampler of a chunk (memflow-algorithm.md, section 1).

sigma(s) = shift*s / (1 + (shift-1)*s) on s = linspace(1, 0, 1001)[:-1]; the model
predicts a flow v, x0 = x_t - sigma_t v, and the next input re-noises x0 with fresh
noise at the next sigma. The last step's x0 is the chunk.
"""
from __future__ import annotations

import torch

SHIFT = 5.0
TRAIN_STEPS = 1000
STEP_INDICES = (0, 250, 500, 750)


def sigmas(shift: float = SHIFT, steps: int = TRAIN_STEPS) -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def denoising_sigmas(indices=STEP_INDICES, shift: float = SHIFT) -> list[float]:
    """The sigmas of the denoising steps: 1.0, 0.9375, 0.8333, 0.625; timestep = 1000 * sigma."""
    table = sigmas(shift)
    return [float(table[i]) for i in indices]


def sample_chunk(predict_flow, noise: torch.Tensor, step_sigmas: list[float], fresh_noise) -> torch.Tensor:
    """Denoise one chunk. predict_flow(x, timestep) -> v; fresh_noise() -> noise like x."""
    x = noise
    for i, sigma in enumerate(step_sigmas):
        x0 = x - sigma * predict_flow(x, sigma * TRAIN_STEPS)
        if i + 1 == len(step_sigmas):
            return x0
        nxt = step_sigmas[i + 1]
        x = (1 - nxt) * x0 + nxt * fresh_noise()
    return x
