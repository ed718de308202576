"""Hugging Face weights ↔ megatron-core GPTModel weights, sharded for any tensor- and expert-parallel size.

The mapping is written once here and used both ways, for every family of rpo.models.architectures. (Megatron-
Bridge 0.3.1 does not install on this stack: it pins transformers < 5 and megatron-core[dev,mlm], whose
mamba-ssm and transformer-engine need CUDA builds.)

| HF (layer i: model.layers.i.) | megatron-core (layer i: decoder.layers.i.; local spec, TE spec in brackets) | TP sharding |
| --- | --- | --- |
| model.embed_tokens.weight [V, h] | embedding.word_embeddings.weight | rows, vocab padded to V_p with zeros |
| lm_head.weight (untied only) | output_layer.weight | rows, padded like the embedding |
| input_layernorm.weight | input_layernorm.weight [self_attention.linear_qkv.layer_norm_weight] | replicated |
| self_attn.{q,k,v}_proj.weight | self_attention.linear_qkv.weight | rows, whole query groups |
| self_attn.{q,k,v}_proj.bias (Qwen2) | self_attention.linear_qkv.bias | like the weight's rows |
| self_attn.{q,k}_norm.weight (Qwen3, Gemma 3) | self_attention.{q,k}_layernorm.weight | replicated |
| self_attn.o_proj.weight | self_attention.linear_proj.weight | columns |
| post_attention_layernorm.weight | pre_mlp_layernorm.weight [mlp.linear_fc1.layer_norm_weight] | replicated |
| mlp.{gate,up}_proj.weight | mlp.linear_fc1.weight | [gate_r; up_r] per rank |
| mlp.down_proj.weight | mlp.linear_fc2.weight | columns |
| model.norm.weight | decoder.final_layernorm.weight | replicated |

Gemma 3's four norms: input_layernorm → input_layernorm, post_attention_layernorm →
self_attention.linear_proj.post_norm, pre_feedforward_layernorm → pre_mlp_layernorm, post_feedforward_layernorm →
mlp.linear_fc2.post_norm (rpo.models.layers; weights stored as in the checkpoint, the norm applies 1 + w).

Mixture of experts (e: global expert index; megatron's layer holds experts ep_rank · E/EP + j as local j):
| Mixtral: block_sparse_moe. / Qwen3-MoE: mlp. | megatron-core | sharding |
| --- | --- | --- |
| gate.weight [E, h] | mlp.router.weight | replicated |
| experts.e.{w1,w3}.weight / experts.e.{gate,up}_proj.weight | mlp.experts.local_experts.j.linear_fc1.weight | [gate_r; up_r] over the expert-TP group |
| experts.e.w2.weight / experts.e.down_proj.weight | mlp.experts.local_experts.j.linear_fc2.weight | columns over the expert-TP group |
These are the names Hugging Face checkpoints use on disk (transformers ≥ 5 fuses the experts in memory and
converts on load and save).

The two traps: the fused QKV weight is grouped per KV group (for each group: its query heads, then its key
head, then its value head) and a TP rank holds a contiguous block of whole groups; the SwiGLU fc1 of a TP rank
is [its rows of gate; its rows of up], not a shard of [gate; up]. HF's rotate-half RoPE equals megatron's
non-interleaved RoPE, so no row permutation is needed.
"""
from __future__ import annotations

import copy
import dataclasses
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
    """Shapes and names that the mapping needs, from an HF config plus the megatron vocabulary padding and the
    expert-parallel rank."""

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
    model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # Gemma 3: norms after attention and MLP
    num_experts: int = 0  # 0: a dense MLP
    expert_ffn_size: int = 0
    ep_rank: int = 0
    ep_size: int = 1

    @classmethod
    def from_hf(cls, hf_config, padded_vocab_size: int, te_norms: bool = False, ep_rank: int = 0,
                ep_size: int = 1) -> "Layout":
        from rpo.models.architectures import architecture

        arch = architecture(hf_config)
        return cls(
            num_layers=arch.num_layers, num_heads=arch.num_heads, num_groups=arch.num_kv_heads,
            head_dim=arch.head_dim, hidden_size=arch.hidden_size, ffn_size=arch.ffn_hidden_size,
            vocab_size=arch.vocab_size, padded_vocab_size=padded_vocab_size, tied=arch.tied_embeddings,
            te_norms=te_norms, model_type=arch.model_type, qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm,
            post_norms=arch.post_norms, num_experts=arch.moe.num_experts if arch.moe else 0,
            expert_ffn_size=arch.moe.ffn_hidden_size if arch.moe else 0, ep_rank=ep_rank, ep_size=ep_size,
        )

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size


