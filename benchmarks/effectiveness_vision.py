"""Effectiveness on images: teachers pretrained on digits 0-4, students learn digits 5-9 from few labels.

Data: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits, offline), upsampled
bilinearly (ViT: 16 px, ConvNeXt: 32 px), augmented with random shifts of up to one original pixel.

1. Teachers (once per run of this script): a small ViT (timm ``vit_tiny_patch16_224`` at 16 px,
   patch 4, embed 128, depth 6, 4 heads) and a small ConvNeXt (timm ``convnext_atto`` with dims
   32-64-128-256, depths 2-2-4-2) are trained on 80% of digits 0-4; their accuracy on the other
   20% is reported.
2. Students (half width, half depth, both; head_dim 32 for ViTs) learn digits 5-9 from
   ``--labels`` images per class, from their own random init or from wscompile weight selection
   (the classifier head stays at the student's init: the classes differ), with the same steps,
   batches and optimizer. Accuracy is measured on every other image of digits 5-9.

    python benchmarks/effectiveness_vision.py [--seeds 0,1,2,3,4] [--methods uniform,...]

Writes ``benchmarks/results/effectiveness_vision{.md,.csv,_curves.csv,.png}``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sklearn
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PAPER_METHODS,
    RESULTS,
    Metric,
    Point,
    apply_init,
    eval_steps,
    init_names,
    parse_methods,
    provenance,
    set_threads,
    warmup_cosine,
    write_results,
)

PRETRAIN_CLASSES, TARGET_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
METRICS = [Metric("accuracy", "held-out accuracy", 3)]


def vit(embed_dim: int, depth: int) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // 32,
        num_classes=len(TARGET_CLASSES),
    )


def convnext(dims: tuple[int, ...], depths: tuple[int, ...]) -> nn.Module:
    return timm.create_model("convnext_atto", in_chans=1, dims=dims, depths=depths, num_classes=len(TARGET_CLASSES))


@dataclass
class Family:
    """A teacher and its students, at one input size."""

    name: str
    image_size: int  # the 8x8 digits are upsampled to this
    teacher: Callable[[], nn.Module]
    students: dict[str, Callable[[], nn.Module]]  # config name -> builder


FAMILIES = [
    Family(
        "ViT",
        16,
        lambda: vit(128, 6),
        {
            "ViT 6x64 half width": lambda: vit(64, 6),
            "ViT 3x128 half depth": lambda: vit(128, 3),
            "ViT 3x64 both": lambda: vit(64, 3),
        },
    ),
    Family(
        "ConvNeXt",
        32,
        lambda: convnext((32, 64, 128, 256), (2, 2, 4, 2)),
        {
            "ConvNeXt dims/2": lambda: convnext((16, 32, 64, 128), (2, 2, 4, 2)),
            "ConvNeXt depths/2": lambda: convnext((32, 64, 128, 256), (1, 1, 2, 1)),
            "ConvNeXt both": lambda: convnext((16, 32, 64, 128), (1, 1, 2, 1)),
        },
    ),
]


@dataclass
class Split:
    images: torch.Tensor  # (n, 1, size, size), normalized to [-1, 1]
    labels: torch.Tensor  # (n,) class index within its task (0-4)


def digits(classes: tuple[int, ...], size: int) -> Split:
    """All digits of ``classes``, upsampled to ``size`` px, labels renumbered 0..len(classes)-1."""
    data = load_digits()
    keep = torch.isin(torch.from_numpy(data.target), torch.tensor(classes))
    images = torch.from_numpy(data.images).float()[keep].unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(data.target)[keep]
    return Split((images - 0.5) / 0.5, torch.searchsorted(torch.tensor(classes), labels))


def split(data: Split, take: torch.Tensor) -> Split:
    return Split(data.images[take], data.labels[take])


def per_class_split(data: Split, per_class: int | float, seed: int) -> tuple[Split, Split]:
    """(first, rest): ``per_class`` images of each class (a count, or a fraction) go to ``first``."""
    generator = torch.Generator().manual_seed(seed)
    first = []
    for label in data.labels.unique():
        members = (data.labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        first.append(members[: per_class if isinstance(per_class, int) else round(per_class * len(members))])
    chosen = torch.zeros(len(data.labels), dtype=torch.bool)
    chosen[torch.cat(first)] = True
    return split(data, chosen), split(data, ~chosen)


def shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y (zero-filled at the background level)."""
    padded = F.pad(images, (pixels,) * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)])


def add_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise of std ``sigma`` (images are in [-1, 1]); the task's corruption."""
    if sigma == 0:
        return images
    return images + sigma * torch.randn(images.shape, generator=generator)


def corrupted(data: Split, sigma: float) -> Split:
    """An evaluation split with fixed noise (the same for every run)."""
    return Split(add_noise(data.images, sigma, torch.Generator().manual_seed(1234)), data.labels)


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    predicted = torch.cat([model(data.images[i : i + 256]).argmax(-1) for i in range(0, len(data.images), 256)])
    model.train()
    return (predicted == data.labels).float().mean().item()


