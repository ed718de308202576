"""Evaluation of trained policies with Hugging Face models (see docs/evaluation.md).

    summary, records = evaluate_implicit_reward(policy, reference, tokenized, beta=0.1)   # reward accuracy/margin
    answers = generate_responses(policy, tokenizer, prompts)                              # greedy (temperature 0)
    records, win = compare_pairwise(prompts, answers, baselines, judge, seed=0)            # random A/B order
    win.win_rate, (win.ci_low, win.ci_high)                                               # ties half, Wilson 95%

Judges: OpenAICompatibleJudge (any /v1/chat/completions endpoint, the RPO paper's prompts) and
LocalRewardJudge (a Python reward function, offline).
"""
from rpo.evaluation.generation import PromptRow, generate_responses, load_prompt_file, prompt_token_ids
from rpo.evaluation.implicit_reward import (REWARD_TYPES, SequenceScores, evaluate_implicit_reward,
                                           implicit_rewards, reward_summary, sequence_logprobs)
from rpo.evaluation.judge import (DIALOGUE_JUDGE_PROMPT, JUDGE_PROMPTS, SUMMARIZATION_JUDGE_PROMPT, Judgement,
                                  JudgeError, LocalRewardJudge, OpenAICompatibleJudge, PairwiseRecord,
                                  build_judge_prompt, compare_pairwise, load_reward_function, parse_verdict,
                                  render_conversation)
from rpo.evaluation.win_rate import WinRate, win_rate, wilson_interval

__all__ = [
    "DIALOGUE_JUDGE_PROMPT", "JUDGE_PROMPTS", "REWARD_TYPES", "SUMMARIZATION_JUDGE_PROMPT", "Judgement", "JudgeError",
    "LocalRewardJudge", "OpenAICompatibleJudge", "PairwiseRecord", "PromptRow", "SequenceScores", "WinRate",
    "build_judge_prompt", "compare_pairwise", "evaluate_implicit_reward", "generate_responses", "implicit_rewards",
    "load_prompt_file", "load_reward_function", "parse_verdict", "prompt_token_ids", "render_conversation",
    "reward_summary", "sequence_logprobs", "win_rate", "wilson_interval",
]
