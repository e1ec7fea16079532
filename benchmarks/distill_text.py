"""Does weight selection add to knowledge distillation? A labelled task on the real teacher.

Task: which standard-library module a docstring sentence comes from (the ``--classes`` top-level
modules with the most sentences). Sentences come from ``effectiveness_text.py``'s corpus (every
docstring of the stdlib, split into sentences, deduplicated); a docstring goes wholly to training
or wholly to evaluation (``crc32(docstring) % --heldout-every == 0`` -> evaluation), so no held-out
sentence shares a docstring with a training one. Each seed draws ``per_class`` labelled sentences of
each class from a fixed training pool; two training-set sizes (``--sizes``).

Student: a BERT (``--config``, e.g. 3L-192) with a linear classifier on its mean-pooled embedding.
Four arms per student, the same seeds, labelled sentences, batches and steps:

- ``random-init``: transformers' own init, cross-entropy on the labels;
- ``ws-uniform``: ``wscompile.initialize(teacher, student)`` (classifier at the student's init);
- ``random-init+KD`` and ``ws-uniform+KD``: cross-entropy plus distillation from the teacher on the
  same labelled sentences (no extra data): KL divergence to the teacher's logits at temperature T
  (times T^2) and 1 - cos(projection(student embedding), teacher embedding). The teacher's logits
  come from all-MiniLM-L6-v2 with a logistic-regression probe fitted on that seed's labelled
  sentences (its held-out accuracy is reported); the projection hidden -> 384 is the least-squares
  fit on the labelled sentences at step 0, then trained jointly.

Reported per size: held-out accuracy at equal steps (and training accuracy, which tells whether a
run memorized its labels), the first evaluated step at which each arm's seed-mean reaches random
init's final accuracy, paired-by-seed differences, and whether WS+KD > KD > WS > random holds.

    python benchmarks/distill_text.py [--config "3L-192 both"] [--sizes 8,64] [--steps 60]

Writes ``benchmarks/results/distill_text{.md,.csv,_curves.csv,.png}``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoTokenizer, BertModel

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RANDOM_INIT,
    RESULTS,
    Metric,
    Point,
    apply_init,
    eval_steps,
    partial,
    provenance,
    set_threads,
    summarize,
    warmup_cosine,
    write_results,
)
from effectiveness_text import (  # noqa: E402
    STUDENTS,
    TEACHER_DIR,
    Corpus,
    as_inputs,
    batch_order,
    collate,
    embed,
    fit_projection,
    mean_pool,
    sentences,
    stdlib_docstrings,
    student_config,
)

KD = "+KD"
ARMS = [RANDOM_INIT, "ws-uniform", RANDOM_INIT + KD, "ws-uniform" + KD]
METRICS = [Metric("accuracy", "held-out accuracy", 3), Metric("train_accuracy", "train accuracy", 3)]
# report lines about a part's own runs, which merge_results keeps from every part
PER_PART_NOTES = ("- teacher probe held-out accuracy",)


@dataclass
class Task:
    """The labelled sentences: a training pool per class, and the held-out evaluation set."""

    classes: list[str]  # module names, label = index
    pool: Corpus  # training pool (token ids, teacher embeddings)
    pool_labels: torch.Tensor  # (n,) class of each pool sentence
    heldout: Corpus
    heldout_labels: torch.Tensor
    notes: list[str]


def build_task(teacher: BertModel, tokenizer, args: argparse.Namespace) -> Task:
    """Sentences of the ``--classes`` largest modules, split by docstring, embedded by the teacher once."""
    train: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    owners: dict[str, set[str]] = {}  # sentence -> modules it occurs in (dropped if more than one)
    split: dict[str, bool] = {}  # sentence -> held out
    for module, docs in stdlib_docstrings(args.max_files).items():
        for doc in docs:
            is_heldout = zlib.crc32(doc.encode()) % args.heldout_every == 0
            for sentence in sentences(doc):
                owners.setdefault(sentence, set()).add(module)
                split[sentence] = split.get(sentence, is_heldout)
    for sentence, modules in owners.items():
        if len(modules) == 1:
            (heldout if split[sentence] else train).setdefault(next(iter(modules)), []).append(sentence)
    largest = max(args.sizes)
    eligible = [m for m in train if len(train[m]) >= largest and len(heldout.get(m, [])) >= args.eval_per_class]
    classes = sorted(sorted(eligible, key=lambda m: -len(train[m]))[: args.classes])
    if len(classes) < 2:
        raise SystemExit(f"only {len(classes)} modules have {largest} train sentences; lower --sizes")
    generator = torch.Generator().manual_seed(1234)  # pool and held-out sample are the same for every run

    def sample(texts: list[str], count: int) -> list[str]:
        return [texts[i] for i in sorted(torch.randperm(len(texts), generator=generator)[:count].tolist())]

    pool = [(s, c) for c, m in enumerate(classes) for s in sample(train[m], args.pool_per_class)]
    evaluation = [(s, c) for c, m in enumerate(classes) for s in sample(heldout[m], args.eval_per_class)]
    start = time.perf_counter()

    def corpus(texts: list[str]) -> Corpus:
        ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
        return Corpus(ids, embed(teacher, ids, tokenizer.pad_token_id))

    task = Task(
        classes,
        corpus([s for s, _ in pool]),
        torch.tensor([c for _, c in pool]),
        corpus([s for s, _ in evaluation]),
        torch.tensor([c for _, c in evaluation]),
        [],
    )
    task.notes = [
        f"{len(classes)} classes (the modules with the most train sentences): {', '.join(classes)}; "
        f"training pool {len(pool)} sentences (up to {args.pool_per_class} per class), held-out "
        f"{len(evaluation)} sentences ({args.eval_per_class} per class) from docstrings with crc32 % "
        f"{args.heldout_every} == 0; sentences found in more than one module dropped; teacher embeddings "
        f"took {time.perf_counter() - start:.0f} s.",
    ]
    return task


def labelled_subset(task: Task, per_class: int, seed: int) -> torch.Tensor:
    """Pool indices of ``per_class`` sentences of each class, chosen by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(task.classes)):
        members = (task.pool_labels == label).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float) -> nn.Linear:
    """The teacher's classifier: multinomial logistic regression on its (frozen) embeddings, L-BFGS."""
    probe = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


