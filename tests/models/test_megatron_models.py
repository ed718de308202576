"""rpo.models through megatron-core on 2 ranks: log-probs, checkpoints and optimizer steps against Hugging Face.

References are independent: Hugging Face transformers' LlamaForCausalLM / MistralForCausalLM (float32, eager
attention) for log-probs, and plain PyTorch (clip_grad_norm_ + SGD on the HF model) for optimizer steps. The
distributed checks run in one 2-rank launch (tests/multirank.py) of megatron_model_workers.py (gloo) shared by a
module-scoped fixture; every assertion is made here.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

import multirank
from tiny_hf_models import (
    LENGTH, ROWS, hf_loss, hf_sgd_reference, hf_token_logprobs, read_safetensors_folder, tiny_batch, tiny_hf_model,
    tiny_tokenizer,
)

WORKERS = Path(__file__).with_name("megatron_model_workers.py")

# ----------------------------------------------------------------------------------------------------------------
# The shared 2-rank launch.

@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
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
    # pack_length 24 > LENGTH: sequences share packed rows (65 tokens in 6 rows of 14 -> 3 rows of ≤ 24).
    spec = {"lr": 0.05, "clip": 0.5 * norm, "lr_bf16": 0.05 / max_grad, "chunk_size": 5, "pack_length": 24}
    (workdir / "spec.json").write_text(json.dumps(spec))

    start = time.time()
    multirank.launch(WORKERS, 2, args=[workdir], log_dir=workdir / "logs").check()
    elapsed = time.time() - start
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
# Sequence packing and activation recomputation (issue 13's model-level pieces).

@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_packed_logprobs_equal_unpacked_and_hf(dist_run, kind, tp):
    """Packed rows (block-diagonal causal mask; Mistral's window 4 < 14 tokens) give every sequence the log-probs
    and gradients it has unpacked, and HF's."""
    reference = hf_token_logprobs(dist_run["models"][kind], dist_run["batch"])
    counts = dist_run["batch"]["loss_mask"].sum(1)
    for res in dist_run["results"]:
        prefix = f"tp{tp}/{kind}"
        unpacked = res[f"{prefix}/token_logprobs" if tp == 2 else f"{prefix}/token_logprobs_all"]
        unpacked_grads = res[f"{prefix}/grads_chunked" if tp == 2 else f"{prefix}/grads_all"]
        packed = res[f"{prefix}/packed_token_logprobs"]
        torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(res[f"{prefix}/packed_sums"], reference.sum(1), atol=1e-5, rtol=1e-6)
        assert torch.equal(res[f"{prefix}/packed_counts"], counts)
        grads = res[f"{prefix}/packed_grads"]
        assert grads.keys() == unpacked_grads.keys() and len(grads) > 0
        for name in grads:
            torch.testing.assert_close(grads[name], unpacked_grads[name], atol=1e-4, rtol=1e-4, msg=name)
        rows, length = res[f"{prefix}/packed_shape"]
        assert rows < ROWS and length <= dist_run["spec"]["pack_length"]  # sequences really share rows
        unpacked_padding, packed_padding, removed = res[f"{prefix}/padding"]
        tokens = int(dist_run["batch"]["attention_mask"].sum())
        assert unpacked_padding == pytest.approx(1 - tokens / (ROWS * LENGTH))
        assert packed_padding == pytest.approx(1 - tokens / (rows * length))
        assert removed == pytest.approx(1 - rows * length / (ROWS * LENGTH)) and removed > 0


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_equals_no_recompute(dist_run, mode, tp):
    """megatron's activation recomputation: the same loss and gradients as keeping every activation, fewer
    elements kept for backward (so it really recomputed), and at TP=2 the same weights after a DDP SGD step."""
    for res in dist_run["results"]:
        base, ours = f"tp{tp}/recompute/none", f"tp{tp}/recompute/{mode}"
        torch.testing.assert_close(res[f"{ours}/loss"], res[f"{base}/loss"], atol=1e-5, rtol=0)
        grads, expected = res[f"{ours}/grads"], res[f"{base}/grads"]
        assert grads.keys() == expected.keys() and len(grads) > 0
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
        kept, kept_base = res[f"{ours}/saved_elements"], res[f"{base}/saved_elements"]
        assert kept < (0.5 if mode == "full" else 0.98) * kept_base, (kept, kept_base)
        if tp == 2:
            (loss, norm, ok), (base_loss, base_norm, base_ok) = res[f"{ours}/sgd"], res[f"{base}/sgd"]
            assert ok and base_ok and abs(loss - base_loss) <= 1e-5 and abs(norm - base_norm) <= 1e-5 * base_norm
            stepped, base_stepped = res[f"{ours}/stepped"], res[f"{base}/stepped"]
            assert stepped.keys() == base_stepped.keys()
            for name in stepped:
                torch.testing.assert_close(stepped[name], base_stepped[name], atol=1e-5, rtol=0, msg=name)


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
    assert all(res["distopt/param_types"] == ["torch.FloatTensor"] for res in dist_run["results"])


def test_reference_model_is_frozen_copy(dist_run):
    for res in dist_run["results"]:
        assert res["ref/params_equal"] and not res["ref/policy_params_share_storage"]
        assert not res["ref/requires_grad"] and not res["ref/training"]
        assert res["ref/logprob_max_diff"] == 0.0


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