def train(
    model: nn.Module,
    data: Split,
    steps: int,
    seed: int,
    args: argparse.Namespace,
    on_step: Callable[[int], None] = lambda step: None,
) -> None:
    """AdamW with warmup + cosine; batches drawn with replacement-free epochs, seeded by ``seed``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = warmup_cosine(optimizer, args.warmup, steps)
    generator = torch.Generator().manual_seed(seed)
    pixels = data.images.shape[-1] // 8  # one original pixel
    order = torch.empty(0, dtype=torch.long)
    model.train()
    on_step(0)
    for step in range(1, steps + 1):
        if len(order) < args.batch:
            order = torch.cat([order, torch.randperm(len(data.labels), generator=generator)])
        batch, order = order[: args.batch], order[args.batch :]
        images = add_noise(shift(data.images[batch], pixels, generator), args.noise, generator)
        loss = F.cross_entropy(model(images), data.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        on_step(step)


def pretrain_teacher(family: Family, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """Train the family's teacher on 80% of digits 0-4; returns it and a line for the report."""
    train_set, val_set = per_class_split(digits(PRETRAIN_CLASSES, family.image_size), 0.8, seed=0)
    torch.manual_seed(0)
    teacher = family.teacher()
    start = time.perf_counter()
    train(teacher, train_set, args.teacher_steps, seed=0, args=args)
    teacher.eval()
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    line = (
        f"{family.name} teacher ({params:.2f} M params, {family.image_size} px): {args.teacher_steps} steps on "
        f"{len(train_set.labels)} images of digits 0-4, accuracy {accuracy(teacher, corrupted(val_set, args.noise)):.3f} on the other "
        f"{len(val_set.labels)} ({time.perf_counter() - start:.0f} s)."
    )
    return teacher, line


def run(
    family: Family, config: str, init: str, seed: int, teacher: nn.Module, args: argparse.Namespace
) -> tuple[list[Point], str]:
    """Train one student from one init on few labels of digits 5-9; returns its accuracy curve."""
    labeled, heldout = per_class_split(digits(TARGET_CLASSES, family.image_size), args.labels, seed)
    heldout = corrupted(heldout, args.noise)
    torch.manual_seed(seed)
    student = family.students[config]()
    note = apply_init(init, teacher, student, labeled.images[:2], calibration=labeled.images, seed=seed)
    checkpoints = set(eval_steps(args.steps, args.eval_every))
    curve: list[Point] = []
    start = time.perf_counter()

    def on_step(step: int) -> None:
        if step in checkpoints:
            curve.append(
                Point(config, init, seed, step, {"accuracy": accuracy(student, heldout)}, time.perf_counter() - start)
            )

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
    parser.add_argument(
        "--methods",
        default=PAPER_METHODS,
        help="comma list of wscompile selection methods; unavailable ones are skipped",
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds: labeled subset, student init, batches")
    parser.add_argument("--labels", type=int, default=20, help="labeled images per class of digits 5-9")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="std of Gaussian noise on every image (pixels in [-1, 1]), all tasks"
    )
    parser.add_argument("--steps", type=int, default=300, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    parser.add_argument("--name", default="effectiveness_vision", help="file name stem of the results")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run of every code path (2 steps, one seed); writes to a temp dir",
    )
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.teacher_steps, args.warmup, args.eval_every = "0", 2, 2, 1, 2
        args.out = args.out or Path(tempfile.mkdtemp(prefix="effectiveness_vision_"))
    args.out = args.out or RESULTS
    return args


def main() -> None:
    started, source = time.perf_counter(), provenance()  # the wscompile these numbers come from
    args = parse_args()
    set_threads(args.threads)
    methods, notes = parse_methods(args.methods)
    for note in notes:
        print(note)
    points: list[Point] = []
    teacher_lines, coverage = [], {}
    for family in (f for f in FAMILIES if f.name in args.families.split(",")):
        teacher, line = pretrain_teacher(family, args)
        print(line, flush=True)
        teacher_lines.append(line)
        configs = list(family.students) if not args.smoke else list(family.students)[-1:]
        if args.configs is not None:
            configs = [config for config in configs if config in args.configs.split(",")]
        for config in configs:
            for init in init_names(methods):
                for seed in (int(s) for s in args.seeds.split(",")):
                    curve, coverage[f"{config}, {init}"] = run(family, config, init, seed, teacher, args)
                    points += curve
    command = shlex.join(["python", "benchmarks/effectiveness_vision.py", *sys.argv[1:]])
    preamble = [
        f"`{command}` ({(time.perf_counter() - started) / 60:.0f} min in total): torch {torch.__version__}, "
        f"timm {timm.__version__}, scikit-learn {sklearn.__version__}, {args.threads} thread(s) on "
        f"{os.cpu_count()} shared CPU cores; {source}.",
        "",
        "- data: scikit-learn `load_digits` (8x8), upsampled bilinearly; random shifts of up to one original "
        "pixel during training"
        + (
            f"; Gaussian noise of std {args.noise} (pixels in [-1, 1]) on every image, teachers' and students', "
            "fresh per training batch, fixed on the evaluation images."
            if args.noise
            else "."
        ),
        *(f"- {line}" for line in teacher_lines),
        f"- students: digits 5-9, {args.labels} labeled images per class (chosen per seed), evaluated on all other "
        f"images of digits 5-9; {args.steps} steps of batch {args.batch}, AdamW lr {args.lr} (weight decay "
        f"{args.weight_decay}), {args.warmup} warmup steps then cosine to 0; seeds {args.seeds} (same labeled set, "
        "batches and shifts for every init of a seed). Teachers use the same recipe for "
        f"{args.teacher_steps} steps.",
        "- `random-init` is timm's own init; `ws-<method>` is `wscompile.initialize(teacher, student, "
        "method=<method>)`, classifier head kept at the student's init (5 new classes), so step-0 accuracy "
        "is near chance (0.2) for every init.",
        *(f"- {note}" for note in notes),
        *(f"- coverage, {key}: {value}" for key, value in coverage.items() if "random-init" not in key),
    ]

    write_results(
        args.name,
        args.out,
        points,
        METRICS,
        title="Effectiveness on images: digits 0-4 teachers -> digits 5-9 students (few labels)",
        preamble=preamble,
    )
    print(f"wrote {args.out}/{args.name}.*")


if __name__ == "__main__":
    main()
