"""Seeded batched sampling (rpo.evaluation.sampling) and the reward-KL point of rpo-eval --judge NAME --kl
(rpo.evaluation.frontier), on tiny LLaMAs with a word-level tokenizer (tests/tiny_lm.py): samples independent of
batching, the sampler's distribution, log-probs and the KL estimate against a float64 computation written here,
intervals against closed forms, and the command's options and errors.
"""
from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
from scipy.stats import t as student_t

import tiny_lm
from rpo.evaluation import mean_interval, sample_responses
from rpo.evaluation.cli import main as evaluate_main
from rpo.evaluation.generation import prompt_token_ids
from rpo.evaluation.sampling import SeededSampler

PROMPTS = [[{"role": "user", "content": text}] for text in (
    "write a review of the food", "what do you think about the city", "one sentence about the movie",
    "review the phone", "what do you think of this place and the price")]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_lm.build_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    return tiny_lm.build_model(tokenizer, seed=1, eos_rate=0.12)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return (tiny_lm.save_tiny_lm(root / "policy", seed=1, eos_rate=0.12),
            tiny_lm.save_tiny_lm(root / "reference", seed=2, eos_rate=0.12))


def float64_logp(model64, prompt_ids, tokens) -> float:
    """Sum of log p(token) of `tokens` after `prompt_ids`: one unpadded float64 forward, no cache."""
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    with torch.no_grad():
        log_probs = torch.log_softmax(model64(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return float(sum(log_probs[start - 1 + t, token] for t, token in enumerate(tokens)))


def test_samples_are_seeded_per_sample_not_per_batch(policy, tokenizer):
    options = dict(samples_per_prompt=3, max_new_tokens=8, seed=7, max_prompt_length=64)
    big = sample_responses(policy, tokenizer, PROMPTS, batch_size=16, **options)
    small = sample_responses(policy, tokenizer, PROMPTS, batch_size=2, **options)
    assert [(s.prompt_index, s.sample_index) for s in big] == [(i, k) for i in range(5) for k in range(3)]
    assert [s.token_ids for s in big] == [s.token_ids for s in small]
    assert [s.logp for s in big] == pytest.approx([s.logp for s in small], abs=1e-5)
    again = sample_responses(policy, tokenizer, PROMPTS, batch_size=16, **options)
    assert [s.token_ids for s in again] == [s.token_ids for s in big]
    other = sample_responses(policy, tokenizer, PROMPTS, batch_size=16, **{**options, "seed": 8})
    assert [s.token_ids for s in other] != [s.token_ids for s in big]
    # A prompt's samples differ from each other (own streams) and both kinds of ending occur.
    assert len({tuple(s.token_ids) for s in big}) > 10
    assert {s.ended for s in big} == {True, False}


def test_sample_logps_and_endings_match_a_float64_forward(policy, tokenizer):
    samples = sample_responses(policy, tokenizer, PROMPTS, samples_per_prompt=4, max_new_tokens=8, seed=3,
                               max_prompt_length=64, batch_size=6)
    model64 = copy.deepcopy(policy).double()
    eos = tokenizer.eos_token_id
    for sample in samples:
        prompt_ids = prompt_token_ids(tokenizer, PROMPTS[sample.prompt_index], 64)
        assert sample.logp == pytest.approx(float64_logp(model64, prompt_ids, sample.token_ids), abs=1e-4)
        if sample.ended:
            assert sample.token_ids[-1] == eos and eos not in sample.token_ids[:-1]
        else:
            assert len(sample.token_ids) == 8 and eos not in sample.token_ids
        assert sample.text == tokenizer.decode([t for t in sample.token_ids if t != eos],
                                               skip_special_tokens=True).strip()


def test_sampler_draws_from_the_softmax_and_respects_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]], dtype=torch.float64))
    draws = 6000
    counts = torch.zeros(5)
    nucleus = torch.zeros(5)
    for seed in range(draws):
        sampler = SeededSampler([torch.Generator().manual_seed(seed)], temperature=1.0, top_p=1.0)
        counts[int(sampler(None, logits.float()).argmax())] += 1
        sampler = SeededSampler([torch.Generator().manual_seed(seed)], temperature=1.0, top_p=0.7)
        nucleus[int(sampler(None, logits.float()).argmax())] += 1
    # Binomial standard errors are <= 0.0065 at 6000 draws: 4 of them as the tolerance.
    assert (counts / draws).tolist() == pytest.approx([0.5, 0.25, 0.15, 0.1, 0.0], abs=0.026)
    # top_p 0.7: the smallest most-likely set reaching 0.7 is {0, 1} (0.75), renormalised to 2/3, 1/3.
    assert (nucleus / draws).tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0, 0], abs=0.026)
    assert nucleus[2:].sum() == 0
    recorded = SeededSampler([torch.Generator().manual_seed(0)], 0.5, 1.0)
    token = int(recorded(None, logits.float()).argmax())
    # The recorded log-prob is the model's at temperature 1, whatever the sampling temperature.
    assert float(recorded.step_logps[0][0]) == pytest.approx(math.log([0.5, 0.25, 0.15, 0.1][token]), abs=1e-6)


