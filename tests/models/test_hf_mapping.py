"""rpo.models without processes: the HF ↔ megatron weight mapping, configs, attention masks, batch checks."""
from __future__ import annotations

import pytest
import torch

from tiny_hf_models import LENGTH, ROWS, SLIDING_WINDOW, VOCAB, tiny_batch, tiny_config, tiny_hf_model

# ----------------------------------------------------------------------------------------------------------------
# The HF ↔ megatron mapping as pure functions (no processes): any TP size, bit-exact, and the fused layouts.

@pytest.mark.parametrize("kind,tp_size", [("llama", 1), ("llama", 2), ("mistral", 2), ("llama4", 4)])
def test_mapping_round_trip_any_tp(kind, tp_size):
    from transformers import LlamaConfig

    from rpo.models.gpt import padded_vocab_size
    from rpo.models.hf_checkpoint import Layout, hf_to_megatron_state, megatron_to_hf_state

    if kind == "llama4":  # 8 heads in 4 KV groups, so TP=4 divides both
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=4)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_config(config).state_dict()
    else:
        config = tiny_config(kind)
        state = tiny_hf_model(kind, 3).state_dict()
    layout = Layout.from_hf(config, padded_vocab_size(VOCAB, tp_size))
    shards = [hf_to_megatron_state(state, layout, rank, tp_size) for rank in range(tp_size)]
    back = megatron_to_hf_state(shards, layout)
    expected = {k: v for k, v in state.items() if not (layout.tied and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name in expected:
        assert torch.equal(back[name], expected[name]), name


def test_fused_layouts_per_rank():
    """QKV: rank r holds whole KV groups, each as [its query heads; key; value]. fc1: rank r holds
    [gate rows of r; up rows of r]. Checked against an explicit construction."""
    from rpo.models.gpt import padded_vocab_size
    from rpo.models.hf_checkpoint import Layout, hf_to_megatron_state

    config = tiny_config("llama")
    state = tiny_hf_model("llama", 4).state_dict()
    layout = Layout.from_hf(config, padded_vocab_size(VOCAB, 2))
    d, per_group = 16, 2  # head_dim, query heads per group
    q = state["model.layers.0.self_attn.q_proj.weight"]
    k = state["model.layers.0.self_attn.k_proj.weight"]
    v = state["model.layers.0.self_attn.v_proj.weight"]
    gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    for rank in range(2):  # 2 groups over 2 ranks: group g = rank
        shard = hf_to_megatron_state(state, layout, rank, 2)
        g = rank
        expected_qkv = torch.cat([q[g * per_group * d:(g + 1) * per_group * d], k[g * d:(g + 1) * d],
                                  v[g * d:(g + 1) * d]])
        assert torch.equal(shard["decoder.layers.0.self_attention.linear_qkv.weight"], expected_qkv)
        rows = slice(rank * 48, (rank + 1) * 48)
        assert torch.equal(shard["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[rows], up[rows]]))
        emb = shard["embedding.word_embeddings.weight"]
        assert emb.shape == (256, 64)
        if rank == 1:  # rows 256..299 real, 300..511 zero padding
            assert torch.equal(emb[:44], state["model.embed_tokens.weight"][256:]) and not emb[44:].any()


def test_mapping_rejects_wrong_shapes():
    from rpo.models.gpt import padded_vocab_size
    from rpo.models.hf_checkpoint import Layout, hf_to_megatron_state

    state = tiny_hf_model("llama", 3).state_dict()
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    layout = Layout.from_hf(tiny_config("llama"), padded_vocab_size(VOCAB, 1))
    with pytest.raises(ValueError, match="k_proj.weight has shape"):
        hf_to_megatron_state(state, layout, 0, 1)
    state = tiny_hf_model("llama", 3).state_dict()
    del state["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        hf_to_megatron_state(state, layout, 0, 1)


def test_padded_vocab_size():
    from rpo.models.gpt import padded_vocab_size

    assert padded_vocab_size(300, 1) == 384
    assert padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(49152, 1) == 49152 and padded_vocab_size(49152, 4) == 49152
    assert padded_vocab_size(32000, 8, divisible_by=64) == 32256
    with pytest.raises(ValueError):
        padded_vocab_size(0, 1)


def test_config_errors_name_the_option():
    from transformers import LlamaConfig

    from rpo.models.gpt import transformer_config_from_hf

    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        transformer_config_from_hf(tiny_config("llama"), tp_size=4)
    with pytest.raises(ValueError, match="hidden_act"):
        transformer_config_from_hf(LlamaConfig(hidden_act="gelu"), tp_size=1)
    with pytest.raises(ValueError, match="attention_bias"):
        transformer_config_from_hf(LlamaConfig(attention_bias=True), tp_size=1)
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        transformer_config_from_hf(LlamaConfig(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                                "short_factor": [1.0] * 64, "long_factor": [1.0] * 64,
                                                                "original_max_position_embeddings": 2048}), tp_size=1)


def test_rope_frequencies_are_transformers_own():
    """Every RoPE type rpo accepts uses transformers' inverse frequencies (bit for bit) and attention factor;
    llama3 with non-default low/high frequency factors too (megatron-core's own llama3 scaling fixes them)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rpo.models.architectures import architecture

    configs = [
        LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                     "original_max_position_embeddings": 4096}),
        LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
        LlamaConfig(max_position_embeddings=131072, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6,
                                                                     "factor": 4.0,
                                                                     "original_max_position_embeddings": 32768}),
    ]
    for config in configs:
        rope = architecture(config).rope["full_attention"]
        hf = LlamaRotaryEmbedding(config)
        assert torch.equal(rope.inv_freq, hf.inv_freq), rope.rope_type
        assert rope.attention_scaling == hf.attention_scaling
    assert architecture(configs[3]).rope["full_attention"].attention_scaling == pytest.approx(0.1 * 1.3862944 + 1)


def test_transformer_config_takes_eps_theta_groups_window_from_hf():
    from rpo.models.architectures import architecture
    from rpo.models.gpt import transformer_config_from_hf

    llama, mistral = tiny_config("llama"), tiny_config("mistral")
    tc = transformer_config_from_hf(llama, tp_size=1)
    assert tc.layernorm_epsilon == 1e-5 and tc.num_query_groups == 2 and tc.kv_channels == 16
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.window_size is None
    assert architecture(llama).layer_rope(0).theta == 5000.0
    assert architecture(mistral).layer_rope(1).theta == 20000.0
    assert transformer_config_from_hf(mistral, tp_size=1).layernorm_epsilon == 1e-6
    # With TE the window goes in the config: HF's W counts the query itself, megatron's left size does not.
    assert transformer_config_from_hf(mistral, tp_size=1, use_te=True).window_size == (SLIDING_WINDOW - 1, 0)


# ----------------------------------------------------------------------------------------------------------------
# Attention mask, batch validation, concatenation.

def test_attention_mask_matches_explicit_rule():
    from rpo.models.gpt import attention_mask_for, is_right_padded

    batch = tiny_batch()
    for window in (None, 3):
        mask = attention_mask_for(batch["attention_mask"], window)
        assert mask.shape == (ROWS, 1, LENGTH, LENGTH) and mask.dtype == torch.bool
        for r in range(ROWS):
            for q in range(LENGTH):
                for k in range(LENGTH):
                    allowed = k <= q and bool(batch["attention_mask"][r, k]) and (window is None or k > q - window)
                    assert bool(mask[r, 0, q, k]) == (not allowed)
    assert is_right_padded(batch["attention_mask"]).tolist() == [True, True, True, False, True, True]


def test_validate_batch_errors_name_rows_and_fields():
    from rpo.models.logprobs import validate_batch

    good = tiny_batch()
    ids, am, lm = validate_batch(good, VOCAB)
    assert torch.equal(ids[am.bool()], good["input_ids"][good["attention_mask"].bool()]) and (ids[am == 0] == 0).all()
    with pytest.raises(KeyError, match="loss_mask"):
        validate_batch({k: v for k, v in good.items() if k != "loss_mask"}, VOCAB)
    bad = dict(good, loss_mask=good["loss_mask"].long())
    with pytest.raises(ValueError, match="loss_mask'] must be a bool"):
        validate_batch(bad, VOCAB)
    lm = good["loss_mask"].clone()
    lm[4, 0] = True
    with pytest.raises(ValueError, match=r"rows \[4\]: the first token"):
        validate_batch(dict(good, loss_mask=lm), VOCAB)
    lm = good["loss_mask"].clone()
    lm[2, 12] = True  # row 2 has 9 real tokens
    with pytest.raises(ValueError, match=r"padding .* rows \[2\]"):
        validate_batch(dict(good, loss_mask=lm), VOCAB)
    ids = good["input_ids"].clone()
    ids[5, 1] = VOCAB
    with pytest.raises(ValueError, match=r"outside \[0, 300\) .* rows \[5\]"):
        validate_batch(dict(good, input_ids=ids), VOCAB)
    with pytest.raises(ValueError, match="same shape"):
        validate_batch(dict(good, attention_mask=good["attention_mask"][:, :-1]), VOCAB)


def test_concat_batches_right_pads_and_stacks():
    from rpo.models.logprobs import concat_batches

    a = {k: v[:2, :10] for k, v in tiny_batch().items()}
    b = {k: v[2:5] for k, v in tiny_batch().items()}
    out = concat_batches(a, b, pad_token_id=1)
    assert out["input_ids"].shape == (5, LENGTH) and out["loss_mask"].dtype == torch.bool
    assert torch.equal(out["input_ids"][:2, :10], a["input_ids"]) and (out["input_ids"][:2, 10:] == 1).all()
    assert not out["attention_mask"][:2, 10:].any() and not out["loss_mask"][:2, 10:].any()
    assert torch.equal(out["loss_mask"][2:], b["loss_mask"])


def test_recompute_modes_set_megatrons_own_fields():
    from rpo.models.gpt import RECOMPUTE_MODES, transformer_config_from_hf

    llama = tiny_config("llama")
    configs = {mode: transformer_config_from_hf(llama, tp_size=1, recompute=mode) for mode in RECOMPUTE_MODES}
    assert configs["none"].recompute_granularity is None
    selective = configs["selective"]
    assert selective.recompute_granularity == "selective" and selective.recompute_modules == ["core_attn"]
    assert selective.recompute_method is None and selective.recompute_num_layers is None
    full = configs["full"]
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    with pytest.raises(ValueError, match=r"recompute 'partial' is not one of \('none', 'selective', 'full'\)"):
        transformer_config_from_hf(llama, tp_size=1, recompute="partial")