@dataclass(frozen=True)
class Rule:
    megatron: str
    kind: str  # "replicated", "vocab", "qkv", "qkv_bias", "fc1", "columns"
    hf: tuple[str, ...]
    shape: tuple[int, ...] | None = None  # replicated: the tensor's shape; fc1: (rows of gate and of up,)
    expert: tuple[int, int] | None = None  # (layer, local expert j): sharded over the expert TP / EP groups


def _expert_prefix(layout: Layout, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if layout.model_type == "mixtral" else "mlp.")


def expert_rules(layout: Layout, layer: int, local: int, ep_rank: int | None = None) -> list[Rule]:
    """The two megatron parameters of local expert `local` of `layer` on expert-parallel rank `ep_rank` (default
    the layout's), from the HF tensors of global expert ep_rank · E/EP + local."""
    ep_rank = layout.ep_rank if ep_rank is None else ep_rank
    e = ep_rank * layout.local_experts + local
    hf = _expert_prefix(layout, layer) + f"experts.{e}."
    gate, up, down = (("w1", "w3", "w2") if layout.model_type == "mixtral"
                      else ("gate_proj", "up_proj", "down_proj"))
    m = f"decoder.layers.{layer}.mlp.experts.local_experts.{local}."
    return [Rule(m + "linear_fc1.weight", "fc1", (hf + f"{gate}.weight", hf + f"{up}.weight"),
                 shape=(layout.expert_ffn_size,), expert=(layer, local)),
            Rule(m + "linear_fc2.weight", "columns", (hf + f"{down}.weight",), expert=(layer, local))]


