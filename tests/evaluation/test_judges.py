"""Pointwise judges (rpo.evaluation.judges): each on fixed texts against scores computed here by hand, the
registry (names, plugin files, module functions, options) and the OpenAI-compatible scorer against a fake server.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import math
import re
import sys
import threading
from pathlib import Path

import pytest
import torch

from rpo.evaluation import JudgeError, available_judges, build_judge, checked_scores, parse_score, register_judge

# --- vader ---------------------------------------------------------------------------------------------------------


def vader_lexicon() -> dict:
    """VADER's word valences, read from the lexicon file shipped in the package (data, not its code)."""
    folder = Path(importlib.util.find_spec("vaderSentiment").submodule_search_locations[0])
    lexicon = {}
    for line in (folder / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        word, valence = line.split("\t")[:2]
        lexicon[word] = float(valence)
    return lexicon


def vader_compound_by_hand(text: str, lexicon: dict) -> float:
    """VADER's compound for plain sentences (no boosters, negations, capitals, idioms; at most one 'but'), from
    its published rules: the sum of the lexicon valences, words before 'but' x0.5 and after it x1.5, then 0.292
    per '!' (at most 4) away from zero, normalised s / sqrt(s^2 + 15) and rounded to 4 decimals."""
    words = [w.strip(".,!?").lower() for w in text.split()]
    but = words.index("but") if "but" in words else None
    total = 0.0
    for index, word in enumerate(words):
        valence = lexicon.get(word, 0.0)
        if but is not None:
            valence *= 0.5 if index < but else 1.5 if index > but else 0.0
        total += valence
    emphasis = min(text.count("!"), 4) * 0.292
    if total > 0:
        total += emphasis
    elif total < 0:
        total -= emphasis
    return round(total / math.sqrt(total * total + 15), 4)


VADER_TEXTS = ["The food was good.", "The service was terrible!", "I love this place and the price is great",
               "The movie was awful but the food was great", "", "A table and a chair"]


def test_vader_compound_matches_the_lexicon_and_formula():
    lexicon = vader_lexicon()
    expected = [vader_compound_by_hand(text, lexicon) for text in VADER_TEXTS]
    # The hand values, written out: 1.9 -> 0.4404; -(2.1 + 0.292) -> -0.5255; 3.2 + 3.1 -> 0.8519;
    # 0.5 * -2.0 + 1.5 * 3.1 = 3.65 -> 0.6858; nothing -> 0.
    assert expected == [0.4404, -0.5255, 0.8519, 0.6858, 0.0, 0.0]
    judge = build_judge("vader")
    assert judge.score(["any prompt"] * len(VADER_TEXTS), VADER_TEXTS) == pytest.approx(expected, abs=1e-12)
    # The prompt is not read: only the response's sentiment counts.
    assert judge.score(["I hate everything"], ["The food was good."]) == [0.4404]


# --- hf: a sequence-classification model whose output is known in closed form --------------------------------------

def closed_form_classifier(tokenizer, num_labels: int):
    """A LLaMA sequence classifier whose layers add nothing (output projections zero): the last token's hidden
    state is its embedding, so logits = W · rmsnorm(embedding[last token])."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-6,
                         id2label={i: name for i, name in enumerate(["NEGATIVE", "POSITIVE", "OTHER"][:num_labels])})
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@torch.no_grad()
def expected_logits(model, token_id: int) -> torch.Tensor:
    embedding = model.model.embed_tokens.weight[token_id].double()
    normed = embedding / torch.sqrt((embedding ** 2).mean() + 1e-6) * model.model.norm.weight.double()
    return model.score.weight.double() @ normed


@pytest.fixture(scope="module")
def tiny_tokenizer():
    import tiny_lm

    return tiny_lm.build_tokenizer()


@pytest.mark.parametrize("num_labels", [1, 3])
def test_hf_classifier_scores_follow_the_closed_form(tmp_path, tiny_tokenizer, num_labels):
    model = closed_form_classifier(tiny_tokenizer, num_labels)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    responses = ["the food was good", "it was bad", "great", "the movie was very terrible"]
    prompts = ["write a review", "what do you think", "one sentence", "review the movie"]
    last_words = [r.split()[-1] for r in responses]
    logits = [expected_logits(model, tiny_tokenizer.convert_tokens_to_ids(w)) for w in last_words]
    # response mode: the last token is the response's last word (the batch mixes lengths: padding on the right).
    if num_labels == 1:
        judge = build_judge("hf", model=str(tmp_path), input="response", batch_size=3)
        assert judge.score(prompts, responses) == pytest.approx([float(l[0]) for l in logits], abs=1e-5)
    else:
        judge = build_judge("hf", model=str(tmp_path), input="response", label="POSITIVE", batch_size=3)
        expected = [float(torch.softmax(l, 0)[1]) for l in logits]
        assert judge.score(prompts, responses) == pytest.approx(expected, abs=1e-6)
        by_index = build_judge("hf", model=str(tmp_path), input="response", label=2, output="logit")
        assert by_index.score(prompts, responses) == pytest.approx([float(l[2]) for l in logits], abs=1e-5)
        with pytest.raises(ValueError, match="no label 'JOY'"):
            build_judge("hf", model=str(tmp_path), label="JOY")
    # chat mode (the default with a chat template): every text ends with the end-of-turn token, so every score is
    # that token's closed form, whatever the response.
    end = expected_logits(model, tiny_tokenizer.eos_token_id)
    chat = build_judge("hf", model=str(tmp_path), **({} if num_labels == 1 else {"label": "NEGATIVE"}))
    want = float(end[0]) if num_labels == 1 else float(torch.softmax(end, 0)[0])
    assert chat.score(prompts, responses) == pytest.approx([want] * 4, abs=1e-5)


def test_hf_judge_errors(tmp_path):
    with pytest.raises(ValueError, match="judge 'hf' needs the option"):
        build_judge("hf")
    with pytest.raises(ValueError, match="cannot load a sequence-classification model"):
        build_judge("hf", model=str(tmp_path / "missing"))


# --- python functions, plugins, the registry ----------------------------------------------------------------------

def test_python_function_judges_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def words(prompt, response):\n    return len(response.split()) - len(prompt.split())\n")
    expected = [2 - 1, 0 - 2, 3 - 1]
    prompts, responses = ["hello", "two words", [{"role": "user", "content": "messages"}]], ["a b", "", "x y z"]
    assert build_judge(f"{tmp_path / 'my_scores.py'}:words").score(prompts, responses) == expected
    assert build_judge("python", fn=f"{tmp_path / 'my_scores.py'}:words").score(prompts, responses) == expected
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_judge("my_scores:words").score(prompts, responses) == expected
    with pytest.raises(ValueError, match="no registered judge and no function named 'nope'"):
        build_judge("my_scores:nope")
    (tmp_path / "bad.py").write_text("def text(prompt, response):\n    return 'high'\n")
    with pytest.raises(JudgeError, match="returned 'high', expected a number"):
        build_judge(f"{tmp_path / 'bad.py'}:text").score(["p"], ["r"])


def test_user_judges_register_like_losses(tmp_path):
    plugin = tmp_path / "length_judge.py"
    plugin.write_text(
        "from rpo.evaluation import register_judge\n\n"
        "@register_judge('test-length')\n"
        "def length(per_word: bool = False):\n"
        "    class Length:\n"
        "        def score(self, prompts, responses):\n"
        "            return [float(len(r.split()) if per_word else len(r)) for r in responses]\n"
        "    return Length()\n")
    judge = build_judge(str(plugin))  # the file registers exactly one judge
    assert judge.score(["p", "p"], ["abc", "a b"]) == [3.0, 3.0]
    assert "test-length" in available_judges()
    assert build_judge("test-length", per_word=True).score(["p"], ["a b c"]) == [3.0]
    assert build_judge(f"{plugin}:test-length").score(["p"], ["ab"]) == [2.0]
    with pytest.raises(ValueError, match=r"takes no option 'words'; its options: per_word"):
        build_judge("test-length", words=True)
    with pytest.raises(ValueError, match="already registered"):
        register_judge("test-length")(lambda: None)

    @register_judge("test-length", override=True)
    def replacement():
        """Replaces the plugin's judge."""
        return type("Constant", (), {"score": lambda self, p, r: [1.0] * len(r)})()

    assert build_judge("test-length").score(["p"], ["abc"]) == [1.0]
    with pytest.raises(ValueError, match=r"unknown judge 'nonesuch'; registered: .*vader"):
        build_judge("nonesuch")
    with pytest.raises(ValueError, match="invalid judge name"):
        register_judge("a:b")
    two = tmp_path / "two.py"
    two.write_text("from rpo.evaluation import register_judge\n"
                   "register_judge('test-two-a')(lambda: None)\nregister_judge('test-two-b')(lambda: None)\n")
    with pytest.raises(ValueError, match=r"registered 2 judges \(test-two-a, test-two-b\); name one"):
        build_judge(str(two))


def test_checked_scores_rejects_wrong_answers():
    class Short:
        def score(self, prompts, responses):
            return [1.0]

    class Infinite:
        def score(self, prompts, responses):
            return [math.inf] * len(responses)

    with pytest.raises(JudgeError, match="returned 1 scores for 2 responses"):
        checked_scores(Short(), ["a", "b"], ["x", "y"])
    with pytest.raises(JudgeError, match="infinite"):
        checked_scores(Infinite(), ["a"], ["x"])
    nan = type("NaN", (), {"score": lambda self, p, r: [float("nan")]})()
    assert math.isnan(checked_scores(nan, ["a"], ["x"])[0])  # NaN = not scored, allowed and counted by callers


# --- the OpenAI-compatible scorer ---------------------------------------------------------------------------------

def test_parse_score():
    assert parse_score("Assessment: fine.\nScore: 7") == 7.0
    assert parse_score("**Score:** 8.5\n") == 8.5
    assert parse_score("Score: 3\nsome text\nScore: 9") == 9.0  # the last score line
    assert math.isnan(parse_score("I would rate it highly."))


class FakeScorer:
    """Answers 'Score: <number of words of the response>', or an unreadable text for responses saying 'mumble'."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                text = payload["messages"][0]["content"]
                found = re.search(r"Response:\n(.*?)\n\nFIRST", text, re.S)
                response = found.group(1) if found else ""
                answer = "I cannot say." if "mumble" in response else f"Assessment: ok.\nScore: {len(response.split())}"
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_openai_scorer_against_a_fake_endpoint():
    server = FakeScorer()
    try:
        judge = build_judge("openai", url=server.url, model="judge-model", timeout=5)
        scores = judge.score(["q1", [{"role": "user", "content": "q2"}], "q3"], ["one two three", "mumble", "x"])
        assert scores[0] == 3.0 and math.isnan(scores[1]) and scores[2] == 1.0
        sent = server.requests[0]
        assert sent["model"] == "judge-model" and sent["temperature"] == 0
        assert "Query:\nq1\n\nResponse:\none two three" in sent["messages"][0]["content"]
        custom = build_judge("openai", url=server.url, model="m", prompt="Q {query} R {response}\nFIRST")
        custom.score(["q"], ["r"])
        assert server.requests[-1]["messages"][0]["content"] == "Q q R r\nFIRST"
        with pytest.raises(ValueError, match=r"needs \{query\} and \{response\}"):
            build_judge("openai", url=server.url, model="m", prompt="no fields")
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
