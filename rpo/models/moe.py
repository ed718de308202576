"""Mixture-of-experts pieces around megatron-core's MoE layer: the router's load-balancing loss as transformers
defines it, and its wiring into rpo's forwards and the trainer's backward.

The loss is transformers' `load_balancing_loss_func` (Mixtral, Qwen3-MoE): over the L MoE layers and the N real
tokens of one forward (padding excluded),

    f_e = Σ_l #(tokens whose top-k includes e in layer l) / (L·N),   P_e = Σ_l Σ_t softmax(router logits)_te / (L·N)
    load_balancing_loss = E · Σ_e f_e · P_e,          added to the training loss × router_aux_loss_coef.

The tokens are those of the forward on every data-parallel rank together (the counts are summed over the DP
group, and over the TP group with sequence parallelism, where each TP rank routes a shard of the sequence): the
loss is transformers' on the whole micro-batch, whatever the layout (TP, DP, EP), as if one process had run it.

megatron-core's own aux losses are not used (`moe_router_load_balancing_type="none"`): they are per layer and
divided by top-k, so with the config's coefficient they would be a different loss. f is pooled over all layers,
so a layer's gradient, coeff · E · f_e / (L·N) per token and expert, is only known once every layer has routed.
As megatron's MoEAuxLossAutoScaler does for its losses, the gradient is injected in backward: each router's
probabilities pass through `_InjectBalancingGrad`, whose backward adds the loss's gradient with respect to that
layer's router softmax. So the loss reaches the weights through any backward of the model's output — the
trainer's, the two-pass contrast's second pass — and through megatron's activation recomputation (the router runs
again in backward and re-attaches it; the counts recorded in the forward are complete by then). The reduction
over the DP group happens once per forward, at the first backward or `loss()`: every rank of the group must run
them (the trainer does).

`backward_scale` (set by the trainer for each micro-batch: W / A for W data-parallel ranks and A micro-batches)
makes the step's gradient, after megatron DDP's averaging over W, that of the mean of the micro-batches' losses.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter


class LoadBalancing:
    """The load-balancing loss of one model's latest forward (one object per model, shared by its routers).

    The counts, probability sums and number of real tokens are summed over `reduce_group` (the ranks holding the
    forward's tokens: data parallel, × tensor parallel with sequence parallelism) once per forward, when first
    needed; each rank's backward adds the gradient through its own tokens (megatron DDP then averages over DP,
    and finalize_model_grads sums the router weight's gradients over TP with sequence parallelism, as for every
    sequence-parallel weight).
    """

    def __init__(self, num_experts: int, top_k: int, coeff: float, num_layers: int, reduce_group=None):
        self.num_experts, self.top_k, self.coeff, self.num_layers = num_experts, top_k, float(coeff), num_layers
        self.reduce_group = reduce_group
        self.backward_scale = 1.0
        self._valid: Optional[torch.Tensor] = None  # [N'] float, 1 for a real token, in megatron's [s, b] order
        self._counts: dict[int, torch.Tensor] = {}
        self._prob_sums: dict[int, torch.Tensor] = {}
        self._totals: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def active(self) -> bool:
        return self.coeff > 0

    def begin(self, token_mask: Optional[torch.Tensor]) -> None:
        """A forward starts: token_mask [s, b] bool, this rank's tokens (True = real; None = all real)."""
        self._valid = None if token_mask is None else token_mask.reshape(-1).float()
        self._counts, self._prob_sums, self._totals = {}, {}, None

    def record(self, layer: int, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Called by each router in training mode: keep this layer's counts and probability sums, return `probs`
        carrying the loss's gradient."""
        logits = logits.reshape(-1, self.num_experts)
        valid = self._valid
        if valid is None:
            valid = torch.ones(logits.shape[0], device=logits.device)
        if valid.numel() != logits.shape[0]:
            raise RuntimeError(f"load-balancing loss: the router saw {logits.shape[0]} tokens, the forward's token "
                               f"mask has {valid.numel()}")
        valid = valid.to(logits.device)
        scores = torch.softmax(logits.float(), dim=-1)
        with torch.no_grad():
            selected = torch.topk(scores, self.top_k, dim=-1).indices
            self._counts[layer] = torch.zeros(self.num_experts, device=logits.device).index_add_(
                0, selected.reshape(-1), valid.repeat_interleave(self.top_k))
            self._prob_sums[layer] = (scores * valid[:, None]).sum(dim=0)
            self._valid_count = valid.sum()
        if torch.is_grad_enabled() and scores.requires_grad:
            probs = _InjectBalancingGrad.apply(probs, scores, valid, self)
        return probs

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ_l counts, Σ_l probability sums, real tokens) of this forward over `reduce_group`; computed once
        per forward (a collective: every rank of the group calls it)."""
        if self._totals is None:
            if len(self._counts) != self.num_layers:
                raise RuntimeError(f"load-balancing loss: {len(self._counts)} of {self.num_layers} MoE layers "
                                   f"routed in this forward")
            totals = torch.cat([sum(self._counts.values()), sum(self._prob_sums.values()),
                                self._valid_count.reshape(1).float()])
            if self.reduce_group is not None and self.reduce_group.size() > 1:
                import torch.distributed as dist

                dist.all_reduce(totals, group=self.reduce_group)
            e = self.num_experts
            self._totals = (totals[:e], totals[e:2 * e], totals[2 * e].clamp(min=1))
        return self._totals

    def token_fraction(self) -> torch.Tensor:
        """f_e: the share of top-k assignments per expert over all layers and real tokens."""
        counts, _, tokens = self._reduced()
        return counts / (self.num_layers * tokens)

    def loss(self) -> Optional[torch.Tensor]:
        """transformers' load_balancing_loss_func of the latest training forward (detached), None if none ran."""
        if not self._counts:
            return None
        _, prob_sums, tokens = self._reduced()
        probability = prob_sums / (self.num_layers * tokens)
        return self.num_experts * (self.token_fraction() * probability).sum()

    def metrics(self) -> dict:
        """The latest training forward's loss for the run's log ({} for none)."""
        loss = self.loss()
        if loss is None:
            return {}
        return {"moe/load_balancing_loss": float(loss), "moe/aux_loss": self.coeff * float(loss)}


