"""The model zoo: every registry pair through the whole compiler, checked by oracles.

Per pair (built and compiled once: ``conftest`` runs a pair's checks back to back, ``PairCache``
keeps the last pair):

1. coverage: the student's share taken from the teacher (outside the classifier head) reaches the
   pair's bound, and every tensor left at the student's init says why;
2. every selected tensor equals the teacher tensor read at the indices the plan reports, and
   loading the compiled state_dict keeps every value (tied tensors were given one value);
3. the initialized student's outputs are finite;
4. one SGD step on a fixed batch lowers a loss (the student trains).

Per family (its first pair, ``family_representatives``):

5. identity oracle: a student of the teacher's architecture, with another random init, computes
   the teacher's function exactly once initialized with ``select_head=True`` (all ops here are
   deterministic on the CPU, so no tolerance);
6. renaming: the student nested under another attribute name gets the same values.

Guards: every supported family has a pair, and its identity and renaming oracles.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wscompile import pipeline
from wscompile.passes.select import teacher_index, to_student_layout
from wscompile.plan import RULE_STUDENT_INIT, TensorRecord
from wscompile.specs import LoadedModel, load_model

from .registry import PAIRS, PARTIAL, SUPPORTED_FAMILIES, Pair, family_representatives, resolve

# SGD step of check 4: small enough that the first-order decrease dominates for every pair.
LEARNING_RATE = 1e-3
BATCH = 2
IDENTITY_NOISE = 0.1  # std of the noise added to the identity oracle's teacher parameters
WRAPPED = "inner_model"  # attribute the renaming check nests the student under


def _id(pair: Pair) -> str:
    return pair.id


@dataclass
class Built:
    """One pair, built and compiled."""

    pair: Pair
    teacher: LoadedModel
    student: LoadedModel  # module stays at the student's own init: checks work on copies
    compiled: pipeline.Compiled


class PairCache:
    """The last built pair, or its failure (tests arrive grouped by pair: each pair is built once)."""

    def __init__(self, places: dict[str, str]) -> None:
        self.places = places
        self.pair_id: str | None = None
        self.result: Built | BaseException | None = None  # BaseException: pytest's skip

    def get(self, pair: Pair) -> Built:
        if self.pair_id != pair.id:
            self.pair_id, self.result = pair.id, None  # free the previous pair before building the next
            try:
                teacher = load(pair, pair.teacher, self.places, role="teacher", seed=0)
                student = load(pair, pair.student, self.places, role="student", seed=1)
                self.result = Built(pair, teacher, student, compile_pair(teacher, student.module, student.inputs))
            except (Exception, pytest.skip.Exception) as e:  # every check of the pair reports the same outcome
                self.result = e
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.fixture(scope="module")
def cache(places: dict[str, str]) -> PairCache:
    return PairCache(places)


@pytest.fixture
def built(pair: Pair, cache: PairCache) -> Built:
    return cache.get(pair)


def load(pair: Pair, spec: str, places: dict[str, str], *, role: str, seed: int) -> LoadedModel:
    try:
        text = resolve(spec, places)
    except KeyError as e:
        pytest.skip(f"{pair.id} needs {e} (install the dev extra)")
    return load_model(text, role=role, seed=seed, input_shape=pair.input_shape)


def compile_pair(
    teacher: LoadedModel, student: nn.Module, student_inputs: dict[str, torch.Tensor], *, select_head: bool = False
) -> pipeline.Compiled:
    return pipeline.compile(
        teacher.module,
        student,
        teacher_inputs=teacher.inputs,
        student_inputs=student_inputs,
        teacher_source=teacher.source,
        teacher_spec=teacher.spec.text,
        select_head=select_head,
    )


def initialized(built: Built) -> nn.Module:
    """A copy of the student holding the compiled state_dict."""
    student = copy.deepcopy(built.student.module)
    student.load_state_dict(built.compiled.state_dict)
    return student


def output_tensors(output: object) -> list[torch.Tensor]:
    """Every tensor of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [tensor for item in output for tensor in output_tensors(item)]
    return []