def test_mean_interval_is_the_student_t_interval():
    values = [0.1, 0.4, -0.2, 0.3, 0.9, float("nan")]
    finite = values[:5]
    half = student_t.ppf(0.975, 4) * statistics.stdev(finite) / math.sqrt(5)
    result = mean_interval(values)
    assert result["n"] == 5 and result["mean"] == pytest.approx(statistics.mean(finite))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((statistics.mean(finite) - half,
                                                                   statistics.mean(finite) + half))
    assert mean_interval([]) == {"mean": None, "ci_low": None, "ci_high": None, "sd": None, "n": 0}
    assert mean_interval([2.0])["ci_low"] is None


def per_prompt_means(rows, key, prompts):
    means = []
    for index in range(prompts):
        values = [r[key] for r in rows if r["prompt_index"] == index and r[key] is not None]
        means.append(statistics.mean(values) if values else float("nan"))
    return means


def interval(values):
    values = [v for v in values if math.isfinite(v)]
    mean = statistics.mean(values)
    half = student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p[0]["content"]}) + "\n" for p in PROMPTS))
    return path


def run_eval(model, reference, prompt_file, out, *extra):
    return evaluate_main(["--model", str(model), "--reference", str(reference), "--prompts", str(prompt_file),
                          "--judge", "vader", "--samples-per-prompt", "3", "--max-new-tokens", "8",
                          "--max-prompt-length", "32", "--max-length", "64", "--seed", "5", "--no-progress",
                          "--output-json", str(out / "eval.json"), "--samples-output", str(out / "samples.jsonl"),
                          *map(str, extra)])


def test_eval_kl_and_scores_against_float64(model_dirs, prompt_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir, reference_dir = model_dirs
    assert run_eval(policy_dir, reference_dir, prompt_file, tmp_path, "--kl") == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    policy_rows = [r for r in rows if r["model"] == "policy"]
    reference_rows = [r for r in rows if r["model"] == "reference"]
    assert len(policy_rows) == len(reference_rows) == 15
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy64 = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float64).eval()
    reference64 = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float64).eval()
    for row in policy_rows:
        prompt_ids = prompt_token_ids(tokenizer, PROMPTS[row["prompt_index"]], 32)
        row["log_ratio"] = (float64_logp(policy64, prompt_ids, row["token_ids"])
                            - float64_logp(reference64, prompt_ids, row["token_ids"]))
        assert row["logp"] - row["reference_logp"] == pytest.approx(row["log_ratio"], abs=1e-4)
    kl = interval(per_prompt_means(policy_rows, "log_ratio", 5))
    point = result["pointwise"]
    assert (point["kl"]["mean"], point["kl"]["ci_low"], point["kl"]["ci_high"]) == pytest.approx(kl, abs=1e-4)
    assert result["kl"] == point["kl"]["mean"] and result["kl_ci"] == [point["kl"]["ci_low"], point["kl"]["ci_high"]]
    # Scores: VADER of each sample's text; per-prompt means, their t interval, the paired difference.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    for row in rows:
        assert row["score"] == analyzer.polarity_scores(row["text"])["compound"]
    policy_means = per_prompt_means(policy_rows, "score", 5)
    reference_means = per_prompt_means(reference_rows, "score", 5)
    assert (point["score"]["mean"], point["score"]["ci_low"], point["score"]["ci_high"]) == pytest.approx(
        interval(policy_means))
    assert point["reference_score"]["mean"] == pytest.approx(statistics.mean(reference_means))
    difference = interval([a - b for a, b in zip(policy_means, reference_means)])
    assert (point["difference"]["mean"], point["difference"]["ci_low"], point["difference"]["ci_high"]) == \
        pytest.approx(difference)
    assert point["cut_off"] == sum(not r["ended"] for r in policy_rows)
    assert result["judge_score"] == point["score"]["mean"]
    # The reference's samples use the policy's per-sample seeds: the same streams, other models, other tokens.
    assert [r["token_ids"] for r in policy_rows] != [r["token_ids"] for r in reference_rows]


