"""The paper's CIFAR-100 experiment: ViT-T from random init vs weight selection from ViT-S.

Xu et al. (ICLR 2024), Table 1 / the official code (github.com/OscarXZQ/weight-selection): ViT-T
trained on CIFAR-100 from scratch reaches 72.4% top-1, initialized by weight selection from an
ImageNet-21k ViT-S 81.4%. The CLI defaults are that recipe: 224 px, 300 epochs (50 warmup), batch
64 x 8 GPUs (here ``--batch-size 64 --update-freq 8``: same effective batch 512 on one GPU), AdamW
lr 2e-3, weight decay 0.05 (none on biases and norms), per-step cosine to 1e-6, RandAugment
rand-m9-mstd0.5-inc1, color jitter 0.4, random erasing 0.25, mixup 0.8 / cutmix 1.0, label
smoothing 0.1, no drop path, mixed precision. The teacher is timm's
``vit_small_patch16_224.augreg_in21k`` (the paper's ``vit_small_patch16_224_in21k`` in timm 0.6).

Needs a GPU and internet (timm pretrained weights, torchvision's CIFAR-100 download):

    python benchmarks/paper_cifar100.py --data-dir ~/data/cifar100

``--smoke`` runs every code path for two steps on torchvision ``FakeData`` at 32 px, with random
(non-pretrained) weights and 2 blocks per ViT, on the CPU, with no downloads, and writes to a temp directory.

Writes ``benchmarks/results/paper_cifar100{.md,.csv,_curves.csv,.png}``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import timm
import timm.optim
import torch
import torchvision
from timm.data import Mixup, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    Metric,
    Point,
    apply_init,
    init_names,
    parse_methods,
    provenance,
    write_results,
)

NUM_CLASSES = 100
PAPER_TOP1 = {"random-init": 72.4, "ws-uniform": 81.4}  # Xu et al. 2024, Table 1 (ViT-T, CIFAR-100)
METRICS = [Metric("top1", "top-1 (%)", 2), Metric("top5", "top-5 (%)", 2)]


def build_transforms(args: argparse.Namespace) -> tuple[transforms.Compose, transforms.Compose]:
    """The official code's train / eval transforms (timm ``create_transform``; 32 px: pad-crop)."""
    train = create_transform(
        input_size=args.img_size,
        is_training=True,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation="bicubic",
        re_prob=args.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    evaluation = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    if args.img_size > 32:
        resize = int(args.img_size / (224 / 256))  # resize to 256, center-crop 224
        evaluation[:0] = [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(args.img_size),
        ]
    else:
        train.transforms[0] = transforms.RandomCrop(args.img_size, padding=4)
    return train, transforms.Compose(evaluation)


def build_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    train_transform, eval_transform = build_transforms(args)
    if args.smoke:
        size = (3, args.img_size, args.img_size)
        train_set = torchvision.datasets.FakeData(2 * args.batch_size, size, NUM_CLASSES, train_transform)
        eval_set = torchvision.datasets.FakeData(args.batch_size, size, NUM_CLASSES, eval_transform)
    else:
        train_set = torchvision.datasets.CIFAR100(args.data_dir, train=True, download=True, transform=train_transform)
        eval_set = torchvision.datasets.CIFAR100(args.data_dir, train=False, download=True, transform=eval_transform)
    pin = args.device.startswith("cuda")
    train = DataLoader(
        train_set,
        args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    evaluation = DataLoader(eval_set, int(1.5 * args.batch_size), num_workers=args.workers, pin_memory=pin)
    return train, evaluation


def lr_at(step: int, total: int, warmup: int, args: argparse.Namespace) -> float:
    """The official schedule: linear warmup from 0, then cosine from ``--lr`` to ``--min-lr``."""
    if step < warmup:
        return args.lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, args: argparse.Namespace) -> dict[str, float]:
    model.eval()
    correct1 = correct5 = seen = 0
    for images, labels in loader:
        images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
        with torch.autocast(args.device.split(":")[0], enabled=args.amp):
            top5 = model(images).topk(5, dim=-1).indices
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(-1).sum().item()
        seen += len(labels)
    model.train()
    return {"top1": 100 * correct1 / seen, "top5": 100 * correct5 / seen}


def model_kwargs(args: argparse.Namespace) -> dict[str, int]:
    # NOTE: the smoke run keeps 2 blocks of each ViT so that it takes seconds on a CPU
    return {"img_size": args.img_size, **({"depth": 2} if args.smoke else {})}


def run(
    init: str, seed: int, teacher: torch.nn.Module, args: argparse.Namespace, loaders: tuple[DataLoader, DataLoader]
) -> list[Point]:
    """Train one ViT-T from one init with the paper's recipe; evaluate every ``--eval-every`` epochs."""
    train_loader, eval_loader = loaders
    torch.manual_seed(seed)
    student = timm.create_model(
        args.student, num_classes=NUM_CLASSES, drop_path_rate=args.drop_path, **model_kwargs(args)
    )
    calibration = next(iter(train_loader))[0]  # one augmented training batch, for data-dependent methods
    note = apply_init(init, teacher, student, calibration[:1], calibration=calibration, seed=seed)
    print(f"{init} / seed {seed}: {note}", flush=True)
    student.to(args.device)
    optimizer = timm.optim.create_optimizer_v2(student, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(enabled=args.amp)
    mixup = Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=NUM_CLASSES
    )
    criterion = SoftTargetCrossEntropy()
    steps_per_epoch = len(train_loader) // args.update_freq
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    start, step = time.perf_counter(), 0
    curve = [Point(args.student, init, seed, 0, evaluate(student, eval_loader, args), 0.0)]
    for epoch in range(1, args.epochs + 1):
        for i, (images, labels) in enumerate(train_loader):
            images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
            images, targets = mixup(images, labels)
            with torch.autocast(args.device.split(":")[0], enabled=args.amp):
                loss = criterion(student(images), targets) / args.update_freq
            scaler.scale(loss).backward()
            if (i + 1) % args.update_freq == 0:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, args)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            curve.append(
                Point(args.student, init, seed, step, evaluate(student, eval_loader, args), time.perf_counter() - start)
            )
            print(
                f"  epoch {epoch}: "
                + " ".join(f"{k} {v:.2f}" for k, v in curve[-1].metrics.items())
                + f" ({curve[-1].seconds / 60:.1f} min)",
                flush=True,
            )
    return curve


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data-dir", type=Path, default=Path("data/cifar100"), help="CIFAR-100 is downloaded here")
    add("--teacher", default="vit_small_patch16_224.augreg_in21k", help="timm name, loaded with pretrained=True")
    add("--student", default="vit_tiny_patch16_224")
    add("--methods", default="uniform", help="comma list of wscompile selection methods; unavailable ones skipped")
    add("--no-random-init", action="store_true", help="skip the random-init baseline")
    add("--seeds", default="0")
    add("--img-size", type=int, default=224)
    add("--epochs", type=int, default=300)
    add("--warmup-epochs", type=int, default=50)
    add("--batch-size", type=int, default=64, help="per step on the device")
    add("--update-freq", type=int, default=8, help="gradient accumulation: effective batch = batch-size x this")
    add("--lr", type=float, default=2e-3)
    add("--min-lr", type=float, default=1e-6)
    add("--weight-decay", type=float, default=0.05)
    add("--drop-path", type=float, default=0.0)
    add("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy")
    add("--color-jitter", type=float, default=0.4)
    add("--reprob", type=float, default=0.25, help="random erasing probability")
    add("--mixup", type=float, default=0.8)
    add("--cutmix", type=float, default=1.0)
    add("--smoothing", type=float, default=0.1)
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision (CUDA only)")
    add("--eval-every", type=int, default=10, help="epochs between evaluations")
    add("--workers", type=int, default=8)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    add("--smoke", action="store_true", help="2 CPU steps on FakeData at 32 px, random weights, no downloads")
    args = parser.parse_args()
    if args.smoke:
        args.img_size, args.epochs, args.warmup_epochs, args.batch_size, args.update_freq = 32, 1, 1, 4, 1
        args.workers, args.device, args.eval_every = 0, "cpu", 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="paper_cifar100_"))
    args.amp = args.amp and args.device.startswith("cuda")
    args.out = args.out or RESULTS
    return args


