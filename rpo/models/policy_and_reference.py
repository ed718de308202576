"""The policy loaded from an HF folder (this rank's TP shard of a GPTModel, its HF config and tokenizer) and its
frozen reference copy. Saving back to HF: rpo.models.hf_checkpoint.save_hf."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rpo.models import gpt as gpt_lib
from rpo.models import hf_checkpoint
from rpo.models.parallel import init_parallel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}") from None


def load_hf_config(hf_path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(hf_path), trust_remote_code=trust_remote_code)


def load_policy(hf_path: str | os.PathLike, tp_size: int = 1, dtype: torch.dtype | str = torch.float32,
                vocab_divisible_by: int = 128, use_te: bool | None = None, trust_remote_code: bool = False,
                recompute: str = "none", sequence_parallel: bool = False, moe_aux_loss_coeff: float | None = None):
    """(model, hf_config, tokenizer): this rank's TP (and EP) shard of a GPTModel holding the HF folder's weights.

    Initialises torch.distributed and megatron's parallel state for `tp_size` if that has not been done (expert
    parallelism: call rpo.models.init_parallel(tp_size, expert_parallel=N) first). `recompute`: activation
    recomputation in training mode ("none", "selective", "full"; see rpo.models.gpt.recompute_settings).
    `sequence_parallel`: megatron's sequence parallelism (TP > 1; see rpo.models.gpt.build_gpt_model).
    `moe_aux_loss_coeff`: a mixture-of-experts model's load-balancing loss weight (None: the config's).
    """
    from transformers import AutoTokenizer

    model, hf_config = load_gpt_model(hf_path, tp_size, dtype, vocab_divisible_by, use_te, trust_remote_code,
                                      recompute, sequence_parallel, moe_aux_loss_coeff)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_path), trust_remote_code=trust_remote_code)
    return model, hf_config, tokenizer


def load_gpt_model(hf_path: str | os.PathLike, tp_size: int = 1, dtype: torch.dtype | str = torch.float32,
                   vocab_divisible_by: int = 128, use_te: bool | None = None, trust_remote_code: bool = False,
                   recompute: str = "none", sequence_parallel: bool = False,
                   moe_aux_loss_coeff: float | None = None):
    """(model, hf_config): `load_policy` without the tokenizer (a reference model's folder needs none)."""
    from megatron.core import parallel_state

    hf_path = Path(hf_path)
    if not (hf_path / "config.json").is_file():
        raise FileNotFoundError(f"{hf_path} is not a Hugging Face model folder (no config.json)")
    if not parallel_state.model_parallel_is_initialized():
        init_parallel(tp_size)
    hf_config = load_hf_config(hf_path, trust_remote_code)
    model = gpt_lib.build_gpt_model(hf_config, tp_size=tp_size, dtype=resolve_dtype(dtype),
                                    vocab_divisible_by=vocab_divisible_by, use_te=use_te, initialize=False,
                                    recompute=recompute, sequence_parallel=sequence_parallel,
                                    moe_aux_loss_coeff=moe_aux_loss_coeff)
    hf_checkpoint.load_hf_weights(model, hf_path)
    return model, hf_config


def reference_model(policy):
    """A frozen (eval mode, no grad) copy of `policy` with the same sharding and this rank's same weights.

    It keeps no activations for backward, so it is built without recomputation whatever the policy uses; it keeps
    the policy's sequence parallelism (the same layout of every forward).
    """
    gpt = gpt_lib.unwrap(policy)
    info = gpt_lib.model_info(gpt)
    reference = gpt_lib.build_gpt_model(info.hf_config, tp_size=info.tp_size, dtype=info.dtype,
                                        vocab_divisible_by=info.vocab_divisible_by, use_te=info.uses_te,
                                        initialize=False, sequence_parallel=info.sequence_parallel)
    state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"reference copy mismatch: missing {missing}, unexpected {unexpected}")
    reference.eval()
    reference.requires_grad_(False)
    return reference

