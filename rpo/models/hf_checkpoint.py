"""Hugging Face LLaMA/Mistral weights ↔ megatron-core GPTModel weights sharded for any tensor-parallel size.

The mapping is written once here and used both ways. (Megatron-Bridge 0.3.1 does not install on this stack:
it pins transformers < 5 and megatron-core[dev,mlm], whose mamba-ssm and transformer-engine need CUDA builds.)

| HF | megatron-core (local spec; TE spec in brackets) | TP sharding |
| --- | --- | --- |
| model.embed_tokens.weight [V, h] | embedding.word_embeddings.weight | rows, vocab padded to V_p with zeros |
| lm_head.weight (untied only) | output_layer.weight | rows, padded like the embedding |
| layers.i.input_layernorm.weight | layers.i.input_layernorm.weight [self_attention.linear_qkv.layer_norm_weight] | replicated |
| layers.i.self_attn.{q,k,v}_proj.weight | layers.i.self_attention.linear_qkv.weight | rows, whole query groups |
| layers.i.self_attn.o_proj.weight | layers.i.self_attention.linear_proj.weight | columns |
| layers.i.post_attention_layernorm.weight | layers.i.pre_mlp_layernorm.weight [mlp.linear_fc1.layer_norm_weight] | replicated |
| layers.i.mlp.{gate,up}_proj.weight | layers.i.mlp.linear_fc1.weight | [gate_r; up_r] per rank |
| layers.i.mlp.down_proj.weight | layers.i.mlp.linear_fc2.weight | columns |
| model.norm.weight | decoder.final_layernorm.weight | replicated |

The two traps: the fused QKV weight is grouped per KV group (for each group: its query heads, then its key
head, then its value head) and a TP rank holds a contiguous block of whole groups; the SwiGLU fc1 of a TP rank
is [its rows of gate; its rows of up], not a shard of [gate; up]. HF's rotate-half RoPE equals megatron's
non-interleaved RoPE, so no row permutation is needed.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

logger = logging.getLogger(__name__)

# Tokenizer (and generation) files copied next to converted weights when present in the source folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Layout:
    """Shapes that the mapping needs, from an HF config plus the megatron vocabulary padding."""

    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    hidden_size: int
    ffn_size: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool
    te_norms: bool = False  # Transformer Engine spec: norms fused into linear_qkv / linear_fc1

    @classmethod
    def from_hf(cls, hf_config, padded_vocab_size: int, te_norms: bool = False) -> "Layout":
        heads = hf_config.num_attention_heads
        return cls(
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            hidden_size=hf_config.hidden_size,
            ffn_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            padded_vocab_size=padded_vocab_size,
            tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
            te_norms=te_norms,
        )


@dataclass(frozen=True)
class Rule:
    megatron: str
    kind: str  # "replicated", "vocab", "qkv", "fc1", "columns"
    hf: tuple[str, ...]


def rules(layout: Layout) -> list[Rule]:
    """Every megatron parameter and the HF tensors it is made of."""
    out = [Rule("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",))]
    for i in range(layout.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if layout.te_norms else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if layout.te_norms else "pre_mlp_layernorm.weight"
        out += [
            Rule(m + attn_norm, "replicated", (h + "input_layernorm.weight",)),
            Rule(m + "self_attention.linear_qkv.weight", "qkv",
                 (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight")),
            Rule(m + "self_attention.linear_proj.weight", "columns", (h + "self_attn.o_proj.weight",)),
            Rule(m + mlp_norm, "replicated", (h + "post_attention_layernorm.weight",)),
            Rule(m + "mlp.linear_fc1.weight", "fc1", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")),
            Rule(m + "mlp.linear_fc2.weight", "columns", (h + "mlp.down_proj.weight",)),
        ]
    out.append(Rule("decoder.final_layernorm.weight", "replicated", ("model.norm.weight",)))
    if not layout.tied:
        out.append(Rule("output_layer.weight", "vocab", ("lm_head.weight",)))
    return out


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"HF tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")


def megatron_shard(rule: Rule, get: Callable[[str], torch.Tensor], layout: Layout,
                   tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP-rank `tp_rank` shard of megatron parameter `rule.megatron`, built from HF tensors."""
    L, h = layout, layout.hidden_size
    tensors = [get(name) for name in rule.hf]
    if rule.kind == "replicated":
        _check_shape(rule.hf[0], tensors[0], (h,))
        return tensors[0]
    if rule.kind == "vocab":
        (weight,) = tensors
        _check_shape(rule.hf[0], weight, (L.vocab_size, h))
        padded = weight.new_zeros((L.padded_vocab_size, h))
        padded[: L.vocab_size] = weight
        return padded.chunk(tp_size, dim=0)[tp_rank]
    if rule.kind == "columns":
        (weight,) = tensors
        return weight.chunk(tp_size, dim=1)[tp_rank]
    if rule.kind == "qkv":
        q, k, v = tensors
        per_group = L.num_heads // L.num_groups
        _check_shape(rule.hf[0], q, (L.num_heads * L.head_dim, h))
        _check_shape(rule.hf[1], k, (L.num_groups * L.head_dim, h))
        _check_shape(rule.hf[2], v, (L.num_groups * L.head_dim, h))
        fused = torch.cat([
            q.reshape(L.num_groups, per_group * L.head_dim, h),
            k.reshape(L.num_groups, L.head_dim, h),
            v.reshape(L.num_groups, L.head_dim, h),
        ], dim=1)  # [groups, (per_group + 2) · head_dim, h]: per group its queries, key, value
        return fused.chunk(tp_size, dim=0)[tp_rank].reshape(-1, h)
    if rule.kind == "fc1":
        gate, up = tensors
        _check_shape(rule.hf[0], gate, (L.ffn_size, h))
        _check_shape(rule.hf[1], up, (L.ffn_size, h))
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise AssertionError(rule.kind)


