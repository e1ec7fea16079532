"""Layer policies: which ``n_s`` of a teacher stage's ``n_t`` blocks the student's blocks take.

Student block ``i`` of a stage takes teacher block ``L[i]``, with ``L`` ascending::

    first        L = [0, 1, ..., n_s - 1]                          (the paper's best policy)
    uniform      L = uniform_indices(n_t, n_s)                     (spread over depth; DistilBERT
                                                                    took every other layer)
    last         L = [n_t - n_s, ..., n_t - 1]
    drop-middle  L = [0, ..., ceil(n_s/2) - 1] + [n_t - floor(n_s/2), ..., n_t - 1]
                                                                   (weight subcloning: keep the
                                                                    first and last blocks)
    importance   L = the n_s blocks least similar to their input, in order: a block scores
                 cos(x, y) of its input and output on calibration data (calibration.py); the
                 most similar change their input least and are dropped first (ShortGPT's
                 block influence is 1 - cos)
    "0:0,2,4;1:0,1"  an explicit map: student stage index -> teacher block indices (stages left
                 out take first-N)

The policy proposes; ``choose_blocks`` decides. Among the order-preserving maps of student blocks to
teacher blocks with the highest structural score (``align.BlockScores``), the one keeping most of
the policy's picks wins, so the policy chooses among equally good blocks and its pick stands
whenever the structures are equal (the paper's pairs), while a teacher block of another structure,
or one narrower or with a smaller kernel than a later one, gives way.

A stage that opens with an entry block (a downsampling block whose structure differs from the
rest, ``Stage.block_hashes`` has two entries in either model) pins ``L[0] = 0`` under every policy
but first (which does so anyway), and the policy chooses ``n_s - 1`` of the other ``n_t - 1``
blocks. A student stage at least as deep as its teacher takes ``L = [0, ..., n_t - 1]`` whatever
the policy (the extra student blocks have no teacher block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from wscompile.errors import MatchError
from wscompile.indices import uniform_indices

FIRST, UNIFORM, LAST, DROP_MIDDLE, IMPORTANCE, EXPLICIT = (
    "first",
    "uniform",
    "last",
    "drop-middle",
    "importance",
    "explicit",
)
EXPLICIT_FORM = 'an explicit map "STAGE:BLOCK,BLOCK,...;STAGE:..." like "0:0,2,4;1:0,1"'


@dataclass(frozen=True)
class PolicySpec:
    """A layer policy of the registry: a new one is one ``choose`` function and one entry in ``_SPECS``."""

    name: str
    # (n_teacher, n_student, similarity per teacher block) -> the n_student teacher blocks, ascending
    choose: Callable[[int, int, list[float]], list[int]]
    needs_calibration: bool = False  # takes the similarities (calibration data), asked only then


def _first(n_teacher: int, n_student: int, similarity: list[float]) -> list[int]:
    return list(range(n_student))


def _uniform(n_teacher: int, n_student: int, similarity: list[float]) -> list[int]:
    return uniform_indices(n_teacher, n_student)


def _last(n_teacher: int, n_student: int, similarity: list[float]) -> list[int]:
    return list(range(n_teacher - n_student, n_teacher))


def _drop_middle(n_teacher: int, n_student: int, similarity: list[float]) -> list[int]:
    head = (n_student + 1) // 2
    return list(range(head)) + list(range(n_teacher - (n_student - head), n_teacher))


def _importance(n_teacher: int, n_student: int, similarity: list[float]) -> list[int]:
    least_similar = sorted(range(n_teacher), key=lambda i: (similarity[i], i))[:n_student]
    return sorted(least_similar)


_SPECS = (
    PolicySpec(FIRST, _first),
    PolicySpec(UNIFORM, _uniform),
    PolicySpec(LAST, _last),
    PolicySpec(DROP_MIDDLE, _drop_middle),
    PolicySpec(IMPORTANCE, _importance, needs_calibration=True),
)
POLICY_SPECS: dict[str, PolicySpec] = {spec.name: spec for spec in _SPECS}
POLICIES = tuple(POLICY_SPECS)


@dataclass(frozen=True)
class LayerPolicy:
    """A parsed ``--layers`` value."""

    name: str  # one of POLICIES, or EXPLICIT
    text: str  # as given
    explicit: dict[int, list[int]] = field(default_factory=dict, hash=False)  # student stage -> teacher blocks

    @property
    def needs_calibration(self) -> bool:
        return self.name in POLICY_SPECS and POLICY_SPECS[self.name].needs_calibration


def parse_layer_policy(text: str) -> LayerPolicy:
    """Parse ``--layers``: a policy name or an explicit map; raises MatchError on bad input."""
    text = text.strip()
    if text in POLICIES:
        return LayerPolicy(text, text)
    if ":" not in text:
        raise MatchError(f"unknown layer policy {text!r}; use one of {', '.join(POLICIES)} or {EXPLICIT_FORM}")
    explicit: dict[int, list[int]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        stage, _, blocks = entry.partition(":")
        try:
            index = int(stage)
            chosen = [int(b) for b in blocks.split(",")]
        except ValueError:
            raise MatchError(f"bad layer map entry {entry!r} in {text!r}: expected {EXPLICIT_FORM}") from None
        if index < 0 or any(b < 0 for b in chosen):
            raise MatchError(f"bad layer map entry {entry!r} in {text!r}: stage and block indices are >= 0")
        if index in explicit:
            raise MatchError(f"layer map {text!r} names stage {index} twice")
        if chosen != sorted(set(chosen)):
            raise MatchError(
                f"layer map entry {entry!r}: teacher blocks must be distinct and ascending, "
                f"e.g. {index}:{','.join(map(str, sorted(set(chosen))))}"
            )
        explicit[index] = chosen
    return LayerPolicy(EXPLICIT, text, explicit)


def teacher_blocks(
    policy: LayerPolicy,
    stage: int,
    label: str,
    n_teacher: int,
    n_student: int,
    *,
    entry: bool,
    similarity: Callable[[], list[float]],
) -> tuple[str, list[int]]:
    """(policy name recorded for the stage, the teacher block index of each student block).

    ``stage`` is the student stage's index, ``label`` its description (for messages), ``entry``
    whether the stage opens with an entry block, ``similarity`` the teacher blocks' input/output
    similarities (asked only by the importance policy).
    """
    if policy.name == EXPLICIT:
        if stage not in policy.explicit:
            return FIRST, list(range(min(n_teacher, n_student)))
        chosen = policy.explicit[stage]
        if len(chosen) != n_student:
            raise MatchError(
                f"layer map gives {len(chosen)} teacher block(s) for student {label}, which has "
                f"{n_student}; list exactly {n_student}"
            )
        if chosen[-1] >= n_teacher:
            raise MatchError(
                f"layer map names teacher block {chosen[-1]} for student {label}, but its teacher stage "
                f"has {n_teacher} blocks (0..{n_teacher - 1})"
            )
        if entry and chosen[0] != 0:
            raise MatchError(
                f"student {label} opens with an entry block (a downsample, unlike the blocks after it): "
                f"it must take teacher block 0; start the map with {stage}:0,..."
            )
        return EXPLICIT, chosen
    if n_student >= n_teacher:
        return policy.name, list(range(n_teacher))
    spec = POLICY_SPECS[policy.name]
    scores = similarity() if spec.needs_calibration else [0.0] * n_teacher
    if entry:
        rest = spec.choose(n_teacher - 1, n_student - 1, scores[1:]) if n_student > 1 else []
        return policy.name, [0] + [1 + i for i in rest]
    return policy.name, spec.choose(n_teacher, n_student, scores)


def choose_blocks(scores: list[list[float]], preferred: list[int] | None = None) -> tuple[float, list[int | None]]:
    """The order-preserving map of student blocks to teacher blocks with the highest summed score.

    ``scores[i][j]`` scores student block ``i`` against teacher block ``j`` (0: they cannot pair).
    Among maps of equal score the one agreeing with ``preferred`` (the layer policy's choice,
    ``preferred[i]`` for student block ``i``; default first-N) on the most blocks wins, then the one
    taking earlier teacher blocks, so a policy's choice stands whenever it is as good as any.

    Returns:
        (the summed score, the teacher block index of each student block or None).
    """
    n_student = len(scores)
    n_teacher = len(scores[0]) if scores else 0
    if preferred is None:
        preferred = list(range(min(n_teacher, n_student)))
    wanted = [preferred[i] if i < len(preferred) else None for i in range(n_student)]
    # best[i][j]: (score, -disagreements) of the best map of student blocks i.. onto teacher blocks j..
    best = [[(0.0, 0)] * (n_teacher + 1) for _ in range(n_student + 1)]
    for i in range(n_student - 1, -1, -1):
        best[i][n_teacher] = (best[i + 1][n_teacher][0], best[i + 1][n_teacher][1] - (wanted[i] is not None))
        for j in range(n_teacher - 1, -1, -1):
            best[i][j] = max(_options(scores, wanted, best, i, j))[0]
    chosen: list[int | None] = []
    i = j = 0
    while i < n_student:
        if j == n_teacher:
            chosen.append(None)
            i += 1
            continue
        _, move = max(_options(scores, wanted, best, i, j))
        if move == 2:
            chosen.append(j)
            i, j = i + 1, j + 1
        elif move == 1:
            j += 1
        else:
            chosen.append(None)
            i += 1
    return best[0][0][0], chosen


def _options(
    scores: list[list[float]], wanted: list[int | None], best: list[list[tuple[float, int]]], i: int, j: int
) -> list[tuple[tuple[float, int], int]]:
    """The three moves at (student i, teacher j) with their values; equal values prefer pairing (2),
    then skipping the teacher block (1), then leaving the student block without one (0)."""
    options = [((best[i + 1][j][0], best[i + 1][j][1] - (wanted[i] is not None)), 0), (best[i][j + 1], 1)]
    if scores[i][j] > 0:
        options.append(((scores[i][j] + best[i + 1][j + 1][0], best[i + 1][j + 1][1] - (wanted[i] != j)), 2))
    return options
