"""Median wall-clock latency of PyTorch eager and of onnxruntime sessions on the same inputs.

The runtimes are timed one after the other, each after its own warm-up, not call by call:
onnxruntime's worker threads keep spinning for a while after each call and would compete with
PyTorch's threads for the cores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WARMUP_RUNS = 5  # first calls allocate buffers and pick kernels; not timed


def medians_ms(runners: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median milliseconds of ``runs`` calls per runner, after ``WARMUP_RUNS`` untimed calls each."""
    medians = {}
    for name, run in runners.items():
        for _ in range(WARMUP_RUNS):
            run()
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        medians[name] = statistics.median(seconds) * 1e3
    return medians


def ort_runner(session: Any, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    """One onnxruntime call of ``session`` on ``inputs``, feeds converted once up front."""
    feeds = {i.name: inputs[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    return lambda: session.run(None, feeds)


def torch_runner(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    """One PyTorch eager call of ``model(**inputs)`` under ``torch.inference_mode``."""

    def run() -> object:
        with torch.inference_mode():
            return model(**inputs)

    return run