# ---- per pair ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
def test_coverage_and_every_shortfall_explained(pair: Pair, built: Built) -> None:
    plan = built.compiled.plan
    left = [r for r in plan.tensors if r.rule == RULE_STUDENT_INIT and not r.is_head]
    unexplained = [r.student for r in left if not (r.reason or "").strip()]
    assert not unexplained, f"{pair.id}: tensors kept at student init without a reason: {unexplained}"
    coverage = plan.coverage.fraction_no_head
    assert coverage >= pair.coverage_bound, (
        f"{pair.id}: {coverage:.1%} of the student outside the head comes from the teacher, "
        f"expected >= {pair.coverage_bound:.0%}; left at init: {[(r.student, r.reason) for r in left]}"
    )
    if pair.kind == PARTIAL:
        assert left, f"{pair.id} now maps every tensor: make it a same-family pair"


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
def test_selected_values_are_the_teacher_elements_at_the_reported_indices(pair: Pair, built: Built) -> None:
    plan, state = built.compiled.plan, built.compiled.state_dict
    teacher_state = built.teacher.module.state_dict()
    groups = {group.id: group.indices for group in plan.groups}
    selected = [record for record in plan.tensors if record.teacher is not None]
    assert selected, f"{pair.id}: nothing selected"
    wrong = []

    def read(record: TensorRecord) -> torch.Tensor:
        values = teacher_state[record.teacher]
        assert list(values.shape) == record.teacher_shape, record.student
        for axis, index in enumerate(teacher_index(record, groups)):
            if index is not None:
                values = values.index_select(axis, torch.tensor(index, dtype=torch.long))
        return to_student_layout(values, record)

    for record in selected:
        # an assembled tensor (separate teacher q, k, v into a fused qkv): its parts side by side
        values = torch.cat([read(p) for p in record.parts], record.parts_axis) if record.parts else read(record)
        expected = values.to(state[record.student].dtype)
        if not torch.equal(state[record.student], expected):
            wrong.append(f"{record.student} <- {record.teacher}")
    assert not wrong, f"{pair.id}: {len(wrong)} of {len(selected)} selected tensors differ: {wrong[:10]}"


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
def test_loading_keeps_every_compiled_value(pair: Pair, built: Built) -> None:
    # Tied student tensors (one storage, several keys) keep only the last value loaded: the plan must
    # give them one value.
    loaded = initialized(built).state_dict()
    differ = [key for key, value in built.compiled.state_dict.items() if not torch.equal(loaded[key], value)]
    assert not differ, f"{pair.id}: tied student tensors planned with different values: {differ}"


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
def test_initialized_student_outputs_are_finite(pair: Pair, built: Built) -> None:
    student = initialized(built)
    with torch.no_grad():
        outputs = output_tensors(student(**built.student.make_inputs(BATCH, None)))
    floating = [tensor for tensor in outputs if tensor.is_floating_point()]
    assert floating, f"{pair.id}: no floating-point output"
    assert all(torch.isfinite(tensor).all() for tensor in floating), f"{pair.id}: non-finite outputs"


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
def test_one_training_step_decreases_the_loss(pair: Pair, built: Built) -> None:
    # NOTE: eval mode: dropout would make the two losses incomparable; gradients flow all the same.
    student = initialized(built)
    inputs = built.student.make_inputs(BATCH, None)

    def loss() -> torch.Tensor:
        return F.mse_loss(output_tensors(student(**inputs))[0], target)

    with torch.no_grad():
        shape = output_tensors(student(**inputs))[0].shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(student.parameters(), lr=LEARNING_RATE)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert torch.isfinite(before) and after < before, f"{pair.id}: loss {before.item():.6f} -> {after.item():.6f}"


# ---- per family ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", family_representatives(), ids=_id)
def test_identity_oracle(pair: Pair, places: dict[str, str]) -> None:
    teacher_spec, student_spec = pair.identity_specs()
    # Both sides are fresh random inits (a student spec may not fit a weights directory).
    teacher = load(pair, teacher_spec, places, role="student", seed=0)
    student = load(pair, student_spec, places, role="student", seed=1)
    # Constant inits (LayerNorm weights 1, biases 0, timm/torchvision zero heads) would hide swapped
    # tensors and zero the outputs: give every teacher parameter values of its own.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in teacher.module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=IDENTITY_NOISE)
    teacher_inputs = teacher.make_inputs(BATCH, None)
    student_inputs = dict(zip(student.inputs, teacher_inputs.values(), strict=True))

    def outputs(model: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return output_tensors(model.module(**inputs))[0]

    expected = outputs(teacher, teacher_inputs)
    assert not torch.equal(outputs(student, student_inputs), expected), "the oracle needs two different inits"
    compiled = compile_pair(teacher, student.module, student.inputs, select_head=True)
    assert compiled.plan.coverage.fraction == 1.0, [r.student for r in compiled.plan.tensors if r.teacher is None]
    student.module.load_state_dict(compiled.state_dict)
    torch.testing.assert_close(outputs(student, student_inputs), expected, atol=pair.identity_atol, rtol=0)


class Wrapper(nn.Module):
    """The student one level down, under an attribute name of its own (``forward`` from ``wrap``)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.inner_model = student


def wrap(student: nn.Module, input_names: list[str]) -> Wrapper:
    """``student`` in a ``Wrapper`` whose forward takes the same named inputs and passes them through.

    NOTE: the forward is generated with explicit parameters: torch.fx cannot trace ``**inputs``, and a
    wrapper that only torch.export can trace would test another frontend, not the renaming.
    """
    arguments = ", ".join(f"{name}={name}" for name in input_names)
    namespace: dict[str, object] = {}
    exec(f"def forward(self, {', '.join(input_names)}):\n    return self.{WRAPPED}({arguments})", namespace)
    return type("Wrapper", (Wrapper,), {"forward": namespace["forward"]})(student)


@pytest.mark.parametrize("pair", family_representatives(), ids=_id)
def test_renaming_the_student_changes_no_value(pair: Pair, built: Built) -> None:
    wrapped = wrap(copy.deepcopy(built.student.module), list(built.student.inputs))
    renamed = compile_pair(built.teacher, wrapped, built.student.inputs)
    assert renamed.plan.frontend == built.compiled.plan.frontend
    original = built.compiled.state_dict
    assert set(renamed.state_dict) == {f"{WRAPPED}.{key}" for key in original}
    differ = [key for key, value in original.items() if not torch.equal(renamed.state_dict[f"{WRAPPED}.{key}"], value)]
    assert not differ, f"{pair.id}: renaming the student changed {len(differ)} tensors: {differ[:10]}"


# ---- guards --------------------------------------------------------------------------------------


def test_every_supported_family_has_a_pair() -> None:
    families = {pair.family for pair in PAIRS}
    assert not SUPPORTED_FAMILIES - families, f"supported families without a zoo pair: {SUPPORTED_FAMILIES - families}"
    assert not families - SUPPORTED_FAMILIES, f"zoo pairs of unlisted families: {families - SUPPORTED_FAMILIES}"


def test_every_family_has_identity_and_renaming_oracles() -> None:
    covered = {pair.family for pair in family_representatives()}
    assert covered == SUPPORTED_FAMILIES, f"families without identity/renaming checks: {SUPPORTED_FAMILIES - covered}"


def test_pair_ids_are_unique() -> None:
    ids = [pair.id for pair in PAIRS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
