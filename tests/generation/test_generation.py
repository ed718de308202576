"""rpo-generate (rpo.generation): pairs and unpaired rows from scored samples with exact counts, the command end
to end on a tiny LLaMA (tests/tiny_lm.py) with the VADER judge: deterministic per seed, equal at 1 and 2 ranks,
resumable, its rows readable by the trainer's data loader, and its errors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import multirank
import tiny_lm
from rpo.generation import build_pairs, build_unpaired
from rpo.generation.cli import main as generate_main

REPO = Path(__file__).resolve().parents[2]
WORDS = ["write a review of the food", "what do you think about the city", "one sentence about the movie",
         "review the phone", "what do you think of this place and the price", "write about the book",
         "the service", "a day in the city"]


def sample(prompt, index, score, ended=True, text=None):
    return {"prompt_index": prompt, "sample_index": index, "score": score, "ended": ended,
            "text": f"text {prompt}.{index}" if text is None else text}


def test_pairs_best_vs_worst_and_every_count():
    samples = [
        # prompt 0: a pair, best 0.9 (sample 2) vs worst -0.5 (sample 1); the cut-off 1.0 is never used
        sample(0, 0, 0.1), sample(0, 1, -0.5), sample(0, 2, 0.9), sample(0, 3, 1.0, ended=False),
        # prompt 1: all equal -> tied
        sample(1, 0, 0.0), sample(1, 1, 0.0), sample(1, 2, 0.0), sample(1, 3, 0.0),
        # prompt 2: one usable sample (others cut off, unscored, empty) -> too few
        sample(2, 0, 0.3), sample(2, 1, 0.8, ended=False), sample(2, 2, None), sample(2, 3, 0.7, text=" "),
        # prompt 3: gap 0.05, below a min_gap of 0.1 -> tied then; equal best scores -> the lower index
        sample(3, 0, 0.2), sample(3, 1, 0.25), sample(3, 2, 0.25), sample(3, 3, float("nan")),
    ]
    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(4)]
    rows, counts = build_pairs(samples, prompts, [10, 11, 12, 13])
    assert counts == {"prompts": 4, "samples": 16, "ended": 14, "cut_off": 2, "empty": 1, "unscored": 2,
                      "written": 2, "tied": 1, "too_few_usable": 1, "min_gap": 0.0}
    first, second = rows
    assert (first["chosen_sample"], first["rejected_sample"], first["chosen_score"], first["rejected_score"]) == \
        (2, 1, 0.9, -0.5)
    assert first["chosen"] == [{"role": "assistant", "content": "text 0.2"}] and first["source_row"] == 10
    assert first["scores"] == [0.1, -0.5, 0.9, 1.0] and first["ended"] == [True, True, True, False]
    assert (second["prompt_index"], second["chosen_sample"], second["rejected_sample"]) == (3, 1, 0)
    rows, counts = build_pairs(samples, prompts, [10, 11, 12, 13], min_gap=0.1)
    assert (counts["written"], counts["tied"], counts["too_few_usable"]) == (1, 2, 1)
    with pytest.raises(ValueError, match="min_gap"):
        build_pairs(samples, prompts, [0] * 4, min_gap=-1)


def test_unpaired_rows_by_threshold():
    samples = [sample(0, 0, 0.5), sample(0, 1, -0.2), sample(0, 2, 0.0), sample(0, 3, 0.9, ended=False),
               sample(1, 0, None), sample(1, 1, 0.1, text="")]
    rows, counts = build_unpaired(samples, [["p0"], ["p1"]], [0, 1], threshold=0.0)
    assert [(r["sample_index"], r["label"]) for r in rows] == [(0, True), (1, False)]
    assert (counts["written"], counts["desirable"], counts["undesirable"], counts["at_threshold"],
            counts["cut_off"], counts["unscored"], counts["empty"]) == (2, 1, 1, 1, 1, 1, 1)
    rows, counts = build_unpaired(samples, [["p0"], ["p1"]], [0, 1], threshold=0.5)
    assert [(r["sample_index"], r["label"]) for r in rows] == [(1, False), (2, False)]
    assert counts["at_threshold"] == 1


# --- the command ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny_lm(tmp_path_factory.mktemp("tiny") / "policy", seed=1, eos_rate=0.12)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in WORDS))
    return path


def arguments(model_dir, prompt_file, out, *extra):
    return ["--model", str(model_dir), "--prompts", str(prompt_file), "--samples-per-prompt", "4",
            "--max-new-tokens", "4", "--batch-size", "5", "--judge", "vader", "--seed", "11",
            "--output-dir", str(out), "--no-progress", *map(str, extra)]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def expected_counts(samples):
    """The pairs' counts recomputed from samples.jsonl with the rules of rpo.generation.pairs, written out."""
    counts = {"written": 0, "tied": 0, "too_few_usable": 0}
    for index in sorted({s["prompt_index"] for s in samples}):
        usable = [s for s in samples if s["prompt_index"] == index and s["ended"] and s["text"].strip()
                  and s["score"] is not None]
        if len(usable) < 2:
            counts["too_few_usable"] += 1
        elif max(s["score"] for s in usable) > min(s["score"] for s in usable):
            counts["written"] += 1
        else:
            counts["tied"] += 1
    counts["cut_off"] = sum(not s["ended"] for s in samples)
    return counts


