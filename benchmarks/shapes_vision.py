"""Effectiveness on a harder image task: procedurally generated shapes x textures, 15 new classes from few labels.

The digits task of ``effectiveness_vision.py`` is too easy for ConvNeXt students (every init reaches
about 0.96). Here a class is a (shape, texture) pair: 6 shapes (disk, ring, square, diamond,
triangle, plus) x 5 textures (solid, horizontal, vertical or diagonal stripes, checker), drawn at a
random position and size, with a small random rotation, random stripe period and phase, on 32 x 32
grey images with Gaussian noise (``--noise``). The 30 pairs are split so both halves hold every
shape and every texture: teachers learn the 15 pairs with (shape + texture) even, from plenty of
images; students learn the other 15 pairs (new combinations of known parts) from ``--labels``
images per class.

1. Teachers (once per run): a ViT (timm ``vit_tiny_patch16_224`` at 32 px, patch 8, embed 128,
   depth 6, 4 heads) and a ConvNeXt (timm ``convnext_atto``, dims 32-64-128-256, depths 2-2-4-2),
   trained on 80% of ``--teacher-images`` per class; accuracy on the other 20% is reported.
2. Students (half width, half depth, both) from random init or ``wscompile.initialize`` (classifier
   head at the student's init), the same labelled images, batches and noise per seed; accuracy on
   every other generated image of the 15 target classes.

    python benchmarks/shapes_vision.py [--labels 5] [--seeds 0,1,2] [--methods uniform]

Writes ``benchmarks/results/shapes_vision{.md,.csv,_curves.csv,.png}``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    Metric,
    Point,
    apply_init,
    eval_steps,
    init_names,
    parse_methods,
    partial,
    provenance,
    set_threads,
    write_results,
)
from effectiveness_vision import Family, Split, accuracy, corrupted, per_class_split, train  # noqa: E402

SIZE = 32
SHAPES = ("disk", "ring", "square", "diamond", "triangle", "plus")
TEXTURES = ("solid", "horizontal", "vertical", "diagonal", "checker")
PAIRS = [(s, t) for s in range(len(SHAPES)) for t in range(len(TEXTURES))]
PRETRAIN_PAIRS = [p for p in PAIRS if sum(p) % 2 == 0]
TARGET_PAIRS = [p for p in PAIRS if sum(p) % 2 == 1]
METRICS = [Metric("accuracy", "held-out accuracy", 3)]
# report lines about a part's own teachers, which merge_results keeps from every part
PER_PART_NOTES = ("- ViT teacher", "- ConvNeXt teacher")


def shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-the-shape mask in the shape's own coordinates (unit radius)."""
    if shape == "disk":
        return u.square() + v.square() <= 1
    if shape == "ring":
        return ((u.square() + v.square()).sqrt() - 0.75).abs() <= 0.25
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.8
    if shape == "diamond":
        return u.abs() + v.abs() <= 1
    if shape == "triangle":
        return (v >= -0.5) & (math.sqrt(3) * u - v >= -1) & (-math.sqrt(3) * u - v >= -1)
    assert shape == "plus", shape
    return ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))


def texture_mask(texture: str, x: torch.Tensor, y: torch.Tensor, period: float, phase: float) -> torch.Tensor:
    """Where the texture is bright (stripes of ``period`` pixels, shifted by ``phase``)."""
    wave = 2 * math.pi / period
    if texture == "solid":
        return torch.ones_like(x, dtype=torch.bool)
    if texture == "horizontal":
        return torch.sin(wave * y + phase) > 0
    if texture == "vertical":
        return torch.sin(wave * x + phase) > 0
    if texture == "diagonal":
        return torch.sin(wave * (x + y) / math.sqrt(2) + phase) > 0
    assert texture == "checker", texture
    return (torch.sin(wave * x + phase) > 0) ^ (torch.sin(wave * y + 2 * phase) > 0)


