"""The shared Euler schedule: a single step with Qwen-Image's terminal shift stays finite."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from qflux.diffusion.sampling import euler_scheduler

QWEN = FlowMatchEulerDiscreteScheduler(
    use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
    shift_terminal=0.02, time_shift_type="exponential",
).config  # fmt: skip


def test_one_step_with_a_terminal_shift_is_finite() -> None:
    one = euler_scheduler(QWEN, 1, 64, torch.device("cpu"))
    assert torch.isfinite(one.sigmas).all() and one.sigmas.tolist() == [1.0, 0.0]
    x = torch.ones(1, 4)
    assert torch.equal(one.step(torch.ones(1, 4), one.timesteps[0], x, return_dict=False)[0], torch.zeros(1, 4))


def test_several_steps_keep_the_terminal_shift() -> None:
    four = euler_scheduler(QWEN, 4, 64, torch.device("cpu"))
    assert abs(float(four.sigmas[-2]) - 0.02) < 1e-6  # the last σ before 0 is shift_terminal
