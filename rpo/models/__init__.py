"""megatron-core models for rpo: GPTModels of the supported HF families (LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 3,
Mixtral, Qwen3-MoE; rpo.models.architectures) from HF configs, HF checkpoints in and out, tensor/data/expert-parallel
setup, chunked vocab-parallel log-probs (optionally packed), and the embedded default model.

megatron-core is imported lazily (inside functions), so `import rpo.models` stays cheap.
"""
from rpo.models.default_model import default_model_path
from rpo.models.gpt import (
    GPTModelInfo,
    attention_mask_for,
    build_gpt_model,
    forward_hidden_states,
    model_info,
    padded_vocab_size,
    transformer_config_from_hf,
    unwrap,
)
from rpo.models.hf_checkpoint import gather_hf_state, load_hf_weights, save_hf, write_hf_folder
from rpo.models.logprobs import (
    SequenceLogProbs,
    concat_batches,
    sequence_logprobs,
    sequence_logprobs_full_logits,
    vocab_parallel_token_logprobs,
)
from rpo.models.packing import PackPlan, packed_sequence_logprobs, plan_packing, sequence_logps
from rpo.models.parallel import ParallelInfo, free_port, init_parallel, parallel_info, set_seed, teardown
from rpo.models.policy_and_reference import (load_gpt_model, load_hf_config, load_policy, reference_model,
                                             resolve_dtype)

__all__ = [
    "GPTModelInfo", "PackPlan", "ParallelInfo", "SequenceLogProbs", "attention_mask_for", "build_gpt_model",
    "concat_batches", "default_model_path", "forward_hidden_states", "free_port", "gather_hf_state",
    "init_parallel", "load_gpt_model", "load_hf_config", "load_hf_weights", "load_policy", "model_info",
    "packed_sequence_logprobs", "padded_vocab_size", "parallel_info", "plan_packing", "reference_model",
    "resolve_dtype", "save_hf", "sequence_logprobs", "sequence_logprobs_full_logits", "sequence_logps", "set_seed", "teardown",
    "transformer_config_from_hf", "unwrap", "vocab_parallel_token_logprobs", "write_hf_folder",
]
