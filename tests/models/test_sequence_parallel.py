"""Megatron sequence parallelism in rpo.models (issue 13): the log-prob path at TP=2 with the sequence split over the
tensor-parallel group equals the same TP=2 model without it, and Hugging Face.

One 2-rank launch (tests/multirank.py) of sequence_parallel_workers.py; tiny LLaMA and Mistral (window 4 < the
13 tokens) from tiny_hf_models, on a batch of odd length 13 so that the forward pads it to a multiple of TP.
References: the same model built without sequence parallelism (its gradients are the usual TP=2 ones, checked
against HF in test_megatron_models.py) and HF's float64 log-probs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import multirank
from tiny_hf_models import hf_token_logprobs, tiny_batch, tiny_hf_model, tiny_tokenizer

WORKERS = Path(__file__).with_name("sequence_parallel_workers.py")
LENGTH = 13  # odd: not a multiple of TP = 2
TOLERANCE = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sequence_parallel")
    tokenizer = tiny_tokenizer()
    batch = {key: value[:, :LENGTH].contiguous() for key, value in tiny_batch().items()}
    models = {"llama": tiny_hf_model("llama", 1), "mistral": tiny_hf_model("mistral", 2)}
    for kind, model in models.items():
        model.save_pretrained(workdir / kind)
        tokenizer.save_pretrained(workdir / kind)
    torch.save(batch, workdir / "batch.pt")
    # pack_length 23 (odd): 6 sequences in 3 packed rows, whose odd length is padded too.
    (workdir / "spec.json").write_text(json.dumps({"chunk_size": 5, "pack_length": 23}))
    start = time.time()
    multirank.launch(WORKERS, 2, args=[workdir], log_dir=workdir / "logs").check()
    results = [torch.load(workdir / f"results-rank{r}.pt", weights_only=False) for r in range(2)]
    return {"models": models, "batch": batch, "results": results, "elapsed": time.time() - start}


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize("variant", ["baseline", "packed"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_sequence_parallel_logprobs_and_grads_equal_tensor_parallel(sp_run, kind, variant):
    """Padded and packed rows: the same log-probs (also HF's), loss and gradients (after megatron's
    finalize_model_grads, which sums the sequence-parallel norm weights' gradients over TP) as without SP."""
    reference = hf_token_logprobs(sp_run["models"][kind], sp_run["batch"])
    assert reference.shape[1] % 2 == 1
    for res in sp_run["results"]:
        ours, theirs = res[f"{kind}/{variant}/sp"], res[f"{kind}/{variant}"]
        torch.testing.assert_close(ours["token_logprobs"], theirs["token_logprobs"], **TOLERANCE)
        torch.testing.assert_close(ours["token_logprobs"], reference, **TOLERANCE)
        torch.testing.assert_close(ours["loss"], theirs["loss"], **TOLERANCE)
        assert_same_grads(ours["grads"], theirs["grads"])
        # Really sequence-parallel: every norm (2 per layer and the final one) is tagged and saw half the
        # (padded) positions; without SP they see all of them.
        tagged = ours["sequence_parallel_params"]
        assert len(tagged) == 5 and all("norm" in name for name in tagged)
        assert theirs["sequence_parallel_params"] == []
        if variant == "baseline":
            assert ours["norm_rows"] == [(LENGTH + 1) // 2] and theirs["norm_rows"] == [LENGTH]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_sequence_parallel_reference_copy_and_full_logits(sp_run, kind):
    """The frozen reference copy keeps SP and scores like the policy; GPTModel's own forward (its output layer
    gathering the sequence) gives the chunked path's log-probs."""
    for res in sp_run["results"]:
        ours, theirs = res[f"{kind}/baseline/sp"], res[f"{kind}/baseline"]
        torch.testing.assert_close(ours["reference_token_logprobs"], theirs["token_logprobs"], **TOLERANCE)
        torch.testing.assert_close(ours["full_logits_token_logprobs"], theirs["token_logprobs"], **TOLERANCE)


def test_sequence_parallel_with_full_recompute(sp_run):
    for res in sp_run["results"]:
        ours, theirs = res["llama/full/sp"], res["llama/baseline"]
        torch.testing.assert_close(ours["token_logprobs"], theirs["token_logprobs"], **TOLERANCE)
        assert_same_grads(ours["grads"], theirs["grads"])


def test_sequence_parallel_needs_tensor_parallel():
    from transformers import LlamaConfig

    from rpo.models.gpt import transformer_config_from_hf

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="needs tp_size > 1"):
        transformer_config_from_hf(config, tp_size=1, sequence_parallel=True)
