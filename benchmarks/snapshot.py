"""Byte-identity oracle (HF configs in the fixed /work/ref/hf, torch seeded per pair, the tree root replaced by <ROOT>) for restructuring: run `wscompile init` (in-process CLI) on every zoo pair and
the paper pairs, write sha256 of the student .safetensors and of the manifest JSON.

    PYTHONPATH=<tree> python /work/ref/snapshot.py --out hashes.json [--only SUBSTR]
    python /work/ref/snapshot.py --compare /work/ref/main.json hashes.json
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run(out, only, hf_dir):
    import torch

    torch.set_num_threads(1)
    root = Path(os.environ.get("PYTHONPATH", ".").split(":")[0]).resolve()
    sys.path.insert(0, str(root))
    from tests.zoo.registry import PAIRS, PARTIAL, resolve, write_hf_configs
    from wscompile import cli

    tmp = Path(tempfile.mkdtemp())
    hf = Path(hf_dir)  # fixed: specs (hence manifests) name these directories
    hf.mkdir(parents=True, exist_ok=True)
    places = write_hf_configs(hf)
    jobs = [
        (p.id, resolve(p.teacher, places), resolve(p.student, places), p.input_shape, p.kind == PARTIAL) for p in PAIRS
    ]
    jobs += [
        (
            "paper-vit-s->t",
            "timm:vit_small_patch16_224?img_size=32",
            "timm:vit_tiny_patch16_224?img_size=32",
            None,
            False,
        ),
        ("paper-convnext-t->f", "timm:convnext_tiny", "timm:convnext_femto", (1, 3, 64, 64), False),
    ]
    result = {}
    for name, t, s, shape, partial in jobs:
        if only and only not in name:
            continue
        d = tmp / name.replace("/", "_").replace(">", "")
        d.mkdir(parents=True)
        argv = [
            "init",
            "--teacher",
            t,
            "--student",
            s,
            "--out",
            str(d / "s.safetensors"),
            "--manifest",
            str(d / "m.json"),
            "--allow-random-teacher",
            "--seed",
            "0",
        ]
        if shape:
            argv += ["--input-shape", ",".join(map(str, shape))]
        if partial:
            argv += ["--allow-partial"]
        start = time.time()
        torch.manual_seed(0)
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        entry = {"exit": code, "s": round(time.time() - start, 1)}
        if (d / "m.json").exists():
            entry["m.json"] = hashlib.sha256(
                (d / "m.json").read_text().replace(str(root), "<ROOT>").encode()
            ).hexdigest()
        if (d / "s.safetensors").exists():
            from safetensors import safe_open

            h = hashlib.sha256()
            with safe_open(str(d / "s.safetensors"), "pt") as f:
                h.update(json.dumps(f.metadata(), sort_keys=True).replace(str(root), "<ROOT>").encode())
                for k in sorted(f.keys()):
                    t = f.get_tensor(k)
                    h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
                    h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            entry["s.safetensors"] = h.hexdigest()
        result[name] = entry
        print(name, entry, flush=True)
    Path(out).write_text(json.dumps(result, indent=1))


def compare(a, b):
    A, B = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    bad = 0
    for k in A:
        if k not in B:
            continue
        for f in ("exit", "s.safetensors", "m.json"):
            if A[k].get(f) != B[k].get(f):
                bad += 1
                print("DIFF", k, f, A[k].get(f), B[k].get(f))
    print(f"{len(set(A) & set(B))} compared, {bad} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="hashes to write (JSON)")
    ap.add_argument("--only", help="pairs whose id contains this")
    ap.add_argument(
        "--hf-dir",
        default=str(Path(tempfile.gettempdir()) / "wscompile-snapshot-hf"),
        help="where the zoo's HF configs are written (the same for both trees)",
    )
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two hash files")
    a = ap.parse_args()
    if not a.compare and not a.out:
        ap.error("pass --out FILE (or --compare A B)")
    sys.exit(compare(*a.compare) if a.compare else run(a.out, a.only, a.hf_dir))
