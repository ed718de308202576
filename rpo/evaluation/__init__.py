"""Evaluation of trained policies with Hugging Face models (see docs/evaluation.md).

    summary, records = evaluate_implicit_reward(policy, reference, tokenized, beta=0.1)   # reward accuracy/margin
    answers = generate_responses(policy, tokenizer, prompts)                              # greedy (temperature 0)
    records, win = compare_pairwise(prompts, answers, baselines, judge, seed=0)            # random A/B order
    win.win_rate, (win.ci_low, win.ci_high)                                               # ties half, Wilson 95%

Pairwise judges: OpenAICompatibleJudge (any /v1/chat/completions endpoint, the RPO paper's prompts) and
LocalRewardJudge (a Python reward function, offline). Pointwise judges (rpo.evaluation.judges):

    judge = build_judge("vader")                                   # also "hf", "python", "openai", plugins
    scores = judge.score(prompts, responses)
    samples = sample_responses(policy, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=48)
    point = frontier_point(len(prompts), samples, scores, ...)     # mean score and KL with 95% intervals
"""
from rpo.evaluation.frontier import format_interval, frontier_point, mean_interval
from rpo.evaluation.generation import PromptRow, generate_responses, load_prompt_file, prompt_token_ids
from rpo.evaluation.implicit_reward import (REWARD_TYPES, SequenceScores, evaluate_implicit_reward,
                                           implicit_rewards, reward_summary, sequence_logprobs)
from rpo.evaluation.judge import (DIALOGUE_JUDGE_PROMPT, JUDGE_PROMPTS, SUMMARIZATION_JUDGE_PROMPT, Judgement,
                                  JudgeError, LocalRewardJudge, OpenAICompatibleJudge, PairwiseRecord,
                                  build_judge_prompt, compare_pairwise, load_reward_function, parse_verdict,
                                  render_conversation)
from rpo.evaluation.judges import (FunctionJudge, HFClassifierJudge, OpenAIScoreJudge, PointwiseJudge, VaderJudge,
                                   available_judges, build_judge, checked_scores, parse_score, register_judge)
from rpo.evaluation.sampling import Sample, plan_batches, sample_batch, sample_responses, sample_seed
from rpo.evaluation.win_rate import WinRate, win_rate, wilson_interval

__all__ = [
    "FunctionJudge", "HFClassifierJudge", "OpenAIScoreJudge", "PointwiseJudge", "Sample", "VaderJudge",
    "available_judges", "build_judge", "checked_scores", "format_interval", "frontier_point", "mean_interval",
    "parse_score", "plan_batches", "register_judge", "sample_batch", "sample_responses", "sample_seed",
    "DIALOGUE_JUDGE_PROMPT", "JUDGE_PROMPTS", "REWARD_TYPES", "SUMMARIZATION_JUDGE_PROMPT", "Judgement", "JudgeError",
    "LocalRewardJudge", "OpenAICompatibleJudge", "PairwiseRecord", "PromptRow", "SequenceScores", "WinRate",
    "build_judge_prompt", "compare_pairwise", "evaluate_implicit_reward", "generate_responses", "implicit_rewards",
    "load_prompt_file", "load_reward_function", "parse_verdict", "prompt_token_ids", "render_conversation",
    "reward_summary", "sequence_logprobs", "win_rate", "wilson_interval",
]
