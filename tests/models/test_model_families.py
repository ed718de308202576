"""Qwen2/2.5, Qwen3, Gemma 3 (text), Mixtral and Qwen3-MoE through megatron-core, against transformers.

Each family is a tiny random model built from its transformers config class (tiny_hf_models.tiny_config lists the
features each one exercises: q/k/v bias, tied embeddings, yarn and linear RoPE, q/k norms, head_dim ≠ hidden /
heads, Gemma 3's norms, GeGLU, embedding scale and interleaved sliding/global layers, MoE routing with and
without renormalised top-k). References are independent: transformers' own float64 forward, its
`load_balancing_loss_func`, and its `from_pretrained` of the exported folders. The distributed layouts run in one
2-rank launch of family_workers.py (TP=2; TP=1 × DP=2, with the experts of the MoE models split over the two
ranks, EP=2); the one-process checks (mapping, load-balancing loss and its gradient, refusals) run here.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

import multirank
from tiny_hf_models import (
    FAMILIES, MOE_FAMILIES, VOCAB, hf_hub_grads, hf_load_balancing_loss, hf_token_logprobs_float64, long_batch,
    read_safetensors_folder, tiny_config, tiny_hf_model, tiny_tokenizer,
)

WORKERS = Path(__file__).with_name("family_workers.py")
SUM_TOLERANCE = 1e-4  # the issue's: summed log-probs of a row of about −400 against transformers in float64
TOKEN_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("families")
    tokenizer = tiny_tokenizer()
    batch = long_batch()
    models = {kind: tiny_hf_model(kind, seed) for seed, kind in enumerate(FAMILIES, start=11)}
    for kind, model in models.items():
        model.save_pretrained(workdir / kind)
        tokenizer.save_pretrained(workdir / kind)
    torch.save(batch, workdir / "batch.pt")
    # 200 > LONG_LENGTH: several sequences share a packed row (so they sit at column offsets > 0).
    (workdir / "spec.json").write_text(json.dumps({"families": list(FAMILIES), "pack_length": 200}))
    start = time.time()
    multirank.launch(WORKERS, 2, args=[workdir], log_dir=workdir / "logs").check()
    elapsed = time.time() - start
    results = [torch.load(workdir / f"results-rank{r}.pt", weights_only=False) for r in range(2)]
    references = {kind: hf_token_logprobs_float64(model, batch) for kind, model in models.items()}
    return {"workdir": workdir, "models": models, "batch": batch, "results": results, "references": references,
            "elapsed": elapsed}


def _layouts(run, kind):
    """(layout name, rows, result prefix, rank result) of every measurement of `kind`."""
    rows_all = torch.arange(run["batch"]["input_ids"].shape[0])
    for rank, res in enumerate(run["results"]):
        if kind not in MOE_FAMILIES:  # megatron's MoE layer trains at TP > 1 only with sequence parallelism
            yield f"TP=2 rank {rank}", rows_all, f"tp2/{kind}", res
        yield f"TP=2 sequence-parallel rank {rank}", rows_all, f"tp2sp/{kind}", res
        yield f"TP=1 (DP=2) rank {rank}", res["dp2/rows"], f"dp2/{kind}", res
        if kind in MOE_FAMILIES:
            yield f"EP=2 (TP=1, DP=2) rank {rank}", res["dp2/rows"], f"ep2/{kind}", res


@pytest.mark.parametrize("kind", FAMILIES)
def test_logprobs_equal_float64_transformers_at_every_layout(family_run, kind):
    reference = family_run["references"][kind]
    mask = family_run["batch"]["loss_mask"]
    sums = reference.sum(1)
    assert (sums < -300).all() and (sums > -550).all(), sums  # rows of about −400, as the issue measures
    assert reference[mask].std() > 0.5  # not a near-uniform model
    measured = {}
    for layout, rows, prefix, res in _layouts(family_run, kind):
        for packed in ("", "packed_"):
            got_sums = res[f"{prefix}/{packed}sums"].double()
            diff = (got_sums - sums[rows]).abs().max().item()
            measured[f"{layout}{' packed' if packed else ''}"] = diff
            assert diff <= SUM_TOLERANCE, (layout, packed, diff)
            torch.testing.assert_close(res[f"{prefix}/{packed}token_logprobs"].double(), reference[rows],
                                       atol=TOKEN_TOLERANCE, rtol=0, msg=f"{kind} {layout} {packed}")
        rows_packed, length = res[f"{prefix}/packed_shape"]
        assert rows_packed < len(rows) and length <= 200  # sequences really shared packed rows
    print(f"\n{kind}: max |Σ log p − Σ log p (transformers, float64)| per layout: "
          + ", ".join(f"{k} {v:.1e}" for k, v in measured.items()))


def test_expert_parallel_layout_really_splits_experts(family_run):
    for kind in MOE_FAMILIES:
        experts = tiny_config(kind).num_local_experts if kind == "mixtral" else tiny_config(kind).num_experts
        for res in family_run["results"]:
            assert res[f"dp2/{kind}/ep"] == (1, tiny_config(kind).num_hidden_layers * experts)
            assert res[f"ep2/{kind}/ep"] == (2, tiny_config(kind).num_hidden_layers * experts // 2)


@pytest.mark.parametrize("kind", FAMILIES)
def test_export_reloads_in_transformers_bit_exact(family_run, kind):
    from transformers import AutoModelForCausalLM

    original = family_run["models"][kind].state_dict()
    folders = ["export-tp2-"] + (["export-ep2-"] if kind in MOE_FAMILIES else [])
    for folder in folders:
        path = family_run["workdir"] / f"{folder}{kind}"
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == tiny_config(kind).model_type
        extra = {"experts_implementation": "eager"} if kind in MOE_FAMILIES else {}
        reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **extra).state_dict()
        assert reloaded.keys() == original.keys(), folder
        for name, tensor in reloaded.items():
            assert torch.equal(tensor, original[name]), (folder, name)
        if kind in MOE_FAMILIES:  # written as Hugging Face checkpoints store experts: one tensor per expert
            on_disk = read_safetensors_folder(path)
            assert any(".experts.3." in name for name in on_disk) and not any("gate_up_proj" in n for n in on_disk)


# ---------------------------------------------------------------------------------------------------------------
# One process: the mapping at any TP / EP, the load-balancing loss and its gradient, what the features change.

@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("tp_size,ep_size", [(1, 1), (2, 1), (2, 2)])
def test_mapping_round_trip_any_tp_and_ep(kind, tp_size, ep_size):
    from rpo.models.gpt import padded_vocab_size
    from rpo.models.hf_checkpoint import Layout, hf_to_megatron_state, megatron_to_hf_state, rules

    if ep_size > 1 and kind not in MOE_FAMILIES:
        pytest.skip("expert parallelism needs experts")
    state = copy.deepcopy(tiny_hf_model(kind, 3))
    hf_state = _hub_state_dict(state, kind)
    layouts = [Layout.from_hf(tiny_config(kind), padded_vocab_size(VOCAB, tp_size), ep_rank=e, ep_size=ep_size)
               for e in range(ep_size)]
    shards = [[hf_to_megatron_state(hf_state, layout, rank, tp_size) for rank in range(tp_size)]
              for layout in layouts]
    names = {rule.megatron for rule in rules(layouts[0])}
    assert set(shards[0][0]) == names
    back = megatron_to_hf_state(shards[0], layouts[0], expert_shards=shards if ep_size > 1 else None)
    expected = {k: v for k, v in hf_state.items() if not (layouts[0].tied and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name in expected:
        assert torch.equal(back[name], expected[name]), name


def _hub_state_dict(model, kind):
    """The HF state dict as checkpoints store it (transformers ≥ 5 fuses MoE experts in memory)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return load_file(str(Path(folder) / "model.safetensors"))


