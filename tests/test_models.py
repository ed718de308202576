"""rpo.models: megatron-core GPTModel from HF configs, checkpoints both ways, CPU redirects, chunked log-probs.

References are independent: Hugging Face transformers' LlamaForCausalLM / MistralForCausalLM (float32, eager
attention) for log-probs, and plain PyTorch (clip_grad_norm_ + SGD on the HF model) for optimizer steps. The
distributed checks run in one torchrun launch of tests/model_workers.py (2 processes, gloo) shared by a
module-scoped fixture; every assertion is made here.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 300  # not a multiple of 128: padding to 384 (TP=1) / 512 (TP=2) is exercised
ROWS, LENGTH = 6, 14
SLIDING_WINDOW = 4  # smaller than LENGTH, so the window changes Mistral's log-probs


# ----------------------------------------------------------------------------------------------------------------
# Tiny HF models, tokenizer and batch.

def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    if kind == "llama":  # untied, non-default θ and ε
        return LlamaConfig(rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
    return MistralConfig(rope_theta=20000.0, rms_norm_eps=1e-6, sliding_window=SLIDING_WINDOW,
                         tie_word_embeddings=True, **common)


def tiny_hf_model(kind: str, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight changes the output
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_batch(seed: int = 0):
    """Right-padded rows of different lengths (plus one left-padded row), responses after a prompt."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (ROWS, LENGTH), generator=g)
    lengths = [14, 11, 9, 14, 12, 7]
    prompt = [5, 3, 4, 6, 2, 3]
    attention_mask = torch.zeros(ROWS, LENGTH, dtype=torch.long)
    loss_mask = torch.zeros(ROWS, LENGTH, dtype=torch.bool)
    for r in range(ROWS):
        attention_mask[r, :lengths[r]] = 1
        loss_mask[r, prompt[r]:lengths[r]] = True
    # Row 3 left-padded by 2 (its positions shift, as in HF's forward without position_ids).
    attention_mask[3, :2] = 0
    loss_mask[3, :prompt[3]] = False
    input_ids[attention_mask == 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def hf_token_logprobs(model, batch) -> torch.Tensor:
    """log p(input_ids[r, t] | input_ids[r, <t]) from HF logits, 0 outside loss_mask; [R, T]."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    logp = torch.cat([torch.zeros(logp.shape[0], 1, dtype=logp.dtype), logp], dim=1)
    return (logp * batch["loss_mask"]).float()


def hf_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])
    mask = batch["loss_mask"][:, 1:]
    sums = (logp.squeeze(-1) * mask).sum(1)
    return -(sums / mask.sum(1)).mean()


def hf_sgd_reference(model, batch, lr: float, clip: float):
    """(state after one clipped SGD step, gradient norm before clipping), plain PyTorch on the HF model."""
    model = copy.deepcopy(model)
    model.zero_grad()
    hf_loss(model, batch).backward()
    params = [p for p in model.parameters()]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(norm)


def read_safetensors_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The shared torchrun launch.

@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    import model_workers

    workdir = tmp_path_factory.mktemp("megatron")
    tokenizer = tiny_tokenizer()
    batch = tiny_batch()
    models = {"llama": tiny_hf_model("llama", 1), "mistral": tiny_hf_model("mistral", 2)}
    for kind, model in models.items():
        model.save_pretrained(workdir / kind)
        tokenizer.save_pretrained(workdir / kind)
    torch.save(batch, workdir / "batch.pt")
    # Clip at half the gradient norm so megatron's clipping path really runs; bf16 step large enough to be seen.
    _, norm = hf_sgd_reference(models["llama"], batch, lr=0.0, clip=0.0)
    grads = copy.deepcopy(models["llama"])
    hf_loss(grads, batch).backward()
    max_grad = max(p.grad.abs().max().item() for p in grads.parameters())
    spec = {"lr": 0.05, "clip": 0.5 * norm, "lr_bf16": 0.05 / max_grad, "chunk_size": 5}
    (workdir / "spec.json").write_text(json.dumps(spec))

    start = time.time()
    proc = model_workers.launch(workdir)
    elapsed = time.time() - start
    if proc.returncode != 0:
        pytest.fail(f"torchrun workers failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = [torch.load(workdir / f"results-rank{r}.pt", weights_only=False) for r in range(2)]
    return {"workdir": workdir, "models": models, "batch": batch, "spec": spec, "results": results,
            "tokenizer": tokenizer, "elapsed": elapsed}


def _tp1_token_logprobs(results, key):
    merged = torch.zeros(ROWS, LENGTH)
    for res in results:
        merged[res["tp1/rows"]] = res[key]
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Log-probs against Hugging Face.

@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logprobs_match_hf_tp1_and_tp2(dist_run, kind):
    reference = hf_token_logprobs(dist_run["models"][kind], dist_run["batch"])
    assert reference[dist_run["batch"]["loss_mask"]].std() > 0.5  # the reference is not near-uniform
    for res in dist_run["results"]:  # TP=2: both ranks of the TP group hold the same result
        torch.testing.assert_close(res[f"tp2/{kind}/token_logprobs"], reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(res[f"tp2/{kind}/sums"], reference.sum(1), atol=1e-5, rtol=1e-6)
        assert torch.equal(res[f"tp2/{kind}/counts"], dist_run["batch"]["loss_mask"].sum(1))
    torch.testing.assert_close(_tp1_token_logprobs(dist_run["results"], f"tp1/{kind}/token_logprobs"), reference,
                               atol=1e-5, rtol=0)


def test_sliding_window_matters():
    """Mistral's window is smaller than the sequence: without it HF gives different log-probs (else the Mistral
    comparison above would not test the window)."""
    model = tiny_hf_model("mistral", 2)
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = None
    for layer in unwindowed.model.layers:
        layer.self_attn.sliding_window = None
    batch = tiny_batch()
    diff = (hf_token_logprobs(model, batch) - hf_token_logprobs(unwindowed, batch)).abs().max()
    assert diff > 1e-2


def test_chunked_equals_full_logits_values_and_grads(dist_run):
    for res in dist_run["results"]:
        for kind in ("llama", "mistral"):
            torch.testing.assert_close(res[f"tp2/{kind}/token_logprobs"], res[f"tp2/{kind}/full_token_logprobs"],
                                       atol=1e-6, rtol=0)
            chunked, full = res[f"tp2/{kind}/grads_chunked"], res[f"tp2/{kind}/grads_full"]
            assert chunked.keys() == full.keys() and len(chunked) > 0
            for name in chunked:
                torch.testing.assert_close(chunked[name], full[name], atol=1e-5, rtol=1e-5, msg=name)


def test_chunked_logprobs_peak_memory(dist_run):
    """Chunk c: no vocabulary-sized tensor larger than c × padded_vocab/TP is ever made, and none is kept from
    forward to backward (chunks are recomputed); unchunked, one spans all n response tokens."""
    res = dist_run["results"][0]
    width, chunk, n = res["mem/padded_vocab_per_rank"], res["mem/chunk_size"], res["mem/response_tokens"]
    assert width == 256  # 300 padded to 512, over 2 ranks
    largest, kept = res["mem/chunked"]
    assert 0 < largest <= chunk * width and kept == 0
    largest, kept = res["mem/unchunked"]
    assert largest >= n * width > chunk * width and kept == 0


def test_bf16_logprobs_close_to_fp32(dist_run):
    reference = hf_token_logprobs(dist_run["models"]["llama"], dist_run["batch"])
    assert all(res["bf16/param_dtype"] == "torch.bfloat16" for res in dist_run["results"])
    bf16 = _tp1_token_logprobs(dist_run["results"], "bf16/token_logprobs")
    err = (bf16 - reference).abs().max()
    assert 0 < err < 0.15  # bf16 rounding, not a mapping error (those give errors of order 1)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.

@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_hf_megatron_tp2_hf_round_trip_bit_exact(dist_run, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = dist_run["workdir"]
    original = dist_run["models"][kind].state_dict()
    exported = read_safetensors_folder(workdir / f"export-tp2-{kind}")
    expected_keys = set(original) - ({"lm_head.weight"} if kind == "mistral" else set())  # tied: not stored
    assert set(exported) == expected_keys
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    reloaded = AutoModelForCausalLM.from_pretrained(workdir / f"export-tp2-{kind}", attn_implementation="eager")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    tokenizer = AutoTokenizer.from_pretrained(workdir / f"export-tp2-{kind}")
    assert tokenizer("w5 w17 w299")["input_ids"] == dist_run["tokenizer"]("w5 w17 w299")["input_ids"] == [5, 17, 299]


def test_dist_checkpoint_tp2_loads_at_tp1(dist_run):
    reference = hf_token_logprobs(dist_run["models"]["llama"], dist_run["batch"])
    torch.testing.assert_close(_tp1_token_logprobs(dist_run["results"], "ckpt_tp1/token_logprobs"), reference,
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Training-side redirects: DDP, megatron optimizers, clipping, the no-pipelining schedule.

@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_megatron_sgd_step_matches_pytorch(dist_run, layout):
    """DDP + megatron SGD (clipping active) after one step equals clip_grad_norm_ + SGD on the HF model."""
    spec = dist_run["spec"]
    expected, norm = hf_sgd_reference(dist_run["models"]["llama"], dist_run["batch"], spec["lr"], spec["clip"])
    for res in dist_run["results"]:
        assert res[f"sgd_{layout}/ok"]
        assert abs(res[f"sgd_{layout}/grad_norm"] - norm) <= 1e-5 * norm
        assert norm > spec["clip"]  # clipping happened
    stepped = read_safetensors_folder(dist_run["workdir"] / f"export-sgd-{layout}")
    original = dist_run["models"]["llama"].state_dict()
    moved = 0.0
    for name, tensor in stepped.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)
        moved = max(moved, (tensor - original[name]).abs().max().item())
    assert moved > 1e-3  # the step was large enough for the comparison to mean something


def test_bf16_float16_optimizer_step(dist_run):
    """bf16 params with megatron's Float16OptimizerWithFloat16Params (built on CPU via the type-name redirect):
    the update follows the fp32 PyTorch reference step."""
    spec = dist_run["spec"]
    assert all(res["bf16/optimizer"] == "Float16OptimizerWithFloat16Params" for res in dist_run["results"])
    model = dist_run["models"]["llama"]
    expected, _ = hf_sgd_reference(model, dist_run["batch"], spec["lr_bf16"], 0.0)
    stepped = read_safetensors_folder(dist_run["workdir"] / "export-sgd-bf16")
    original = model.state_dict()
    got = torch.cat([(stepped[n].float() - original[n]).flatten() for n in stepped])
    want = torch.cat([(expected[n] - original[n]).flatten() for n in stepped])
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=0)
    assert all(t.dtype == torch.bfloat16 for t in stepped.values())
    assert cosine > 0.95 and 0.8 < got.norm() / want.norm() < 1.25


def test_distributed_optimizer_builds_on_cpu(dist_run):
    assert all(res["distopt/class"] == "DistributedOptimizer" for res in dist_run["results"])


def test_reference_model_is_frozen_copy(dist_run):
    for res in dist_run["results"]:
        assert res["ref/params_equal"] and not res["ref/policy_params_share_storage"]
        assert not res["ref/requires_grad"] and not res["ref/training"]
        assert res["ref/logprob_max_diff"] == 0.0


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

    from rpo.models.gpt import rope_settings, transformer_config_from_hf

    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        transformer_config_from_hf(tiny_config("llama"), tp_size=4)
    with pytest.raises(ValueError, match="hidden_act"):
        transformer_config_from_hf(LlamaConfig(hidden_act="gelu"), tp_size=1)
    with pytest.raises(ValueError, match="attention_bias"):
        transformer_config_from_hf(LlamaConfig(attention_bias=True), tp_size=1)
    llama3 = LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    assert rope_settings(llama3) == {"rotary_base": 500000.0, "rope_scaling": True, "rope_scaling_factor": 32.0}
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        rope_settings(LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))


def test_transformer_config_takes_eps_theta_groups_window_from_hf():
    from rpo.models.gpt import rope_settings, transformer_config_from_hf

    llama, mistral = tiny_config("llama"), tiny_config("mistral")
    tc = transformer_config_from_hf(llama, tp_size=1)
    assert tc.layernorm_epsilon == 1e-5 and tc.num_query_groups == 2 and tc.kv_channels == 16
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.window_size is None
    assert rope_settings(llama)["rotary_base"] == 5000.0 and rope_settings(mistral)["rotary_base"] == 20000.0
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


# ----------------------------------------------------------------------------------------------------------------
# cpu_compat: each redirect, in this process (megatron-core imported here, CUDA absent).

@pytest.fixture(scope="module")
def compat():
    from rpo.models import cpu_compat

    if torch.cuda.is_available():
        pytest.skip("cpu_compat only redirects when CUDA is absent")
    assert cpu_compat.apply()
    return cpu_compat


def test_cpu_compat_is_idempotent_and_only_without_cuda(compat, monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    before = compat.patched_modules()
    init = distrib_optimizer.DistributedOptimizer.__init__
    assert compat.apply() and compat.patched_modules() == before
    assert distrib_optimizer.DistributedOptimizer.__init__ is init
    assert "megatron.core.tensor_parallel.random" in before and "megatron.core.utils" in before
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.apply() is False


def test_torch_stand_in_allocates_on_cpu(compat):
    stand_in = compat.TORCH_ON_CPU
    assert stand_in.zeros(3, device="cuda").device.type == "cpu"
    assert stand_in.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert stand_in.empty(2, device=stand_in.cuda.current_device()).device.type == "cpu"
    assert stand_in.cuda.current_device() == "cpu"
    stream = stand_in.cuda.current_stream()
    stream.wait_stream(stand_in.cuda.default_stream())
    with stand_in.cuda.stream(stand_in.cuda.Stream()):
        stand_in.cuda.synchronize()
    assert stand_in.nn is torch.nn and stand_in.float32 is torch.float32


def test_causal_masks_built_on_cpu(compat):
    # transformer.utils.get_default_causal_mask / get_sliding_window_causal_mask use device="cuda".
    from megatron.core.transformer.utils import get_default_causal_mask, get_sliding_window_causal_mask

    causal = get_default_causal_mask(5)
    assert causal.device.type == "cpu" and torch.equal(causal, torch.ones(5, 5).triu(1).bool())
    window = get_sliding_window_causal_mask(5, 5, (1, 0))  # query sees itself and one token before
    q, k = torch.arange(5)[:, None], torch.arange(5)[None, :]
    assert torch.equal(window, ~((k <= q) & (k >= q - 1)))


def test_global_memory_buffer_and_l2_norm_on_cpu(compat):
    # utils.GlobalMemoryBuffer.get_tensor (attention scores) and local_multi_tensor_l2_norm (grad norm).
    from megatron.core.utils import GlobalMemoryBuffer, local_multi_tensor_l2_norm

    buf = GlobalMemoryBuffer().get_tensor((2, 3, 4), torch.float32, "mpu")
    assert buf.device.type == "cpu" and buf.shape == (2, 3, 4)
    tensors = [torch.randn(5), torch.randn(2, 3)]
    norm, _ = local_multi_tensor_l2_norm(0, None, [tensors], False)
    expected = torch.cat([t.flatten() for t in tensors]).double().norm()
    assert norm.device.type == "cpu" and abs(norm.item() - expected.item()) < 1e-5


def test_rng_tracker_forks_the_cpu_generator(compat):
    # tensor_parallel.random: CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed.
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.CudaRNGStatesTracker()
    torch.manual_seed(7)
    tracker.add("stream", 123)
    outside_before = torch.rand(3)
    with tracker.fork("stream"):
        inside = torch.rand(4)
    outside_after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), outside_before) and torch.equal(torch.rand(3), outside_after)
    assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    with tracker.fork("stream"):  # the forked stream continues where it stopped
        assert torch.equal(torch.rand(2), torch.rand(6, generator=torch.Generator().manual_seed(123))[4:])


def test_model_parallel_seed_seeds_cpu_generator(compat):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(11, tp_rank=0, ep_rank=0, etp_rank=0)
    drawn = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(drawn, torch.rand(3))
    with tensor_parallel.get_cuda_rng_tracker().fork():  # "model-parallel-rng": seed + 2718 + tp_rank
        mp = torch.rand(3)
    assert torch.equal(mp, torch.rand(3, generator=torch.Generator().manual_seed(11 + 2718)))


def test_cuda_type_names_and_clip_grads(compat):
    # Float16Optimizer / DistributedOptimizer classify params by type(); clip_grad_by_total_norm_fp32 asserts it.
    from megatron.core.optimizer import clip_grads, optimizer

    x = torch.zeros(2)
    with compat.cuda_type_names():
        assert x.type() == "torch.cuda.FloatTensor" and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert x.type(torch.float64).dtype == torch.float64
    assert x.type() == "torch.FloatTensor"
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    grads = [torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 0.0])]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    assert torch.allclose(params[0].grad, grads[0] / (5.0 + 1e-6))


# ----------------------------------------------------------------------------------------------------------------
# The embedded default model (GGUF → safetensors once). Measured: ~60-90 s on 2 busy cores (dequantise + write +
# reload + a megatron forward), hence slow.

@pytest.mark.slow
def test_default_model_converted_once_and_loadable(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpo.models import default_model
    from rpo.models import init_parallel, load_policy, sequence_logprobs, teardown

    monkeypatch.setenv("RPO_CACHE_DIR", str(tmp_path))
    start = time.time()
    path = default_model.default_model_path()
    print(f"GGUF conversion took {time.time() - start:.1f} s")
    assert path == tmp_path / "models" / default_model.MODEL_NAME
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model.default_model_path() == path  # cached: not converted again
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text + "4", return_tensors="pt")["input_ids"]
    gguf_model = AutoModelForCausalLM.from_pretrained(str(default_model.gguf_path().parent),
                                                      gguf_file=default_model.GGUF_FILE, dtype=torch.float32)
    for name, tensor in gguf_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1).float()

    # The same folder through megatron-core (TP=1): the last 3 tokens scored equal HF's.
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "loss_mask": torch.zeros_like(ids, dtype=torch.bool)}
    batch["loss_mask"][0, -3:] = True
    try:
        init_parallel(1)
        megatron_model, _, _ = load_policy(path, tp_size=1)
        with torch.no_grad():
            out = sequence_logprobs(megatron_model, batch)
    finally:
        teardown()
    torch.testing.assert_close(out.token_logprobs[0, -3:], reference[-3:], atol=1e-4, rtol=0)