class _InjectBalancingGrad(torch.autograd.Function):
    """Identity on the router probabilities; backward adds ∂(coeff · loss · scale)/∂softmax to `scores`."""

    @staticmethod
    def forward(ctx, probs, scores, valid, balance):
        ctx.balance = balance
        ctx.save_for_backward(valid)
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad_probs):
        (valid,) = ctx.saved_tensors
        balance = ctx.balance
        _, _, tokens = balance._reduced()
        per_token = balance.coeff * balance.backward_scale * balance.num_experts / (balance.num_layers * tokens)
        grad_scores = per_token * balance.token_fraction()[None, :] * valid[:, None]
        return grad_probs, grad_scores, None, None


class LoadBalancedRouter(TopKRouter):
    """megatron-core's TopKRouter whose routing also records transformers' load-balancing loss (see module doc)."""

    balance: Optional[LoadBalancing] = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """The router logits, x·Wᵀ (transformers' F.linear), in the config's router dtype.

        megatron-core 0.16.1's own gating (moe_utils.RouterGatingLinearFunction) names `te_general_gemm`, which
        exists only when Transformer Engine imports: without TE it raises NameError. The product is the same.
        """
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(input.to(dtype), self.weight.to(dtype), bias)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training and self.balance is not None and self.balance.active:
            probs = self.balance.record(self.layer_number, logits, probs)
        return probs, routing_map


def attach_load_balancing(gpt, num_experts: int, top_k: int, coeff: float) -> LoadBalancing:
    """One LoadBalancing for every LoadBalancedRouter of `gpt` (kept as `gpt.rpo_load_balancing`)."""
    from megatron.core import parallel_state

    routers = [m for m in gpt.modules() if isinstance(m, LoadBalancedRouter)]
    if not routers:
        raise ValueError("this model has no LoadBalancedRouter (build it with rpo.models.build_gpt_model)")
    # The ranks whose tokens make up one forward's micro-batch: the DP group (TP ranks hold the same tokens), or
    # with sequence parallelism TP × DP (each TP rank holds a shard of the sequence).
    reduce_group = (parallel_state.get_tensor_and_data_parallel_group() if gpt.config.sequence_parallel
                    else parallel_state.get_data_parallel_group())
    balance = LoadBalancing(num_experts, top_k, coeff, num_layers=len(routers), reduce_group=reduce_group)
    for router in routers:
        router.balance = balance
    gpt.rpo_load_balancing = balance
    return balance


def load_balancing(model) -> Optional[LoadBalancing]:
    """The model's LoadBalancing (through megatron's DDP / Float16Module wrappers), None for a dense model."""
    inner = model
    while getattr(inner, "rpo_load_balancing", None) is None and hasattr(inner, "module"):
        inner = inner.module
    return getattr(inner, "rpo_load_balancing", None)


class _NoRouterLoss:
    """What `weight_router_loss` returns for a dense model."""

    @staticmethod
    def metrics() -> dict:
        return {}


def weight_router_loss(model, weight: float):
    """Weight the router loss of `model`'s next training forward's backward by `weight` (the trainer's
    micro-batch weight); returns the model's LoadBalancing (or a stand-in for a dense model), whose `metrics()`
    after that forward are the values to log."""
    balance = load_balancing(model)
    if balance is None:
        return _NoRouterLoss()
    balance.backward_scale = float(weight)
    return balance


def _expert_main_params(optimizer) -> set:
    """ids of the parameters a megatron optimizer wrapper steps that belong to expert-parallel experts
    (megatron tags those model parameters `allreduce=False`; a bf16 wrapper's fp32 copies follow their model
    parameter's position)."""
    ids = set()
    pairs = []
    if hasattr(optimizer, "float16_groups"):  # Float16OptimizerWithFloat16Params: model params and fp32 copies
        for model_group, main_group in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            pairs += list(zip(model_group, main_group))
        pairs += [(p, p) for group in optimizer.fp32_from_fp32_groups for p in group]
    else:
        pairs = [(p, p) for p in optimizer.get_parameters()]
    for model_param, main_param in pairs:
        if not getattr(model_param, "allreduce", True):
            ids.add(id(main_param))
    return ids


def expert_parallel_grad_norm(optimizer) -> float:
    """The global gradient L2 norm with expert parallelism: the dense parameters' norm over the model-parallel
    group (tensor-parallel duplicates counted once), plus the experts' over the expert tensor × expert-parallel
    group (each rank's experts are its own), as megatron-core's per-group optimizers compute them."""
    import math

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.transformer.module import param_is_not_shared

    expert_ids = _expert_main_params(optimizer)
    dense, experts = [], []
    expert_tp_group = parallel_state.get_expert_tensor_parallel_group()
    for param in optimizer.get_parameters():
        if param.grad is None or not param_is_not_shared(param):
            continue
        if id(param) in expert_ids:
            if tensor_parallel.param_is_not_tensor_parallel_duplicate(param, expert_tp_group):
                experts.append(param.grad)
        elif tensor_parallel.param_is_not_tensor_parallel_duplicate(param):
            dense.append(param.grad)
    dense_norm = get_grad_norm_fp32(dense, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    expert_norm = get_grad_norm_fp32(
        experts, grad_stats_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float(dense_norm) ** 2 + float(expert_norm) ** 2)