def test_qkv_bias_and_expert_shards_per_rank():
    """Qwen2's fused q/k/v bias follows the fused weight's layout (per KV group: its queries, key, value; whole
    groups per TP rank); EP rank e holds global experts e·E/EP ... as its local ones."""
    from rpo.models.gpt import padded_vocab_size
    from rpo.models.hf_checkpoint import Layout, hf_to_megatron_state

    state = _hub_state_dict(tiny_hf_model("qwen2", 4), "qwen2")
    layout = Layout.from_hf(tiny_config("qwen2"), padded_vocab_size(VOCAB, 2))
    d, per_group = 16, 2
    q, k, v = (state[f"model.layers.0.self_attn.{x}_proj.bias"] for x in "qkv")
    for rank in range(2):
        shard = hf_to_megatron_state(state, layout, rank, 2)["decoder.layers.0.self_attention.linear_qkv.bias"]
        g = rank
        assert torch.equal(shard, torch.cat([q[g * per_group * d:(g + 1) * per_group * d], k[g * d:(g + 1) * d],
                                             v[g * d:(g + 1) * d]]))
    state = _hub_state_dict(tiny_hf_model("qwen3_moe", 4), "qwen3_moe")
    for ep_rank in range(2):
        layout = Layout.from_hf(tiny_config("qwen3_moe"), padded_vocab_size(VOCAB, 1), ep_rank=ep_rank, ep_size=2)
        shard = hf_to_megatron_state(state, layout, 0, 1)
        for j in range(4):
            e = ep_rank * 4 + j
            fc1 = shard[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"]
            assert torch.equal(fc1, torch.cat([state[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"],
                                               state[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]]))


@pytest.fixture(scope="module")
def one_process():
    from rpo.models import init_parallel, teardown

    init_parallel(1)
    yield
    teardown()


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_load_balancing_loss_and_gradient_equal_transformers(one_process, kind, tmp_path):
    """The value of the router loss rpo adds (transformers' load_balancing_loss_func, padding excluded) and the
    gradient of Σ log p + coeff · loss, against transformers' own autograd in float64."""
    from rpo.models import load_policy, sequence_logprobs
    from rpo.models.hf_checkpoint import _model_layout, hf_tensors, rules  # the mapping maps gradients alike
    from rpo.models.moe import load_balancing

    hf = tiny_hf_model(kind, 5)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    batch = long_batch(seed=3, rows=4)
    coeff = hf.config.router_aux_loss_coef
    model, _, _ = load_policy(tmp_path, tp_size=1)
    model.train()
    balance = load_balancing(model)
    assert balance.coeff == coeff and balance.num_layers == 2
    out = sequence_logprobs(model, batch, chunk_size=50)
    out.sums.sum().backward()
    ours = balance.loss()

    # transformers, float64: each row alone (no padding), router logits of every real token of every row.
    hf64 = copy.deepcopy(hf).double().train()
    total, logits_per_layer = 0.0, None
    for r in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][r].bool()
        ids = batch["input_ids"][r][real][None]
        mask = batch["loss_mask"][r][real]
        result = hf64(input_ids=ids, output_router_logits=True)
        logp = torch.log_softmax(result.logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        total = total + (logp * mask[1:]).sum()
        layers = [layer.reshape(-1, layer.shape[-1]) for layer in result.router_logits]
        logits_per_layer = layers if logits_per_layer is None else [
            torch.cat([a, b]) for a, b in zip(logits_per_layer, layers)]
    module = __import__(type(hf).__module__, fromlist=["load_balancing_loss_func"])
    experts = balance.num_experts
    reference_loss = module.load_balancing_loss_func(tuple(logits_per_layer), experts, hf.config.num_experts_per_tok,
                                                     None)
    # transformers' own masked form on the padded batch gives the same value (float32 forward: no NaN there).
    assert float(hf_load_balancing_loss(hf.train(), batch)) == pytest.approx(float(reference_loss), abs=1e-6)
    assert float(ours) == pytest.approx(float(reference_loss), abs=1e-6)
    assert 1.5 < float(reference_loss) < 3.0  # top-k = 2: perfectly balanced routing gives exactly 2
    # The load-balancing term alone moves the router weights far more than the 1e-5 tolerance below: a missing or
    # misweighted injected gradient would fail the comparison.
    routers = [p for n, p in hf64.named_parameters() if n.endswith("mlp.gate.weight")]
    aux_only = torch.autograd.grad(coeff * reference_loss, routers, retain_graph=True)
    assert max(g.abs().max().item() for g in aux_only) > 1e-4
    (total + coeff * reference_loss).backward()

    grads = {}
    params = dict(model.named_parameters())
    layout = _model_layout(model)
    for rule in rules(layout):
        grads.update(hf_tensors(rule, [params[rule.megatron].grad], layout))
    reference = hf_hub_grads(hf64, kind)
    assert set(grads) >= set(reference) - {"lm_head.weight"}
    router_moved = 0.0
    for name, grad in reference.items():
        # float32 against float64: each element is a sum over ~300 tokens, so its rounding follows the tensor's
        # scale (measured ≤ 1.5e-6 of it); the load-balancing part of the router gradients is ≥ 1e-2 of theirs.
        atol = 1e-5 + 3e-6 * grad.abs().max().item()
        torch.testing.assert_close(grads[name].double(), grad, atol=atol, rtol=1e-5, msg=name)
        if "gate.weight" in name:
            router_moved = max(router_moved, grad.abs().max().item())
    assert router_moved > 1e-3


@pytest.mark.parametrize("kind", ["mixtral", "gemma3"])
def test_recomputation_keeps_gradients_and_the_load_balancing_term(one_process, kind, tmp_path):
    """megatron's selective and full recomputation give the gradients of no recomputation — for Mixtral including
    the load-balancing gradient, which full recomputation must re-inject when the router runs again in backward
    (its first forward runs without autograd) — and Gemma 3's modules survive being recomputed."""
    from rpo.models import load_policy, sequence_logprobs
    from rpo.models.moe import load_balancing

    tiny_hf_model(kind, 2).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    batch = long_batch(rows=4)
    grads, losses = {}, {}
    for mode in ("none", "selective", "full"):
        model, _, _ = load_policy(tmp_path, tp_size=1, recompute=mode)
        model.train()
        sequence_logprobs(model, batch, chunk_size=64).sums.sum().backward()
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters()}
        balance = load_balancing(model)
        losses[mode] = None if balance is None else float(balance.loss())
    for mode in ("selective", "full"):
        assert grads[mode].keys() == grads["none"].keys()
        for name, grad in grads[mode].items():
            torch.testing.assert_close(grad, grads["none"][name], atol=1e-6, rtol=1e-6, msg=f"{mode} {name}")
        assert losses[mode] == losses["none"]


def test_family_features_change_transformers_output():
    """Each feature the tiny configs exercise changes transformers' own log-probs (else matching them would not
    test it): Qwen2's window and yarn RoPE, Qwen3's linear RoPE, Gemma 3's local θ and window."""
    batch = long_batch(rows=2)

    def differs(kind, change):
        base = tiny_hf_model(kind, 1)
        changed_config = copy.deepcopy(base.config)
        change(changed_config)
        from transformers import AutoModelForCausalLM

        changed = AutoModelForCausalLM.from_config(changed_config, attn_implementation="eager")
        changed.load_state_dict(base.state_dict())
        return (hf_token_logprobs_float64(base, batch) - hf_token_logprobs_float64(changed, batch)).abs().max()

    def no_window(config):
        config.layer_types = ["full_attention"] * config.num_hidden_layers

    def rope_default(kind):
        def change(config):
            if kind == "gemma3":
                config.rope_parameters["sliding_attention"]["rope_theta"] = 1e6
            else:
                config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
        return change

    assert differs("qwen2", no_window) > 1e-2
    assert differs("gemma3", no_window) > 1e-2
    for kind in ("qwen2", "qwen3", "gemma3"):
        assert differs(kind, rope_default(kind)) > 1e-2, kind


def test_architecture_reads_each_family():
    from rpo.models.architectures import architecture

    qwen2, qwen3, gemma, mixtral, qwen3_moe = (architecture(tiny_config(k)) for k in FAMILIES)
    assert qwen2.qkv_bias and qwen2.tied_embeddings and not qwen2.qk_norm
    assert qwen2.windows == (None, 9) and qwen2.rope["full_attention"].attention_scaling > 1.1  # yarn's factor
    assert qwen3.qk_norm and qwen3.head_dim == 24 and qwen3.rope["full_attention"].rope_type == "linear"
    assert gemma.zero_centered_norms and gemma.post_norms and gemma.embedding_scale == 8.0
    assert gemma.windows == (9, None, 9) and not gemma.uniform_rope
    assert gemma.softmax_scale(0) == pytest.approx(20 ** -0.5)
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.normalize_top_k) == (4, 2, True)
    assert (qwen3_moe.moe.num_experts, qwen3_moe.moe.ffn_hidden_size, qwen3_moe.moe.normalize_top_k) == (8, 48, False)
    assert mixtral.moe.aux_loss_coeff == 0.02 and qwen3_moe.moe.aux_loss_coeff == 0.01


