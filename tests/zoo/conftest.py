"""Zoo fixtures: the HF config directories, and one pair's checks run back to back."""

from __future__ import annotations

import pytest
import torch

from .registry import PAIRS, ZOO_DIR, write_hf_configs


@pytest.fixture(scope="session")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Placeholders of the registry's specs: small HF config directories, the zoo directory, MiniLM."""
    return write_hf_configs(tmp_path_factory.mktemp("hf-configs"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The zoo's models are small: one intra-op thread is faster than two, most of all on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group zoo tests by pair (stable: check order kept), so each pair is built and compiled once."""
    order = {pair.id: rank for rank, pair in enumerate(PAIRS)}
    positions = [i for i, item in enumerate(items) if item.path.is_relative_to(ZOO_DIR) and _pair_id(item) in order]
    grouped = sorted((items[i] for i in positions), key=lambda item: order[_pair_id(item)])
    for position, item in zip(positions, grouped, strict=True):
        items[position] = item


def _pair_id(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    pair = callspec.params.get("pair") if callspec else None
    return getattr(pair, "id", None)