def rules(layout: Layout) -> list[Rule]:
    """Every megatron parameter of this rank and the HF tensors it is made of."""
    h, d = layout.hidden_size, layout.head_dim
    out = [Rule("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",))]
    for i in range(layout.num_layers):
        m, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if layout.te_norms else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if layout.te_norms else "pre_mlp_layernorm.weight"
        qkv = (hf + "self_attn.q_proj.weight", hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight")
        out += [Rule(m + attn_norm, "replicated", (hf + "input_layernorm.weight",), shape=(h,)),
                Rule(m + "self_attention.linear_qkv.weight", "qkv", qkv)]
        if layout.qkv_bias:
            out.append(Rule(m + "self_attention.linear_qkv.bias", "qkv_bias",
                            tuple(name.replace(".weight", ".bias") for name in qkv)))
        if layout.qk_norm:
            out += [Rule(m + "self_attention.q_layernorm.weight", "replicated", (hf + "self_attn.q_norm.weight",),
                         shape=(d,)),
                    Rule(m + "self_attention.k_layernorm.weight", "replicated", (hf + "self_attn.k_norm.weight",),
                         shape=(d,))]
        out.append(Rule(m + "self_attention.linear_proj.weight", "columns", (hf + "self_attn.o_proj.weight",)))
        if layout.post_norms:
            out += [Rule(m + "self_attention.linear_proj.post_norm.weight", "replicated",
                         (hf + "post_attention_layernorm.weight",), shape=(h,)),
                    Rule(m + mlp_norm, "replicated", (hf + "pre_feedforward_layernorm.weight",), shape=(h,)),
                    Rule(m + "mlp.linear_fc2.post_norm.weight", "replicated",
                         (hf + "post_feedforward_layernorm.weight",), shape=(h,))]
        else:
            out.append(Rule(m + mlp_norm, "replicated", (hf + "post_attention_layernorm.weight",), shape=(h,)))
        if layout.num_experts:
            out.append(Rule(m + "mlp.router.weight", "replicated", (_expert_prefix(layout, i) + "gate.weight",),
                            shape=(layout.num_experts, h)))
            for j in range(layout.local_experts):
                out += expert_rules(layout, i, j)
        else:
            out += [Rule(m + "mlp.linear_fc1.weight", "fc1", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                         shape=(layout.ffn_size,)),
                    Rule(m + "mlp.linear_fc2.weight", "columns", (hf + "mlp.down_proj.weight",))]
    out.append(Rule("decoder.final_layernorm.weight", "replicated", ("model.norm.weight",), shape=(h,)))
    if not layout.tied:
        out.append(Rule("output_layer.weight", "vocab", ("lm_head.weight",)))
    return out


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"HF tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[groups, (per_group + 2) · head_dim, ...]: per KV group its query heads, its key, its value."""
    L = layout
    per_group = L.num_heads // L.num_groups
    tail = q.shape[1:]
    return torch.cat([q.reshape(L.num_groups, per_group * L.head_dim, *tail),
                      k.reshape(L.num_groups, L.head_dim, *tail),
                      v.reshape(L.num_groups, L.head_dim, *tail)], dim=1)


def megatron_shard(rule: Rule, get: Callable[[str], torch.Tensor], layout: Layout,
                   tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP-rank `tp_rank` shard of megatron parameter `rule.megatron`, built from HF tensors (expert rules:
    the expert-TP rank and size)."""
    L, h = layout, layout.hidden_size
    tensors = [get(name) for name in rule.hf]
    if rule.kind == "replicated":
        _check_shape(rule.hf[0], tensors[0], rule.shape or (h,))
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
    if rule.kind in ("qkv", "qkv_bias"):
        q, k, v = tensors
        tail = (h,) if rule.kind == "qkv" else ()
        _check_shape(rule.hf[0], q, (L.num_heads * L.head_dim, *tail))
        _check_shape(rule.hf[1], k, (L.num_groups * L.head_dim, *tail))
        _check_shape(rule.hf[2], v, (L.num_groups * L.head_dim, *tail))
        return _fuse_qkv(q, k, v, L).chunk(tp_size, dim=0)[tp_rank].reshape(-1, *tail)
    if rule.kind == "fc1":
        gate, up = tensors
        rows = rule.shape[0] if rule.shape else L.ffn_size
        _check_shape(rule.hf[0], gate, (rows, h))
        _check_shape(rule.hf[1], up, (rows, h))
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
    if rule.kind in ("qkv", "qkv_bias"):
        tail = (h,) if rule.kind == "qkv" else ()
        per_group = L.num_heads // L.num_groups
        fused = torch.cat(shards, dim=0).reshape(L.num_groups, (per_group + 2) * L.head_dim, *tail)
        q, k, v = fused.split([per_group * L.head_dim, L.head_dim, L.head_dim], dim=1)
        return {rule.hf[0]: q.reshape(-1, *tail), rule.hf[1]: k.reshape(-1, *tail),
                rule.hf[2]: v.reshape(-1, *tail)}
    if rule.kind == "fc1":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return {rule.hf[0]: torch.cat([g for g, _ in halves], dim=0),
                rule.hf[1]: torch.cat([u for _, u in halves], dim=0)}
    raise AssertionError(rule.kind)


def hf_to_megatron_state(hf_state: Mapping[str, torch.Tensor], layout: Layout, tp_rank: int,
                         tp_size: int) -> dict[str, torch.Tensor]:
    """Megatron state dict (this TP rank's shards; experts: the layout's EP rank's) from a full HF state dict."""
    get = _getter(hf_state)
    return {rule.megatron: megatron_shard(rule, get, layout, tp_rank, tp_size).contiguous()
            for rule in rules(layout)}


def megatron_to_hf_state(shards: list[Mapping[str, torch.Tensor]], layout: Layout,
                         expert_shards: list[list[Mapping[str, torch.Tensor]]] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Full HF state dict from the megatron state dicts of every TP rank (in rank order). With expert
    parallelism, `expert_shards[r]` are EP rank r's TP-rank state dicts (default: `shards` holds every expert)."""
    out = {}
    for rule in rules(dataclasses.replace(layout, ep_rank=0)):
        if rule.expert is None or expert_shards is None:
            out.update(hf_tensors(rule, [shard[rule.megatron] for shard in shards], layout))
            continue
        for ep_rank, ep_shards in enumerate(expert_shards):
            for other in expert_rules(layout, *rule.expert, ep_rank=ep_rank):
                if other.megatron == rule.megatron:
                    out.update(hf_tensors(other, [shard[other.megatron] for shard in ep_shards], layout))
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
    from megatron.core import parallel_state

    from rpo.models.gpt import model_info

    info = model_info(model)
    ep_size = parallel_state.get_expert_model_parallel_world_size() if info.expert_parallel > 1 else 1
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep_size > 1 else 0
    return Layout.from_hf(info.hf_config, info.padded_vocab_size, te_norms=info.uses_te, ep_rank=ep_rank,
                          ep_size=ep_size)


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _shard_rank_size(rule: Rule) -> tuple[int, int]:
    """(rank, size) of the group a rule's parameter is sharded over: tensor parallel, or expert tensor parallel."""
    from megatron.core import parallel_state

    if rule.expert is None:
        return _tp_rank_size()
    return (parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size())


def load_hf_weights(model, hf_weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Copy HF weights (a folder or a state dict) into this rank's shard of `model`, exactly."""
    from rpo.models.gpt import unwrap

    gpt = unwrap(model)
    layout = _model_layout(gpt)
    if not isinstance(hf_weights, Mapping):
        hf_weights = HFWeights(hf_weights)
    params = dict(gpt.named_parameters())
    expected = {rule.megatron for rule in rules(layout)}
    if set(params) != expected:
        raise ValueError(f"model parameters do not match the HF layout: only in model "
                         f"{sorted(set(params) - expected)}, only in mapping {sorted(expected - set(params))}")
    get = _getter(hf_weights)
    with torch.no_grad():
        for rule in rules(layout):
            param = params[rule.megatron]
            shard = megatron_shard(rule, get, layout, *_shard_rank_size(rule))
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{rule.megatron}: HF gives shard {tuple(shard.shape)}, model has "
                                 f"{tuple(param.shape)}")
            param.copy_(shard)


def _all_gather(local: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    import torch.distributed as dist

    if size == 1:
        return [local]
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local, group=group)
    return gathered


def iter_hf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on CPU) for every weight, gathered over the TP group (experts: over the expert-TP and
    expert-parallel groups).

    Collective: every rank of the TP group (and, with expert parallelism, of the expert-parallel group) must
    iterate it to the end.
    """
    from megatron.core import parallel_state

    from rpo.models.gpt import unwrap

    gpt = unwrap(model)
    layout = _model_layout(gpt)
    params = dict(gpt.named_parameters())
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for rule in rules(layout):
        local = params[rule.megatron].detach().contiguous()
        if rule.expert is None:
            shards = _all_gather(local, tp_size, tp_group)
            for name, tensor in hf_tensors(rule, [s.cpu() for s in shards], layout).items():
                yield name, tensor.contiguous()
            continue
        etp_size = parallel_state.get_expert_tensor_parallel_world_size()
        shards = _all_gather(local, etp_size, parallel_state.get_expert_tensor_parallel_group())
        full = torch.cat(shards, dim=0 if rule.kind == "fc1" else 1)  # this rank's expert, every ETP shard
        by_ep_rank = _all_gather(full, layout.ep_size, parallel_state.get_expert_model_parallel_group()
                                 if layout.ep_size > 1 else None)
        for ep_rank, tensor in enumerate(by_ep_rank):
            other = next(r for r in expert_rules(layout, *rule.expert, ep_rank=ep_rank)
                         if r.megatron == rule.megatron)
            split = list(tensor.cpu().chunk(etp_size, dim=0 if rule.kind == "fc1" else 1))
            for name, value in hf_tensors(other, split, layout).items():
                yield name, value.contiguous()


def gather_hf_state(model) -> dict[str, torch.Tensor]:
    """Full HF state dict (CPU tensors) on every rank. Collective over the TP (and expert-parallel) group."""
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

    Collective: every rank calls it. The first data-parallel replica gathers (with expert parallelism every rank,
    as the experts are spread over data-parallel ranks); global rank 0 writes (other ranks return None after a
    barrier). Weights are written in the model's dtype (model_info(model).dtype).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rpo.models.gpt import model_info

    writer = (not dist.is_initialized()) or dist.get_rank() == 0
    out = None
    if parallel_state.get_data_parallel_rank() == 0 or model_info(model).expert_parallel > 1:
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