def hf_tensors(rule: Rule, shards: list[torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of megatron_shard: the HF tensors of one megatron parameter from all its TP shards (rank order)."""
    L, h = layout, layout.hidden_size
    if rule.kind == "replicated":
        return {rule.hf[0]: shards[0]}
    if rule.kind == "vocab":
        return {rule.hf[0]: torch.cat(shards, dim=0)[: L.vocab_size]}
    if rule.kind == "columns":
        return {rule.hf[0]: torch.cat(shards, dim=1)}
    if rule.kind == "qkv":
        per_group = L.num_heads // L.num_groups
        fused = torch.cat(shards, dim=0).reshape(L.num_groups, (per_group + 2) * L.head_dim, h)
        q, k, v = fused.split([per_group * L.head_dim, L.head_dim, L.head_dim], dim=1)
        return {rule.hf[0]: q.reshape(-1, h), rule.hf[1]: k.reshape(-1, h), rule.hf[2]: v.reshape(-1, h)}
    if rule.kind == "fc1":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return {rule.hf[0]: torch.cat([g for g, _ in halves], dim=0),
                rule.hf[1]: torch.cat([u for _, u in halves], dim=0)}
    raise AssertionError(rule.kind)


def hf_to_megatron_state(hf_state: Mapping[str, torch.Tensor], layout: Layout, tp_rank: int,
                         tp_size: int) -> dict[str, torch.Tensor]:
    """Megatron state dict (this TP rank's shards) from a full HF state dict."""
    get = _getter(hf_state)
    return {rule.megatron: megatron_shard(rule, get, layout, tp_rank, tp_size).contiguous()
            for rule in rules(layout)}


def megatron_to_hf_state(shards: list[Mapping[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """Full HF state dict from the megatron state dicts of every TP rank (in rank order)."""
    out = {}
    for rule in rules(layout):
        out.update(hf_tensors(rule, [shard[rule.megatron] for shard in shards], layout))
    return out


def _getter(hf_state: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        try:
            return hf_state[name]
        except KeyError:
            raise KeyError(f"HF checkpoint has no tensor {name!r}") from None

    return get


class HFWeights(Mapping):
    """Lazy read-only view of an HF checkpoint folder: tensors are read from disk one at a time.

    Reads *.safetensors (single file or index) and, failing that, pytorch_model*.bin with weights_only=True.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for file in files:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        self._where[key] = file
        else:
            for file in sorted(self.folder.glob("pytorch_model*.bin")):
                for key in self._load_bin(file):
                    self._where[key] = file
        if not self._where:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {self.folder}")

    def _load_bin(self, file: Path) -> dict:
        if file not in self._bin_cache:
            self._bin_cache[file] = torch.load(file, map_location="cpu", weights_only=True)
        return self._bin_cache[file]

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._where[key]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)
        return self._load_bin(file)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _model_layout(model) -> Layout:
    from rpo.models.gpt import model_info

    info = model_info(model)
    return Layout.from_hf(info.hf_config, info.padded_vocab_size, te_norms=info.uses_te)


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def load_hf_weights(model, hf_weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Copy HF weights (a folder or a state dict) into this rank's shard of `model`, exactly."""
    from rpo.models.gpt import unwrap

    gpt = unwrap(model)
    layout = _model_layout(gpt)
    if not isinstance(hf_weights, Mapping):
        hf_weights = HFWeights(hf_weights)
    tp_rank, tp_size = _tp_rank_size()
    params = dict(gpt.named_parameters())
    expected = {rule.megatron for rule in rules(layout)}
    if set(params) != expected:
        raise ValueError(f"model parameters do not match the HF layout: only in model "
                         f"{sorted(set(params) - expected)}, only in mapping {sorted(expected - set(params))}")
    get = _getter(hf_weights)
    with torch.no_grad():
        for rule in rules(layout):
            param = params[rule.megatron]
            shard = megatron_shard(rule, get, layout, tp_rank, tp_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{rule.megatron}: HF gives shard {tuple(shard.shape)}, model has "
                                 f"{tuple(param.shape)}")
            param.copy_(shard)


def iter_hf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on CPU) for every weight, gathered over the TP group.

    Collective: every rank of the TP group must iterate it to the end.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rpo.models.gpt import unwrap

    gpt = unwrap(model)
    layout = _model_layout(gpt)
    params = dict(gpt.named_parameters())
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    for rule in rules(layout):
        local = params[rule.megatron].detach().contiguous()
        if tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local, group=group)
        else:
            shards = [local]
        for name, tensor in hf_tensors(rule, [s.cpu() for s in shards], layout).items():
            yield name, tensor.contiguous()


def gather_hf_state(model) -> dict[str, torch.Tensor]:
    """Full HF state dict (CPU tensors) on every TP rank. Collective over the TP group."""
    return dict(iter_hf_tensors(model))


def clean_hf_config(hf_config, dtype: torch.dtype | None = None):
    """A copy of the config fit for a plain safetensors folder (no GGUF/quantisation leftovers)."""
    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is not None:
        config.dtype = dtype  # transformers ≥ 5 name (torch_dtype is its deprecated alias); "dtype" in config.json
    return config


def copy_tokenizer_files(source, folder: Path) -> list[str]:
    """Copy tokenizer files from a folder, or save a tokenizer object, into `folder`. Returns what was written."""
    if source is None:
        return []
    if hasattr(source, "save_pretrained"):
        return [Path(p).name for p in source.save_pretrained(folder)]
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"tokenizer source {source} is not a folder")
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    if not any(name.startswith("tokenizer") or name in ("vocab.json",) for name in copied):
        logger.warning("no tokenizer files found in %s; %s has weights and config only", source, folder)
    return copied


def write_hf_folder(tensors: Iterator[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], hf_config,
                    out_dir: str | os.PathLike, tokenizer_src=None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Write an HF folder (safetensors + config.json + tokenizer files) atomically: temp folder, then rename.

    Tied embeddings: lm_head.weight is not written (transformers re-ties it). Shards above max_shard_bytes get
    an index file, as save_pretrained writes them.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # Shards are flushed as they fill, so at most one shard's tensors are held in memory.
        written: list[tuple[Path, list[str], int]] = []
        shard: dict[str, torch.Tensor] = {}
        size = 0
        written_dtype = dtype

        def flush():
            part = tmp / f"part-{len(written):05d}.safetensors"
            save_file(shard, part, metadata={"format": "pt"})
            written.append((part, list(shard), size))

        for name, tensor in items:
            if tied and name == "lm_head.weight":
                continue
            tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
            written_dtype = written_dtype or tensor.dtype
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = tensor
            size += nbytes
        flush()
        shard = {}
        if len(written) == 1:
            os.rename(written[0][0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (part, names, _) in enumerate(written, start=1):
                file = f"model-{i:05d}-of-{len(written):05d}.safetensors"
                os.rename(part, tmp / file)
                weight_map.update({name: file for name in names})
            total = sum(nbytes for _, _, nbytes in written)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        clean_hf_config(hf_config, written_dtype).save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_src, tmp)
        if out_dir.exists():
            # Replace an older export: move it aside first so the new folder appears in one rename.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_hf(model, hf_config, out_dir: str | os.PathLike, tokenizer_src=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path | None:
    """Gather the TP shards of `model` and write an HF folder that transformers.AutoModelForCausalLM loads.

    Collective: every rank calls it. The first data-parallel replica gathers; global rank 0 writes (other ranks
    return None after a barrier). Weights are written in the model's dtype (model_info(model).dtype).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rpo.models.gpt import model_info

    writer = (not dist.is_initialized()) or dist.get_rank() == 0
    out = None
    if parallel_state.get_data_parallel_rank() == 0:
        tensors = iter_hf_tensors(model)
        if writer:
            # One dtype for the whole folder: megatron's local-spec norms keep fp32 weights in a bf16 model.
            out = write_hf_folder(tensors, hf_config, out_dir, tokenizer_src, max_shard_bytes,
                                  dtype=model_info(model).dtype)
        else:
            for _ in tensors:  # take part in the TP gathers without keeping anything
                pass
    if dist.is_initialized():
        dist.barrier()
    return out