def main() -> None:
    started, source = time.perf_counter(), provenance()  # the wscompile these numbers come from
    args = parse_args()
    methods, notes = parse_methods(args.methods)
    for note in notes:
        print(note)
    loaders = build_loaders(args)
    teacher = timm.create_model(args.teacher, pretrained=not args.smoke, **model_kwargs(args)).eval()
    inits = init_names(methods)[1:] if args.no_random_init else init_names(methods)
    points = [
        p
        for init in inits
        for seed in (int(s) for s in args.seeds.split(","))
        for p in run(init, seed, teacher, args, loaders)
    ]
    command = shlex.join(["python", "benchmarks/paper_cifar100.py", *sys.argv[1:]])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    preamble = [
        f"`{command}` ({(time.perf_counter() - started) / 3600:.1f} h in total): torch {torch.__version__}, "
        f"timm {timm.__version__}, {device}; {source}.",
        "",
        f"- teacher `{args.teacher}` ({'random weights, smoke run' if args.smoke else 'pretrained'}), student "
        f"`{args.student}` ({NUM_CLASSES} classes, head at its own init), {args.img_size} px.",
        f"- {args.epochs} epochs ({args.warmup_epochs} warmup), batch {args.batch_size} x {args.update_freq}, AdamW "
        f"lr {args.lr} -> {args.min_lr} cosine, weight decay {args.weight_decay}, {args.aa}, mixup {args.mixup} / "
        f"cutmix {args.cutmix}, smoothing {args.smoothing}, random erasing {args.reprob}, amp {args.amp}.",
        "- paper (Xu et al. 2024, Table 1): " + ", ".join(f"{k} {v}%" for k, v in PAPER_TOP1.items()) + " top-1.",
        *(f"- {note}" for note in notes),
    ]

    write_results(
        "paper_cifar100",
        args.out,
        points,
        METRICS,
        title="Paper recipe: ViT-S -> ViT-T on CIFAR-100",
        preamble=preamble,
    )
    print(f"wrote {args.out}/paper_cifar100.*")


if __name__ == "__main__":
    main()