@pytest.fixture(scope="module")
def one_rank(model_dir, prompt_file, tmp_path_factory):
    """rpo-generate on one rank (a separate process with one thread, as each of the two ranks below)."""
    out = tmp_path_factory.mktemp("one-rank")
    result = multirank.launch(REPO / "rpo" / "generation" / "__main__.py", 1,
                              args=arguments(model_dir, prompt_file, out), env={"OMP_NUM_THREADS": "1"},
                              log_dir=out / "logs", timeout=600)
    result.check()
    return out


def test_generate_writes_samples_pairs_and_exact_counts(one_rank):
    samples = read_jsonl(one_rank / "samples.jsonl")
    summary = json.loads((one_rank / "summary.json").read_text())
    assert len(samples) == 32 and [(s["prompt_index"], s["sample_index"]) for s in samples] == \
        [(i, k) for i in range(8) for k in range(4)]
    counts = expected_counts(samples)
    assert {key: summary[key] for key in counts} == counts
    assert counts["written"] > 0 and counts["cut_off"] > 0 and counts["tied"] + counts["too_few_usable"] > 0
    pairs = read_jsonl(one_rank / "pairs.jsonl")
    assert len(pairs) == summary["written"]
    by_key = {(s["prompt_index"], s["sample_index"]): s for s in samples}
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    for s in samples:
        assert s["score"] == analyzer.polarity_scores(s["text"])["compound"]
    for row in pairs:
        chosen, rejected = by_key[(row["prompt_index"], row["chosen_sample"])], by_key[(row["prompt_index"],
                                                                                          row["rejected_sample"])]
        assert chosen["ended"] and rejected["ended"] and chosen["score"] > rejected["score"]
        assert row["chosen"][0]["content"] == chosen["text"] and row["rejected"][0]["content"] == rejected["text"]
        usable = [s["score"] for s in samples if s["prompt_index"] == row["prompt_index"] and s["ended"]
                  and s["text"].strip()]
        assert (chosen["score"], rejected["score"]) == (max(usable), min(usable))
        assert row["prompt"] == [{"role": "user", "content": WORDS[row["prompt_index"]]}]
    # The trainer's loader reads the rows (extra fields and all).
    from rpo.data import load_preference_dataset

    dataset = load_preference_dataset(one_rank / "pairs.jsonl")
    assert len(dataset.rows) == len(pairs)


