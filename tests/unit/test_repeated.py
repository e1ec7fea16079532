"""Runs of identical blocks traced once (``frontend.repeated``): the IR must be the whole model's."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from torch import nn

from wscompile import frontend, ir
from wscompile.frontend import repeated


def _hf(config_class: str, model_class: str, **config) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    return model, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}


def _timm(name: str, **kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return model, {"x": torch.empty(1, 3, 32, 32, device="meta")}


class EveryOther(nn.Module):
    """Uses only its even blocks: the cut IR shows blocks 0 and 2 only, so it is traced whole."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:
                x = x + block(x)
        return self.head(x)


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4)
CASES = {
    "timm-vit": (lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=7), True),
    "timm-convnext": (lambda: _timm("convnext_atto"), True),  # stage 2 has 6 blocks, the others 2
    "hf-llama": (
        lambda: _hf("LlamaConfig", "LlamaForCausalLM", num_hidden_layers=7, num_key_value_heads=2, **SMALL),
        True,
    ),
    "hf-bert": (lambda: _hf("BertConfig", "BertModel", num_hidden_layers=6, **SMALL), True),
    "hf-gpt2": (lambda: _hf("GPT2Config", "GPT2LMHeadModel", n_layer=6, n_embd=32, n_head=4, vocab_size=64), True),
    "every-other": (lambda: (EveryOther(), {"x": torch.randn(2, 8)}), False),
}


def _ir(graph) -> tuple:
    nodes = sorted(graph.nodes(data=True))
    edges = sorted((a, b, tuple(sorted(d[ir.ARG]))) for a, b, d in graph.edges(data=True))
    return nodes, edges, graph.graph


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_traced_once_give_the_whole_models_ir(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    build, cut_applies = CASES[case]
    model, inputs = build()
    assert repeated.repeated_runs(model)
    expanded = []
    expand = repeated.expand
    monkeypatch.setattr(repeated, "expand", lambda graph, runs: expanded.append(expand(graph, runs)) or expanded[-1])
    once = frontend.trace(model, inputs)
    whole = frontend.trace(model, inputs, blocks_once=False)
    assert _ir(once) == _ir(whole)
    assert (expanded[0] is not None) == cut_applies  # the cut IR was expanded, or the model traced whole
    assert len(list(model.modules())) == len(list(build()[0].modules()))  # every block is back


def test_runs_need_identical_blocks_of_their_own() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    assert repeated.repeated_runs(model) == [repeated.Run("", 6)]
    model[3] = nn.Linear(4, 4, bias=False)  # one block differs
    assert repeated.repeated_runs(model) == []
    shared = nn.Linear(4, 4)
    assert repeated.repeated_runs(nn.Sequential(*[shared] * 6)) == []  # one module six times: not six blocks


def test_cut_restores_the_blocks_when_tracing_fails() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    runs = repeated.repeated_runs(model)
    with pytest.raises(RuntimeError), repeated.cut([model], runs):
        assert len(model) == repeated.KEEP
        raise RuntimeError("trace failed")
    assert len(model) == 6