def render(shape: str, texture: str, generator: torch.Generator) -> torch.Tensor:
    """One (1, SIZE, SIZE) image in [-1, 1]: background -1, shape 0, its bright texture +1."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    radius = uniform(0.22, 0.4) * SIZE
    cx, cy = uniform(radius, SIZE - radius), uniform(radius, SIZE - radius)
    angle = uniform(-0.25, 0.25)  # small: a square turned by 45 degrees would be a diamond
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u, v = dx * math.cos(angle) + dy * math.sin(angle), -dx * math.sin(angle) + dy * math.cos(angle)
    inside = shape_mask(shape, u, v)
    bright = texture_mask(texture, x, y, uniform(3.0, 5.0), uniform(0.0, 2 * math.pi))
    return (-1.0 + inside.float() * (1.0 + bright.float())).unsqueeze(0)


def shapes(pairs: list[tuple[int, int]], per_class: int, seed: int) -> Split:
    """``per_class`` images of each pair, labels 0..len(pairs)-1 in ``pairs`` order."""
    generator = torch.Generator().manual_seed(seed)
    images = [render(SHAPES[s], TEXTURES[t], generator) for s, t in pairs for _ in range(per_class)]
    labels = torch.arange(len(pairs)).repeat_interleave(per_class)
    return Split(torch.stack(images), labels)


def vit(embed_dim: int, depth: int, classes: int) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=SIZE,
        patch_size=8,
        in_chans=1,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // 32,
        num_classes=classes,
    )


def convnext(dims: tuple[int, ...], depths: tuple[int, ...], classes: int) -> nn.Module:
    return timm.create_model("convnext_atto", in_chans=1, dims=dims, depths=depths, num_classes=classes)


TEACHER_CLASSES, STUDENT_CLASSES = len(PRETRAIN_PAIRS), len(TARGET_PAIRS)
FAMILIES = [
    Family(
        "ViT",
        SIZE,
        lambda: vit(128, 6, TEACHER_CLASSES),
        {
            "ViT 6x64 half width": lambda: vit(64, 6, STUDENT_CLASSES),
            "ViT 3x128 half depth": lambda: vit(128, 3, STUDENT_CLASSES),
            "ViT 3x64 both": lambda: vit(64, 3, STUDENT_CLASSES),
        },
    ),
    Family(
        "ConvNeXt",
        SIZE,
        lambda: convnext((32, 64, 128, 256), (2, 2, 4, 2), TEACHER_CLASSES),
        {
            "ConvNeXt dims/2": lambda: convnext((16, 32, 64, 128), (2, 2, 4, 2), STUDENT_CLASSES),
            "ConvNeXt depths/2": lambda: convnext((32, 64, 128, 256), (1, 1, 2, 1), STUDENT_CLASSES),
            "ConvNeXt both": lambda: convnext((16, 32, 64, 128), (1, 1, 2, 1), STUDENT_CLASSES),
        },
    ),
]


def pretrain_teacher(family: Family, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """Train the family's teacher on 80% of the pretraining pairs' images; returns it and a report line."""
    train_set, val_set = per_class_split(shapes(PRETRAIN_PAIRS, args.teacher_images, seed=0), 0.8, seed=0)
    torch.manual_seed(0)
    teacher = family.teacher()
    start = time.perf_counter()
    train(teacher, train_set, args.teacher_steps, seed=0, args=args)
    teacher.eval()
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    line = (
        f"{family.name} teacher ({params:.2f} M params): {args.teacher_steps} steps on {len(train_set.labels)} "
        f"images of the {TEACHER_CLASSES} pretraining pairs, accuracy "
        f"{accuracy(teacher, corrupted(val_set, args.noise)):.3f} on the other {len(val_set.labels)} "
        f"({time.perf_counter() - start:.0f} s)."
    )
    return teacher, line


def run(
    family: Family, config: str, init: str, seed: int, teacher: nn.Module, pool: Split, args: argparse.Namespace
) -> tuple[list[Point], str]:
    """Train one student from one init on ``--labels`` images per target pair; returns its curve."""
    labeled, heldout = per_class_split(pool, args.labels, seed)
    heldout = corrupted(heldout, args.noise)
    torch.manual_seed(seed)
    student = family.students[config]()
    note = apply_init(init, teacher, student, labeled.images[:2], calibration=labeled.images, seed=seed)
    checkpoints = set(eval_steps(args.steps, args.eval_every))
    curve: list[Point] = []
    start = time.perf_counter()

    def on_step(step: int) -> None:
        if step in checkpoints:
            metrics = {"accuracy": accuracy(student, heldout)}
            curve.append(Point(config, init, seed, step, metrics, time.perf_counter() - start))

    train(student, labeled, args.steps, seed, args, on_step)
    print(
        f"  {config} / {init} / seed {seed}: accuracy {curve[0].metrics['accuracy']:.3f} -> "
        f"{curve[-1].metrics['accuracy']:.3f} ({curve[-1].seconds:.0f} s)",
        flush=True,
    )
    return curve, note


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES))
    parser.add_argument("--configs", default=None, help="comma list of student configs (default: every one)")
    parser.add_argument("--methods", default="uniform", help="comma list of wscompile selection methods")
    parser.add_argument("--seeds", default="0,1,2", help="seeds: labelled subset, student init, batches")
    parser.add_argument("--labels", type=int, default=5, help="labelled images per target pair")
    parser.add_argument("--pool", type=int, default=60, help="generated images per target pair (labels + evaluation)")
    parser.add_argument("--teacher-images", type=int, default=200, help="generated images per pretraining pair")
    parser.add_argument("--noise", type=float, default=0.3, help="std of Gaussian noise on every image")
    parser.add_argument("--steps", type=int, default=300, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    parser.add_argument("--name", default="shapes_vision", help="file name stem of the results")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds-long run of every code path (2 steps, one seed); temp dir"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.teacher_steps, args.warmup, args.eval_every = "0", 2, 2, 1, 2
        args.pool, args.teacher_images, args.labels = 4, 4, 2
        args.out = args.out or Path(tempfile.mkdtemp(prefix="shapes_vision_"))
    args.out = args.out or RESULTS
    return args


def main() -> None:
    started, source = time.perf_counter(), provenance()  # the wscompile these numbers come from
    args = parse_args()
    set_threads(args.threads)
    methods, notes = parse_methods(args.methods)
    pool = shapes(TARGET_PAIRS, args.pool, seed=1)
    points: list[Point] = []
    teacher_lines, coverage = [], {}
    families = [f for f in FAMILIES if f.name in args.families.split(",")]
    plan = [
        (family, config)
        for family in families
        for config in (list(family.students)[-1:] if args.smoke else list(family.students))
        if args.configs is None or config in args.configs.split(",")
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    total = len(plan) * len(init_names(methods)) * len(seeds)

    def report(done: int) -> None:
        """Write the results of the runs so far (after every run: a stopped benchmark keeps them)."""
        command = shlex.join(["python", "benchmarks/shapes_vision.py", *sys.argv[1:]])
        preamble = [
            f"`{command}` ({(time.perf_counter() - started) / 60:.0f} min in total{partial(done, total)}, machine "
            f"shared with other jobs): torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s) "
            f"on {os.cpu_count()} shared CPU cores; {source}.",
            "",
            f"- data: generated {SIZE} x {SIZE} images, a class per (shape, texture) pair of {len(SHAPES)} shapes x "
            f"{len(TEXTURES)} textures, random position, size and stripe phase; Gaussian noise of std {args.noise} "
            "(fresh per training batch, fixed on evaluation images); random shifts of up to 4 px in training. "
            f"Teachers: the {TEACHER_CLASSES} pairs with (shape + texture) even; students: the other "
            f"{STUDENT_CLASSES}.",
            *(f"- {line}" for line in teacher_lines),
            f"- students: {args.labels} labelled images per pair (chosen per seed from {args.pool} generated), "
            f"evaluated on the other {args.pool - args.labels} per pair; {args.steps} steps of batch {args.batch}, "
            f"AdamW lr {args.lr} (weight decay {args.weight_decay}), {args.warmup} warmup steps then cosine to 0; "
            f"seeds {args.seeds} (same labelled set, batches and noise for every init of a seed). Teachers use the "
            f"same recipe for {args.teacher_steps} steps.",
            "- `random-init` is timm's own init; `ws-<method>` is `wscompile.initialize(teacher, student, "
            f"method=<method>)`, classifier head at the student's init, so step 0 is near chance "
            f"({1 / STUDENT_CLASSES:.3f}).",
            *(f"- {note}" for note in notes),
            *(f"- coverage, {key}: {value}" for key, value in coverage.items() if "random-init" not in key),
        ]
        write_results(
            args.name,
            args.out,
            points,
            METRICS,
            title="Effectiveness on generated shapes x textures: 15 pretraining pairs -> 15 new pairs, few labels",
            preamble=preamble,
        )

    teachers: dict[str, nn.Module] = {}
    for family, config in plan:
        if family.name not in teachers:
            teachers[family.name], line = pretrain_teacher(family, args)
            print(line, flush=True)
            teacher_lines.append(line)
        for init in init_names(methods):
            for seed in seeds:
                curve, coverage[f"{config}, {init}"] = run(
                    family, config, init, seed, teachers[family.name], pool, args
                )
                points += curve
                report(len({(p.config, p.init, p.seed) for p in points}))
    print(f"wrote {args.out}/{args.name}.*")


if __name__ == "__main__":
    main()
