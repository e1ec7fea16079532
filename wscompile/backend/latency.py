"""Median wall-clock latency of onnxruntime and of PyTorch eager on the same batch-1 inputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WARMUP_RUNS = 5  # first runs allocate buffers and pick kernels; not timed


def median_ms(run: Callable[[], object], runs: int) -> float:
    """Median of ``runs`` timed calls of ``run`` after the warm-up calls, in milliseconds."""
    for _ in range(WARMUP_RUNS):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ort_ms(session: Any, inputs: dict[str, torch.Tensor], runs: int) -> float:
    """Median onnxruntime latency of ``session`` on ``inputs``."""
    feeds = {i.name: inputs[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    return median_ms(lambda: session.run(None, feeds), runs)


def torch_ms(model: nn.Module, inputs: dict[str, torch.Tensor], runs: int) -> float:
    """Median PyTorch eager latency of ``model(**inputs)`` under ``torch.inference_mode``."""
    with torch.inference_mode():
        return median_ms(lambda: model(**inputs), runs)
