"""Mixture-of-experts pieces around megatron-core's MoE layer: the router's load-balancing loss as transformers
defines it, and its wiring into rpo's forwards and the trainer's backward.

The loss is transformers' `load_balancing_loss_func` (Mixtral, Qwen3-MoE): over the L MoE layers and the N real
tokens of one forward (padding excluded),

    f_e = Σ_l #(tokens whose top-k includes e in layer l) / (L·N),   P_e = Σ_l Σ_t softmax(router logits)_te / (L·N)
    load_balancing_loss = E · Σ_e f_e · P_e,          added to the training loss × router_aux_loss_coef.

megatron-core's own aux losses are not used (`moe_router_load_balancing_type="none"`): they are per layer and
divided by top-k, so with the config's coefficient they would be a different loss. f is pooled over all layers,
so a layer's gradient, coeff · E · f_e / (L·N) per token and expert, is only known once every layer has routed.
As megatron's MoEAuxLossAutoScaler does for its losses, the gradient is injected in backward: each router's
probabilities pass through `_InjectBalancingGrad`, whose backward adds the loss's gradient with respect to that
layer's router softmax. So the loss reaches the weights through any backward of the model's output — the
trainer's, the two-pass contrast's second pass — and through megatron's activation recomputation (the router runs
again in backward and re-attaches it; the counts recorded in the forward are complete by then).

`backward_scale` (set by the trainer for each micro-batch) weights the loss like the micro-batch's share of the
global batch, as the separable part of the preference loss is weighted (rows · W / rows_global): after megatron
DDP's gradient averaging the step's gradient is that of the row-weighted mean of the micro-batches' losses.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter


class LoadBalancing:
    """The load-balancing loss of one model's latest forward (one object per model, shared by its routers).

    With sequence parallelism each tensor-parallel rank routes its shard of the sequence: the counts and the
    number of real tokens are summed over the TP group (once per forward, when first needed), and each rank's
    backward adds the gradient of its own tokens (megatron's finalize_model_grads then sums the router weight's
    gradients over the group, as for every sequence-parallel weight).
    """

    def __init__(self, num_experts: int, top_k: int, coeff: float, num_layers: int, tp_group=None):
        self.num_experts, self.top_k, self.coeff, self.num_layers = num_experts, top_k, float(coeff), num_layers
        self.tp_group = tp_group  # set with sequence parallelism: the counts are partial per rank
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
        """(Σ_l counts, Σ_l probability sums, real tokens) of this forward, over the TP group with sequence
        parallelism; computed once per forward."""
        if self._totals is None:
            if len(self._counts) != self.num_layers:
                raise RuntimeError(f"load-balancing loss: {len(self._counts)} of {self.num_layers} MoE layers "
                                   f"routed in this forward")
            totals = torch.cat([sum(self._counts.values()), sum(self._prob_sums.values()),
                                self._valid_count.reshape(1).float()])
            if self.tp_group is not None and self.tp_group.size() > 1:
                import torch.distributed as dist

                dist.all_reduce(totals, group=self.tp_group)
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
    tp_group = parallel_state.get_tensor_model_parallel_group() if gpt.config.sequence_parallel else None
    balance = LoadBalancing(num_experts, top_k, coeff, num_layers=len(routers), tp_group=tp_group)
    for router in routers:
        router.balance = balance
    gpt.rpo_load_balancing = balance
    return balance


def load_balancing(model) -> Optional[LoadBalancing]:
    """The model's LoadBalancing (through megatron's wrappers), None for a dense model."""
    from rpo.models.gpt import unwrap

    return getattr(unwrap(model), "rpo_load_balancing", None)
