"""Which selection method and options to use: every one, on the real teacher, paired against uniform.

The text benchmark of ``effectiveness_text.py`` (all-MiniLM-L6-v2 -> a smaller BERT, trained to
reproduce the teacher's sentence embeddings on stdlib docstring sentences, held-out modules for
evaluation), on one student that shrinks in width, depth and heads (``3L-192 both``: 3 of 6
layers, hidden 384 -> 192, 12 -> 6 heads), so every option has something to decide:

- element-selection methods: uniform (the paper's rule), consecutive, magnitude, activation, random;
- ``heads='whole'`` (every student head is one teacher head) instead of ``'split'``;
- ``rescale=True`` (weights whose input shrank scaled by sqrt(teacher_in / student_in));
- layer policies: first (the paper's), uniform, importance (on the calibration sentences).

Each option is changed alone, from ``ws-uniform`` (method uniform, layers first, heads split, no
rescale: the library's defaults). Every init of a seed trains on the same batches; the report pairs
each init by seed against random init and against ``ws-uniform``.

    python benchmarks/methods_text.py [--steps 80] [--train-size 2560] [--seeds 0,1,2] [--inits ...]

Writes ``benchmarks/results/methods_text{.md,.csv,_curves.csv,.png}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from effectiveness_text import main  # noqa: E402

INITS = [
    "random-init",
    "ws-uniform",
    "ws-consecutive",
    "ws-magnitude",
    "ws-activation",
    "ws-random",
    "ws-uniform+heads=whole",
    "ws-uniform+rescale",
    "ws-uniform+layers=uniform",
    "ws-uniform+layers=importance",
]

if __name__ == "__main__":
    main(
        script="benchmarks/methods_text.py",
        description=__doc__.splitlines()[0],
        title="Selection methods and options on text: all-MiniLM-L6-v2 -> 3L-192, paired against uniform",
        defaults={
            "configs": "3L-192 both",
            "inits": ",".join(INITS),
            "baselines": "random-init,ws-uniform",
            "steps": 80,
            "warmup": 8,
            "eval_every": 20,
            "fit_size": 1024,
            "eval_size": 500,
            "train_size": 2560,  # one pass of 80 steps of batch 32; fewer teacher embeddings to compute
            "name": "methods_text",
        },
    )