@torch.no_grad()
def accuracy(student: BertModel, head: nn.Linear, ids: list[list[int]], labels: torch.Tensor, pad_id: int) -> float:
    return (head(embed(student, ids, pad_id)).argmax(-1) == labels).float().mean().item()


def run(
    size: int, arm: str, seed: int, teacher: BertModel, task: Task, pad_id: int, args: argparse.Namespace
) -> tuple[list[Point], dict[str, float]]:
    """Train one arm on ``size`` labels per class; returns its curve and the teacher probe's accuracy."""
    config = f"{size} per class"
    chosen = labelled_subset(task, size, seed).tolist()
    ids = [task.pool.ids[i] for i in chosen]
    labels = task.pool_labels[chosen]
    teacher_embeddings = task.pool.targets[chosen]
    probe = fit_probe(
        F.normalize(teacher_embeddings, dim=-1), labels, len(task.classes), args.probe_weight_decay
    ).requires_grad_(False)
    teacher_logits = probe(F.normalize(teacher_embeddings, dim=-1))
    probe_accuracy = (
        (probe(F.normalize(task.heldout.targets, dim=-1)).argmax(-1) == task.heldout_labels).float().mean().item()
    )

    layers, hidden = STUDENTS[args.config]
    torch.manual_seed(seed)
    student = BertModel(student_config(teacher.config, layers, hidden))
    head = nn.Linear(hidden, len(task.classes))
    distill = arm.endswith(KD)
    init = arm.removesuffix(KD)
    calibration = as_inputs(ids[: args.calibration_size], pad_id)
    apply_init(init, teacher, student, as_inputs(ids[:2], pad_id), calibration=calibration, seed=seed)
    start = time.perf_counter()
    parameters = [*student.parameters(), *head.parameters()]
    if distill:
        projection = fit_projection(
            student, Corpus(ids, F.normalize(teacher_embeddings, dim=-1)), pad_id, teacher.config.hidden_size, 1e-3
        )
        parameters += list(projection.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    schedule = warmup_cosine(optimizer, args.warmup, args.steps)
    checkpoints = set(eval_steps(args.steps, args.eval_every))
    batches = batch_order([len(x) for x in ids], min(args.batch, len(ids)), args.steps, seed)
    train_probe = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[: args.eval_train].tolist()

    def point(step: int) -> Point:
        metrics = {
            "accuracy": accuracy(student, head, task.heldout.ids, task.heldout_labels, pad_id),
            "train_accuracy": accuracy(student, head, [ids[i] for i in train_probe], labels[train_probe], pad_id),
        }
        return Point(config, arm, seed, step, metrics, time.perf_counter() - start)

    curve = [point(0)]
    student.train()
    for step, batch in enumerate(batches, start=1):
        tokens, mask = collate([ids[i] for i in batch], pad_id)
        embedding = mean_pool(student, tokens, mask)
        logits = head(embedding)
        loss = F.cross_entropy(logits, labels[batch])
        if distill:
            t = args.temperature
            soft = F.kl_div(
                F.log_softmax(logits / t, dim=-1),
                F.log_softmax(teacher_logits[batch] / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            cosine = 1 - F.cosine_similarity(projection(embedding), teacher_embeddings[batch], dim=-1).mean()
            loss = loss + args.kd_weight * (t * t * soft + cosine)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in checkpoints:
            curve.append(point(step))
    print(
        f"  {config} / {arm} / seed {seed}: accuracy {curve[0].metrics['accuracy']:.3f} -> "
        f"{curve[-1].metrics['accuracy']:.3f} (train {curve[-1].metrics['train_accuracy']:.3f}; teacher probe "
        f"{probe_accuracy:.3f}; {curve[-1].seconds:.0f} s)",
        flush=True,
    )
    return curve, {config: probe_accuracy}


def epilogue(points: list[Point]) -> list[str]:
    """The report's last section: per training-set size, the ranking of the arms and the regime."""
    sizes = dict.fromkeys(p.config for p in points)
    return ["## Does WS+KD > KD > WS > random hold?", "", *(line for c in sizes for line in ordering(points, c)), ""]


def ordering(points: list[Point], config: str) -> list[str]:
    """For one size: the arms ranked by final seed-mean accuracy, the regime, and WS+KD > KD > WS > random."""
    summaries = {s.init: s for s in summarize([p for p in points if p.config == config], METRICS)}
    if set(summaries) != set(ARMS):
        return [f"- **{config}**: not every arm has run yet."]
    final = {arm: summaries[arm].final["accuracy"] for arm in ARMS}
    train = {arm: summaries[arm].final["train_accuracy"][0] for arm in ARMS}
    ranked = sorted(ARMS, key=lambda arm: -final[arm][0])
    spread = final[ranked[0]][0] - final[ranked[-1]][0]
    noise = statistics.fmean(std for _, std in final.values())
    claim = [f"ws-uniform{KD}", f"{RANDOM_INIT}{KD}", "ws-uniform", RANDOM_INIT]
    holds = all(final[a][0] > final[b][0] for a, b in zip(claim, claim[1:], strict=False))
    regime = (
        f"converged: every arm within {spread:.3f} of the others, about the seed spread ({noise:.3f})"
        if spread <= 2 * noise
        else f"separated: arms span {spread:.3f}, more than twice the mean seed spread ({noise:.3f})"
    )
    memorized = [arm for arm in ARMS if train[arm] >= 0.99]
    return [
        f"- **{config}**: ranking by final held-out accuracy "
        + " > ".join(f"`{arm}` {final[arm][0]:.3f}" for arm in ranked)
        + f". WS+KD > KD > WS > random **{'holds' if holds else 'does not hold'}** here. Regime: {regime}; "
        + (
            f"train accuracy ≥ 0.99 (labels memorized) for {', '.join(f'`{a}`' for a in memorized)}."
            if memorized
            else "no arm memorized its labels (train accuracy < 0.99)."
        )
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="3L-192 both", choices=list(STUDENTS), help="student")
    parser.add_argument("--sizes", default="8,64", help="labelled sentences per class, comma list")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of arms to run (parts merge later)")
    parser.add_argument("--classes", type=int, default=16, help="modules to tell apart")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=6, help="linear warmup steps, then cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--temperature", type=float, default=2.0, help="of the logit distillation")
    parser.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation terms")
    parser.add_argument("--probe-weight-decay", type=float, default=1e-3, help="L2 of the teacher's probe")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-per-class", type=int, default=30, help="held-out sentences per class")
    parser.add_argument("--eval-train", type=int, default=128, help="labelled sentences scored for train accuracy")
    parser.add_argument("--pool-per-class", type=int, default=100, help="training pool the labels are drawn from")
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--heldout-every", type=int, default=4, help="evaluate on docstrings with crc32 %% N == 0")
    parser.add_argument("--max-files", type=int, default=None, help="cap on parsed stdlib files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    parser.add_argument("--name", default="distill_text", help="file name stem of the results")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds-long run of every code path (tiny corpus, 2 steps); temp dir"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.warmup, args.eval_every, args.classes = "0", 2, 1, 2, 3
        args.sizes, args.eval_per_class, args.pool_per_class, args.max_files = "2,4", 3, 4, 60
        args.out = args.out or Path(tempfile.mkdtemp(prefix="distill_text_"))
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    if max(args.sizes) > args.pool_per_class:
        parser.error(f"--sizes up to {max(args.sizes)} exceed --pool-per-class {args.pool_per_class}; raise it")
    args.out = args.out or RESULTS
    return args


def main() -> None:
    started, source = time.perf_counter(), provenance()  # the wscompile these numbers come from
    args = parse_args()
    set_threads(args.threads)
    teacher = BertModel.from_pretrained(TEACHER_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    task = build_task(teacher, tokenizer, args)
    print(task.notes[0], flush=True)
    points: list[Point] = []
    probes: dict[str, list[float]] = {}
    arms = args.arms.split(",")
    total = len(args.sizes) * len(arms) * len(args.seeds.split(","))

    def report(done: int) -> None:
        """Write the results of the runs so far (after every run: a stopped benchmark keeps them)."""
        command = shlex.join(["python", "benchmarks/distill_text.py", *sys.argv[1:]])
        preamble = [
            f"`{command}` ({(time.perf_counter() - started) / 60:.0f} min in total{partial(done, total)}, machine shared with other jobs): "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]} (its "
            f"stdlib is the corpus), {args.threads} thread(s) on {os.cpu_count()} shared CPU cores; {source}.",
            "",
            f"- task: {task.notes[0]}",
            f"- student `{args.config}` with a linear classifier on its mean-pooled embedding; `random-init` is "
            "transformers' own init, `ws-uniform` is `wscompile.initialize(teacher, student)` (classifier at the "
            "student's init in every arm).",
            f"- `+KD`: loss = cross-entropy + {args.kd_weight} × (T² KL(teacher ‖ student) at T = {args.temperature} + "
            "1 - cos(projection(student embedding), teacher embedding)), on the same labelled sentences (no extra "
            "data). Teacher logits: all-MiniLM-L6-v2 embeddings (normalized) through a logistic-regression probe "
            f"fitted on the seed's labelled sentences (L-BFGS, L2 {args.probe_weight_decay}); projection hidden -> 384 "
            "least-squares fitted at step 0, then trained.",
            "- teacher probe held-out accuracy (mean over seeds; the KD target's own score): "
            + ", ".join(f"{config}: {statistics.fmean(v):.3f}" for config, v in probes.items()),
            f"- training: {args.steps} steps of batch {args.batch} for every arm and size, AdamW lr {args.lr} (weight "
            f"decay {args.weight_decay}), {args.warmup} warmup steps then cosine to 0, dropout 0.1; seeds {args.seeds} "
            "(same labelled sentences, batches and classifier init for every arm of a seed).",
            f"- metrics: held-out accuracy (chance {1 / len(task.classes):.3f}); train accuracy on up to "
            f"{args.eval_train} of the labelled sentences; `steps to random's final` = first evaluated step (every "
            f"{args.eval_every}) at which the arm's seed-mean reaches random init's final seed-mean.",
        ]
        write_results(
            args.name,
            args.out,
            points,
            METRICS,
            title=f"Weight selection and distillation on a labelled task: which stdlib module ({args.config})",
            preamble=preamble,
            baselines=[RANDOM_INIT, RANDOM_INIT + KD, "ws-uniform"],  # vs ws-uniform: does KD add to WS?
            epilogue=epilogue(points),
        )

    for size in args.sizes:
        for arm in arms:
            for seed in (int(s) for s in args.seeds.split(",")):
                curve, probe = run(size, arm, seed, teacher, task, tokenizer.pad_token_id, args)
                points += curve
                for config, value in probe.items():
                    probes.setdefault(config, []).append(value)
                report(len({(p.config, p.init, p.seed) for p in points}))
    print(f"wrote {args.out}/{args.name}.*")


if __name__ == "__main__":
    main()
