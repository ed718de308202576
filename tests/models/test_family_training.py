"""`rpo --global-contrast` trains every family through rpo.train.Trainer, exactly as transformers' own backward
would, at TP=2 and TP=1 × DP=2 (mixture of experts: TP=2 with sequence parallelism, and EP=2).

One 2-rank launch of family_training_workers.py runs every case (SGD lr 1, fp32, 2 steps of 4 pairs, plus Mixtral
with two micro-batches per rank, the two-pass contrast). Here, in float64 with transformers' models, from the
batches each rank recorded: the RPO loss (rows normalised, τ = 0.5, β = 0.1, the reference being the starting
policy) of the global batch plus, for MoE models, router_aux_loss_coef × transformers' load_balancing_loss_func
of each micro-batch's tokens over both ranks (the mean over the step's micro-batches). The weights after step 1
must equal θ0 − lr·∇ (1e-5), the logged loss and gradient norm the reference's, and the TP=2 and DP=2 runs must log
the same losses at both steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import family_training_workers as workers
import multirank
from tiny_hf_models import FAMILIES, MOE_FAMILIES, hf_hub_grads

BETA, TAU = 0.1, 0.5
TOLERANCE = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("family-training")
    workers.build_assets(workdir, FAMILIES)
    (workdir / "spec.json").write_text(json.dumps({"families": list(FAMILIES), "moe_families": list(MOE_FAMILIES)}))
    multirank.launch(Path(workers.__file__), 2, args=[workdir], log_dir=workdir / "logs").check()
    return workdir


def _load(workdir: Path, name: str):
    """The run's logged info and, per data-parallel rank, the batches of its steps (at TP=2 the two ranks are
    one DP rank with the same batches)."""
    info = json.loads((workdir / "results" / f"{name}.json").read_text())
    batches = [torch.load(workdir / "results" / f"{name}-batches-rank{r}.pt", weights_only=False) for r in range(2)]
    if "-tp2" in name:  # tp2, tp2sp
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*batches))
        batches = batches[:1]
    return info, batches


def _hf_model(workdir: Path, kind: str):
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": "eager"} if kind in MOE_FAMILIES else {}
    return AutoModelForCausalLM.from_pretrained(workdir / kind, dtype=torch.float64, attn_implementation="eager",
                                                **extra)


def _rpo64(chosen_rewards, rejected_rewards, chosen_embeddings, rejected_embeddings):
    cosine = F.normalize(chosen_embeddings, dim=1) @ F.normalize(rejected_embeddings, dim=1).T
    weights = torch.softmax(-(1 - cosine) / TAU, dim=1)
    return -F.logsigmoid(weights * (chosen_rewards[:, None] - rejected_rewards[None, :])).mean()


def reference_step(model, kind: str, step_batches):
    """(preference loss, load-balancing loss, total) of one step in float64 with transformers' model, from the
    rank batches of that step (one per DP rank, or the one batch at DP=1)."""
    from rpo.data import micro_batches

    moe = kind in MOE_FAMILIES
    chosen, rejected, chosen_emb, rejected_emb = [], [], [], []
    router_logits = {}  # micro-batch index -> per layer, the router logits of every real token of every rank
    for batch in step_batches:
        accumulation = batch["accumulation"]
        for index, mb in enumerate(micro_batches(batch, accumulation)):
            logps = []
            for r in range(mb["input_ids"].shape[0]):
                real = mb["attention_mask"][r].bool()
                ids = mb["input_ids"][r][real][None]
                mask = mb["loss_mask"][r][real]
                out = model(input_ids=ids, output_router_logits=True) if moe else model(input_ids=ids)
                logp = torch.log_softmax(out.logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                logps.append((logp * mask[1:]).sum())
                if moe:
                    layers = [layer.reshape(-1, layer.shape[-1]) for layer in out.router_logits]
                    previous = router_logits.get(index)
                    router_logits[index] = layers if previous is None else [
                        torch.cat([a, b]) for a, b in zip(previous, layers)]
            m = mb["num_chosen"]
            chosen += logps[:m]
            rejected += logps[m:]
            chosen_emb.append(mb["chosen_embeddings"].double())
            rejected_emb.append(mb["rejected_embeddings"].double())
    chosen, rejected = torch.stack(chosen), torch.stack(rejected)
    loss = _rpo64(BETA * (chosen - chosen.detach()), BETA * (rejected - rejected.detach()), torch.cat(chosen_emb),
                  torch.cat(rejected_emb))
    balancing = torch.zeros((), dtype=torch.float64)
    if moe:
        module = __import__(type(model).__module__, fromlist=["load_balancing_loss_func"])
        experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
        balancing = sum(module.load_balancing_loss_func(tuple(layers), experts, model.config.num_experts_per_tok,
                                                        None) for layers in router_logits.values()) / len(router_logits)
    coeff = model.config.router_aux_loss_coef if moe else 0.0
    return loss, balancing, loss + coeff * balancing


def _initial(workdir: Path, kind: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(workdir / kind / "model.safetensors"))


def _check_step_one(workdir: Path, name: str, kind: str) -> dict:
    from safetensors.torch import load_file

    info, batches = _load(workdir, name)
    model = _hf_model(workdir, kind).train()
    loss, balancing, total = reference_step(model, kind, [rank[0] for rank in batches])
    total.backward()
    grads = hf_hub_grads(model, kind)
    before = _initial(workdir, kind)
    after = load_file(str(workdir / "results" / f"{name}-step1.safetensors"))
    assert set(after) == set(before)
    logged = info["history"][0]
    assert logged["loss"] == pytest.approx(loss.item(), abs=1e-6), name
    norm = math.sqrt(sum((g ** 2).sum().item() for n, g in grads.items() if n in after))
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-5), name
    if kind in MOE_FAMILIES:
        assert logged["moe/load_balancing_loss"] == pytest.approx(balancing.item(), abs=1e-6), name
        assert logged["moe/aux_loss"] == pytest.approx(model.config.router_aux_loss_coef * balancing.item(),
                                                       abs=1e-7), name
    moved = 0.0
    for key in after:
        torch.testing.assert_close(after[key], before[key] - workers.trainer_workers.SGD_LR * grads[key].float(),
                                   **TOLERANCE, msg=f"{name} {key}")
        moved = max(moved, (after[key] - before[key]).abs().max().item())
    assert moved > 1e-2
    return {"loss": loss.item(), "balancing": balancing.item()}


@pytest.mark.parametrize("kind", FAMILIES)
def test_first_step_equals_transformers_backward_at_tp2_and_dp2(trained, kind):
    for layout in ("tp2", "dp2"):
        _check_step_one(trained, f"{kind}-{layout}", kind)


def test_micro_batched_moe_step_equals_transformers_backward(trained):
    """Mixtral at EP=2 with two micro-batches per rank: the two-pass contrast's second pass carries the router
    loss (its mean over the two micro-batches, each pooled over both ranks)."""
    info, batches = _load(trained, "mixtral-dp2-accum")
    assert batches[0][0]["accumulation"] == 2
    _check_step_one(trained, "mixtral-dp2-accum", "mixtral")


def test_sequence_parallel_gemma3_step_equals_transformers_backward(trained):
    """Gemma 3 at TP=2 with sequence parallelism: the (1 + w) norms and post-norms on sequence shards (their
    gradients summed over TP by megatron's finalize_model_grads), q/k norms on the gathered sequence."""
    _check_step_one(trained, "gemma3-tp2sp", "gemma3")


@pytest.mark.parametrize("kind", FAMILIES)
def test_tp2_and_dp2_log_the_same_losses_and_dp2_exports_final(trained, kind):
    from transformers import AutoModelForCausalLM

    tp2, _ = _load(trained, f"{kind}-tp2")
    dp2, _ = _load(trained, f"{kind}-dp2")
    assert len(tp2["history"]) == len(dp2["history"]) == 2
    for a, b in zip(tp2["history"], dp2["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), kind
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), kind
        if kind in MOE_FAMILIES:
            assert a["moe/load_balancing_loss"] == pytest.approx(b["moe/load_balancing_loss"], abs=1e-5)
    assert tp2["history"][1]["loss"] != tp2["history"][0]["loss"]  # the second step saw trained weights
    # final/ (written from EP=2 for MoE) reloads in transformers with the weights the run ended with.
    from safetensors.torch import load_file

    end = load_file(str(trained / "results" / f"{kind}-dp2-end.safetensors"))
    extra = {"experts_implementation": "eager"} if kind in MOE_FAMILIES else {}
    reloaded = AutoModelForCausalLM.from_pretrained(dp2["final_model"], **extra)
    on_disk = {}
    for file in Path(dp2["final_model"]).glob("*.safetensors"):
        on_disk.update(load_file(str(file)))
    assert set(on_disk) == set(end)
    for name, tensor in on_disk.items():
        assert torch.equal(tensor, end[name]), name
    assert reloaded.config.model_type == json.loads((trained / kind / "config.json").read_text())["model_type"]


def test_expert_parallel_options_are_checked_before_start_naming_the_option(tmp_path):
    """--expert-parallel against the launch and the model (rpo.train.preflight), and the combinations the trainer
    does not run yet (rpo.train.scale): each refused by one line naming the options."""
    from rpo.train import ConfigError, TrainConfig
    from rpo.train.preflight import check_tensor_parallel
    from rpo.train.scale import check_scale_options

    from tiny_hf_models import tiny_config

    for kind in ("mixtral", "qwen3"):
        tiny_config(kind).save_pretrained(tmp_path / kind)

    def refused(message, world=2, **options):
        config = TrainConfig(**{"save_every": 0, **options}).validate()
        with pytest.raises(ConfigError, match=message):
            check_tensor_parallel(config, world)
            check_scale_options(config)

    mixtral, qwen3 = str(tmp_path / "mixtral"), str(tmp_path / "qwen3")
    refused(r"--expert-parallel 4 does not divide the data-parallel size 2", model=mixtral, expert_parallel=4)
    refused(r"--expert-parallel 3 does not divide the model's 4 experts", world=3, model=mixtral, expert_parallel=3)
    refused(r"--expert-parallel 2: the model .* has no experts \(model_type 'qwen3'\)", model=qwen3,
            expert_parallel=2)
    refused(r"--tensor-parallel 2 with a mixture-of-experts model needs --sequence-parallel", model=mixtral,
            tensor_parallel=2)
    refused(r"--expert-parallel 2: resumable checkpoints", model=mixtral, expert_parallel=2, save_every=10)
    refused(r"--expert-parallel 2 with --distributed-optimizer", model=mixtral, expert_parallel=2,
            distributed_optimizer=True, optimizer="adamw")
    refused(r"--expert-parallel 2 with --precompute-reference", model=mixtral, expert_parallel=2,
            precompute_reference=True)
    refused(r"--expert-parallel 2 with --loss kto", model=mixtral, expert_parallel=2, loss="kto")
    ok = TrainConfig(model=mixtral, expert_parallel=2, save_every=0).validate()
    check_tensor_parallel(ok, 2)
    check_scale_options(ok)
