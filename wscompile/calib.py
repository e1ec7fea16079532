"""Calibration inputs (``--calib``): a batch of real inputs for the teacher's one calibration pass.

``--calib`` takes

- a tensor file: ``.pt/.pth/.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``, holding
  the input tensors named like the teacher's forward arguments (``{"input_ids": ..., ...}``), or a
  single tensor for its first argument;
- a folder of images, for an image model: each image is resized to the model's input size and
  normalized with its timm ``pretrained_cfg`` mean and std (ImageNet's when it has none);
- a text file, one sample per line, for an ``hf:`` text teacher: tokenized with the tokenizer in
  the teacher's directory, padded to the longest line.

At most the first ``MAX_SAMPLES`` samples are read (images: files by name; text: lines); the
calibration pass runs them in batches of ``BATCH_SIZE`` (``passes/calibration.py``), and the
plan's calibration record says how many were used of how many, and the cap.
"""

from __future__ import annotations

import os

import torch

from wscompile.errors import SpecError
from wscompile.passes.calibration import MAX_SAMPLES, describe
from wscompile.specs import KIND_IMAGE, KIND_TEXT, LoadedModel
from wscompile.weights import TORCH_SUFFIXES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_TEXT_TOKENS = 128  # tokens kept per line of a text file


def load_calibration(path: str, teacher: LoadedModel) -> tuple[dict[str, torch.Tensor], str]:
    """(forward keyword arguments of the teacher, a description for the plan) read from ``path``.

    Raises:
        SpecError: the path does not exist, holds no samples, or does not fit the teacher's inputs.
    """
    if os.path.isdir(path):
        return _images(path, teacher)
    if not os.path.isfile(path):
        raise SpecError(
            f"--calib '{path}' does not exist; pass a .pt/.safetensors file of input tensors, "
            "a folder of images or a text file"
        )
    if path.endswith(".safetensors") or path.endswith(TORCH_SUFFIXES):
        return _tensors(path, teacher)
    return _text(path, teacher)


def _tensors(path: str, teacher: LoadedModel) -> tuple[dict[str, torch.Tensor], str]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            loaded: object = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpecError(
            f"cannot read calibration tensors from '{path}' ({type(e).__name__}: {e}); save a dict of "
            "tensors with torch.save or safetensors"
        ) from e
    names = list(teacher.inputs)
    if isinstance(loaded, torch.Tensor):
        loaded = {names[0]: loaded}
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise SpecError(
            f"'{path}' holds a {type(loaded).__name__}, not tensors; save a tensor or a dict of tensors "
            f"named like the teacher's inputs ({', '.join(names)})"
        )
    unknown = sorted(set(loaded) - set(names))
    if unknown:
        raise SpecError(
            f"calibration tensor(s) {unknown} in '{path}' are not inputs of the teacher; name them like "
            f"its forward arguments: {', '.join(names)}"
        )
    first = next(iter(loaded.values()))
    total = first.shape[0] if first.dim() else 1
    kept = {k: v[:MAX_SAMPLES] if v.dim() and v.shape[0] == total else v for k, v in loaded.items()}
    return kept, describe(min(total, MAX_SAMPLES), total, "samples", os.path.basename(path))


def _images(path: str, teacher: LoadedModel) -> tuple[dict[str, torch.Tensor], str]:
    from PIL import Image

    if teacher.kind != KIND_IMAGE:
        raise SpecError(
            f"--calib '{path}' is a folder of images, but the teacher {teacher.spec.text} takes "
            f"{', '.join(teacher.inputs)}; pass a .pt/.safetensors file of its input tensors"
        )
    name, example = next(iter(teacher.inputs.items()))
    channels, height, width = example.shape[1:]
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    files = found[:MAX_SAMPLES]
    if not files:
        raise SpecError(f"--calib folder '{path}' has no images ({', '.join(IMAGE_SUFFIXES)})")
    cfg = getattr(teacher.module, "pretrained_cfg", None) or {}
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN)).view(-1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD)).view(-1, 1, 1)
    samples = []
    for file in files:
        try:
            with Image.open(os.path.join(path, file)) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except Image.DecompressionBombError as e:
            raise SpecError(
                f"--calib image '{os.path.join(path, file)}' is too large to decode safely ({e}); "
                "resize it or remove it from the folder"
            ) from e
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise SpecError(
                f"--calib image '{os.path.join(path, file)}' cannot be read ({type(e).__name__}: {e}); "
                "remove or replace it"
            ) from e
        pixels = pixels.view(height, width, -1).permute(2, 0, 1).float() / 255
        samples.append((pixels - mean[: pixels.shape[0]]) / std[: pixels.shape[0]])
    return {name: torch.stack(samples)}, describe(
        len(samples), len(found), "images", f"{os.path.basename(os.path.normpath(path))}/"
    )


def _text(path: str, teacher: LoadedModel) -> tuple[dict[str, torch.Tensor], str]:
    spec = teacher.spec
    if teacher.kind != KIND_TEXT or spec.scheme != "hf":
        raise SpecError(
            f"--calib '{path}' is read as text, which needs an hf: text teacher with a tokenizer "
            f"({teacher.spec.text} is not one); pass a .pt/.safetensors file of its input tensors"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except UnicodeDecodeError as e:
        raise SpecError(
            f"--calib '{path}' is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); "
            "save it as UTF-8, or pass a .pt/.safetensors file of input tensors"
        ) from e
    total, lines = len(lines), lines[:MAX_SAMPLES]
    if not lines:
        raise SpecError(f"--calib text file '{path}' has no non-empty lines")
    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.name)
    except (OSError, ValueError) as e:
        raise SpecError(
            f"no tokenizer in '{spec.name}' for --calib '{path}' ({e}); pass a .pt/.safetensors file "
            "of token ids instead"
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(lines, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
    inputs = {name: encoded[name] for name in teacher.inputs if name in encoded}
    if "input_ids" not in inputs:
        raise SpecError(
            f"the teacher {teacher.spec.text} takes {', '.join(teacher.inputs)}, not token ids; "
            f"pass a .pt/.safetensors file of its input tensors as --calib"
        )
    return inputs, describe(len(lines), total, "lines", os.path.basename(path))
