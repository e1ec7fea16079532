"""Names the command line offers as choices, and limits its help states, importable without torch.

The CLI parses and checks its arguments before importing torch or building a model (an argument
error takes milliseconds, not the seconds torch's import takes), so the choices it validates live
here; the registries they name (``passes.methods.METHODS``, ``matching.layers.POLICIES``,
``passes.heads.HEAD_MODES``) are tested to agree with them.
"""

from __future__ import annotations

METHODS = ("uniform", "consecutive", "random", "magnitude", "activation")  # element selection (--method)
LAYER_POLICIES = ("first", "uniform", "last", "drop-middle", "importance")  # --layers, besides explicit maps
HEAD_MODES = ("split", "whole")  # --heads
CALIB_MAX_SAMPLES = 512  # calibration samples used at most (the first ones; passes/calibration.py)
CALIB_BATCH_SIZE = 16  # calibration samples per teacher forward
