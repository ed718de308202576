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
    """With chunk c, no tensor autograd keeps exceeds c × padded_vocab/TP; unchunked, one is n × vocab/TP."""
    res = dist_run["results"][0]
    width, chunk, n = res["mem/padded_vocab_per_rank"], res["mem/chunk_size"], res["mem/response_tokens"]
    assert width == 256  # 300 padded to 512, over 2 ranks
    assert res["mem/chunked_max_saved"] <= chunk * width
    assert res["mem/unchunked_max_saved"] >= n * width > chunk * width


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