def test_policy_equal_to_reference_gives_identical_samples_and_zero_kl(model_dirs, prompt_file, tmp_path):
    policy_dir, _ = model_dirs
    cache = tmp_path / "reference_samples.jsonl"
    assert run_eval(policy_dir, policy_dir, prompt_file, tmp_path, "--kl", "--reference-samples", cache) == 0
    point = json.loads((tmp_path / "eval.json").read_text())["pointwise"]
    assert point["difference"]["mean"] == 0.0 and point["difference"]["sd"] == 0.0
    assert abs(point["kl"]["mean"]) < 1e-5
    # The cached reference samples are read back (not sampled again) for the same settings: a score edited in
    # the file shows in the result.
    lines = cache.read_text().splitlines()
    first = json.loads(lines[1])
    lines[1] = json.dumps({**first, "score": 123.0})
    cache.write_text("\n".join(lines) + "\n")
    assert run_eval(policy_dir, policy_dir, prompt_file, tmp_path, "--kl", "--reference-samples", cache) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["pointwise"]
    index = first["prompt_index"]
    assert again["per_prompt"]["reference_score"][index] == pytest.approx(
        point["per_prompt"]["reference_score"][index] + (123.0 - first["score"]) / 3)
    # Other settings (another seed): sampled again and rewritten.
    assert run_eval(policy_dir, policy_dir, prompt_file, tmp_path, "--kl", "--reference-samples", cache,
                    "--seed", "6") == 0
    assert json.loads(cache.read_text().splitlines()[0])["settings"]["seed"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--judge", "vader", "--kl", "--temperature", "0.7"], "needs --temperature 1 and --top-p 1"),
    (["--kl"], "--kl needs a pointwise judge"),
    (["--judge", "openai", "--judge-mode", "pairwise", "--kl", "--judge-url", "http://x", "--judge-model", "m"],
     "--kl is measured in --judge-mode pointwise"),
    (["--judge", "hf"], "--judge hf needs --judge-model DIR"),
    (["--judge", "vader", "--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1"),
    (["--judge", "vader", "--judge-option", "nokey"], "--judge-option must look like KEY=VALUE"),
])
def test_pointwise_option_errors(model_dirs, prompt_file, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", str(model_dirs[0]), "--prompts", str(prompt_file)] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_judge_is_one_error_line(model_dirs, prompt_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", str(model_dirs[0]), "--reference", str(model_dirs[1]), "--prompts",
                       str(prompt_file), "--judge", "nonesuch", "--no-progress"])
    assert exit_info.value.code == 2
    assert "rpo-eval: error: --judge nonesuch: unknown judge 'nonesuch'" in capsys.readouterr().err


def test_pointwise_judge_in_pairwise_mode_compares_scores(model_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "review the food", "chosen": "the food was terrible"}) + "\n"
                       + json.dumps({"prompt": "review the city", "chosen": "a great city, I love it"}) + "\n")
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(model_dirs[0]), "--prompts", str(prompts), "--judge", "vader",
                          "--judge-mode", "pairwise", "--max-new-tokens", "4", "--output-json", str(out),
                          "--generations-output", str(tmp_path / "gen.jsonl"), "--no-progress"]) == 0
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    generations = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    score = [analyzer.polarity_scores(g["response"])["compound"] - analyzer.polarity_scores(g["baseline"])["compound"]
             for g in generations]
    judge = json.loads(out.read_text())["judge"]
    assert (judge["wins"], judge["losses"], judge["ties"]) == (sum(s > 0 for s in score), sum(s < 0 for s in score),
                                                               sum(s == 0 for s in score))