def test_generate_is_equal_at_one_and_two_ranks(one_rank, model_dir, prompt_file, tmp_path):
    result = multirank.launch(REPO / "rpo" / "generation" / "__main__.py", 2,
                              args=arguments(model_dir, prompt_file, tmp_path), env={"OMP_NUM_THREADS": "1"},
                              log_dir=tmp_path / "logs", timeout=600)
    result.check()
    assert (tmp_path / "samples.rank0.jsonl").is_file() and (tmp_path / "samples.rank1.jsonl").is_file()
    one, two = read_jsonl(one_rank / "samples.jsonl"), read_jsonl(tmp_path / "samples.jsonl")
    assert [{k: v for k, v in s.items() if k != "logp"} for s in one] == \
        [{k: v for k, v in s.items() if k != "logp"} for s in two]
    assert [s["logp"] for s in one] == pytest.approx([s["logp"] for s in two], abs=1e-9)
    assert read_jsonl(one_rank / "pairs.jsonl") == read_jsonl(tmp_path / "pairs.jsonl")
    assert "error" not in result.logs[1]


def test_generate_is_deterministic_per_seed_and_resumes(model_dir, prompt_file, tmp_path, caplog):
    out = tmp_path / "run"
    assert generate_main(arguments(model_dir, prompt_file, out)) == 0
    first = (out / "samples.jsonl").read_text()
    assert generate_main(arguments(model_dir, prompt_file, tmp_path / "again")) == 0
    assert (tmp_path / "again" / "samples.jsonl").read_text() == first
    # Interrupted: the shard lost its last three batches (12 samples) and ends in a torn line; the rerun draws only
    # those and ends with the same files.
    shard = out / "samples.rank0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-12]) + lines[-12][:20])
    for name in ("samples.jsonl", "pairs.jsonl", "summary.json"):
        (out / name).unlink()
    caplog.set_level("INFO", logger="rpo.generate")
    assert generate_main(arguments(model_dir, prompt_file, out)) == 0
    assert "resuming: 20 of 32 samples already drawn" in caplog.text
    assert (out / "samples.jsonl").read_text() == first
    assert len(shard.read_text().splitlines()) == 32
    assert generate_main(arguments(model_dir, prompt_file, tmp_path / "seed-12", "--seed", "12")) == 0
    assert (tmp_path / "seed-12" / "samples.jsonl").read_text() != first


def test_generate_unpaired_counts(model_dir, prompt_file, tmp_path):
    assert generate_main(arguments(model_dir, prompt_file, tmp_path, "--format", "unpaired", "--threshold",
                                   "0")) == 0
    samples = read_jsonl(tmp_path / "samples.jsonl")
    summary = json.loads((tmp_path / "summary.json").read_text())
    usable = [s for s in samples if s["ended"] and s["text"].strip()]
    assert summary["desirable"] == sum(s["score"] > 0 for s in usable)
    assert summary["undesirable"] == sum(s["score"] < 0 for s in usable)
    assert summary["at_threshold"] == sum(s["score"] == 0 for s in usable)
    rows = read_jsonl(tmp_path / "unpaired.jsonl")
    assert len(rows) == summary["written"] == summary["desirable"] + summary["undesirable"]
    from rpo.data import load_preference_dataset

    if {r["label"] for r in rows} == {True, False}:
        assert len(load_preference_dataset(tmp_path / "unpaired.jsonl").rows) == len(rows)


def test_generate_errors(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert generate_main(arguments(model_dir, prompt_file, out, "--max-prompts", "2")) == 0
    capsys.readouterr()
    # Other settings in a used folder: refused (naming them), unless --overwrite.
    assert generate_main(arguments(model_dir, prompt_file, out, "--max-prompts", "2", "--max-new-tokens", "5")) == 2
    assert "holds samples drawn with other settings (max_new_tokens)" in capsys.readouterr().err
    assert generate_main(arguments(model_dir, prompt_file, out, "--max-prompts", "2", "--overwrite")) == 0
    assert generate_main(arguments(model_dir, prompt_file, tmp_path / "x", "--judge", "nonesuch")) == 2
    assert "rpo-generate: error: --judge nonesuch: unknown judge 'nonesuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(arguments(model_dir, prompt_file, tmp_path / "y", "--samples-per-prompt", "1"))
    assert "--format paired needs --samples-per-prompt >= 2" in capsys.readouterr().err
    assert generate_main(["--model", str(model_dir), "--prompts", str(tmp_path / "missing.jsonl"),
                          "--output-dir", str(tmp_path / "z")]) == 2
    assert "--prompts: prompt file not found" in capsys.readouterr().err