def _refused(config, *fragments):
    from rpo.models.architectures import UnsupportedModelError, architecture

    with pytest.raises(UnsupportedModelError) as error:
        architecture(config)
    message = str(error.value)
    assert "\n" not in message  # one line
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unsupported_families_and_features_are_refused_in_one_line():
    from transformers import (Gemma2Config, Gemma3Config, LlamaConfig, MixtralConfig, Phi3Config, Qwen2MoeConfig,
                              Qwen3Config, Qwen3MoeConfig)

    _refused(Phi3Config(), "phi3", "Phi-3", "longrope")
    _refused(Gemma2Config(), "Gemma 2", "soft-capping")
    _refused(Gemma3Config(), "Gemma 3 multimodal", "gemma3_text")
    _refused(Qwen2MoeConfig(), "Qwen2-MoE", "shared expert")
    gemma = tiny_config("gemma3")
    gemma.attn_logit_softcapping = 50.0
    _refused(gemma, "Gemma 3: attn_logit_softcapping=50.0")
    gemma = tiny_config("gemma3")
    gemma.final_logit_softcapping = 30.0
    _refused(gemma, "Gemma 3: final_logit_softcapping=30.0")
    _refused(LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
             "LLaMA: rope type 'dynamic'", "length")
    _refused(Qwen3Config(attention_bias=True), "Qwen3: config.attention_bias=True")
    _refused(MixtralConfig(router_jitter_noise=0.1), "Mixtral: router_jitter_noise=0.1")
    _refused(Qwen3MoeConfig(mlp_only_layers=[0]), "Qwen3-MoE: mlp_only_layers=[0]")
    _refused(LlamaConfig(attention_bias=True), "LLaMA: config.attention_bias=True")


def test_tensor_and_expert_parallel_sizes_checked_with_the_option_named():
    from rpo.models.gpt import transformer_config_from_hf

    with pytest.raises(ValueError, match="--expert-parallel 3 must divide the 4 experts"):
        transformer_config_from_hf(tiny_config("mixtral"), tp_size=1, expert_parallel=3)
    with pytest.raises(ValueError, match="--expert-parallel 2: Qwen3 has no experts"):
        transformer_config_from_hf(tiny_config("qwen3"), tp_size=1, expert_parallel=2)
    odd = tiny_config("qwen3_moe")
    odd.num_key_value_heads, odd.moe_intermediate_size = 4, 50
    with pytest.raises(ValueError, match="tensor-parallel size 4 must divide moe_intermediate_size=50"):
        transformer_config_from_hf(odd, tp_size=4)
    with pytest.raises(ValueError, match="Gemma 3: this config needs rpo's local-spec modules"):
        transformer_config_from_hf(tiny_config("gemma3"), tp_size=1, use_te=True)
