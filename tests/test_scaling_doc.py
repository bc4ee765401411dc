"""docs/scaling.md quotes the cost model's own output (benchmarks/scaling_cost_model.py), and the model's parameter
arithmetic is right: it counts exactly the parameters transformers builds for tiny Llama and DeepSeek-V3
configurations, and reproduces the totals the model authors publish for the full shapes."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = runpy.run_path(str(REPO / "benchmarks" / "scaling_cost_model.py"))


def test_the_document_quotes_every_table_of_the_cost_model():
    document = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    for table in MODEL["document_tables"]():
        assert table in document, table.splitlines()[0]


def test_the_published_totals_are_reproduced():
    llama, deepseek = MODEL["LLAMA3_70B"], MODEL["DEEPSEEK_V3"]
    assert round(llama.totals()[0] / 1e9, 1) == 70.6  # Meta: 70.6B
    assert round(deepseek.totals()[0] / 1e9) == 671  # DeepSeek: 671B in the main model
    assert round(deepseek.matmul_params / 1e9, 1) == 36.6  # DeepSeek: 36.6B activated, the 0.9B output head included


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_parameter_counts_match_the_models_transformers_builds(family):
    import torch
    import transformers

    Shape, Moe, Mla = MODEL["Shape"], MODEL["Moe"], MODEL["Mla"]
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, intermediate_size=96, tie_word_embeddings=False)
        shape = Shape("tiny llama", layers=2, hidden=64, vocab=100, heads=4, kv_heads=2, qk_head_dim=16, v_head_dim=16, intermediate=96,
                      tied=False)
        build = transformers.LlamaForCausalLM
    else:
        config = transformers.DeepseekV3Config(hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                                               n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16, q_lora_rank=32,
                                               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_attention_heads=4,
                                               num_key_value_heads=4, vocab_size=100, intermediate_size=96, tie_word_embeddings=False,
                                               n_group=1, topk_group=1)
        shape = Shape("tiny deepseek", layers=3, hidden=64, vocab=100, heads=4, kv_heads=4, qk_head_dim=12, v_head_dim=8, intermediate=96,
                      tied=False, moe=Moe(first_dense=1, routed=8, shared=1, active=2, expert_intermediate=16), mla=Mla(q_rank=32, kv_rank=16, rope_dim=4))
        build = transformers.DeepseekV3ForCausalLM
    with torch.device("meta"):
        model = build(config)
    assert shape.totals()[0] == sum(p.numel() for p in model.parameters())
