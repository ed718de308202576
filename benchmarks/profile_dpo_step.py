"""Where a DPO step spends its CPU time, in rpo and in TRL's DPOTrainer: torch.profiler over the same rows.

The step of benchmarks/trl_dpo.py (DPO, β = 0.1, RMSprop lr 5e-7, clipping 1.0, float32, reference model kept, the
same shortened rows of ../shared/data/paired.jsonl, --batch pairs) on both sides, each in a fresh process with
--threads torch threads: --warmup steps, then --steps steps timed by the process's CPU time, then --profile-steps
steps under torch.profiler (CPU). The profiled steps carry labelled regions, put around the libraries' functions
by this script only (nothing in rpo or TRL changes):

  policy layers fwd     the decoder forward with grad        (rpo: gpt.hidden_states_with_mask; TRL: model.model)
  policy head fwd       LM head + log-softmax of the scored tokens, forward (rpo: rpo.models.logprobs'
                        chunked log-probs of the response tokens; TRL: its ChunkedLogProbFunction, on the CPU
                        over every position)
  reference fwd         the reference model's forward, layers and head (no grad)
  loss                  the DPO loss on the per-sequence log-probs
  backward              the whole backward, of which
    head bwd              the LM head's part (rpo: its chunked log-prob function's backward; TRL:
                          ChunkedLogProbFunction.backward; both recompute their logits tiles)
    layers bwd            the rest (decoder layers, embedding)
  grad sync/finalize    rpo: megatron's finalize_model_grads (DDP's reduction); TRL: none
  optimizer             clipping + the optimizer step (rpo: megatron's FP32Optimizer wrapper)
  zero grads            rpo: zero_grad_buffer + optimizer.zero_grad; TRL: optimizer.zero_grad
  collation             rpo: micro-batch slicing and the step's count all-reduce; TRL's collator runs before
                        the step (not in either side's step time)
  other                 the step's CPU time minus the regions above (Python glue, metrics, hooks)

Region times are inclusive CPU times per step from the profiled steps (the profiler's own overhead included, so
they sum to a bit more than the unprofiled step); the table also lists each side's most expensive operators
(self CPU time, with input shapes). `--head-only` adds a micro-benchmark of the two LM-head implementations alone
on the same hidden states.

    .venv/bin/python benchmarks/profile_dpo_step.py --trl-python PATH [--prompt-tokens 32 --response-tokens 32]
        [--model smollm2|tiny|PATH] [--threads 1] [--out benchmarks/results/profile_dpo_step.json]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REGIONS = ("policy layers fwd", "policy head fwd", "reference fwd", "loss", "backward", "head bwd",
           "grad sync/finalize", "optimizer", "zero grads", "collation")
TOP_LEVEL = ("policy layers fwd", "policy head fwd", "reference fwd", "loss", "backward", "grad sync/finalize",
             "optimizer", "zero grads", "collation")


class _Regions:
    """Labels (torch.profiler.record_function) around functions, and whether a backward is running."""

    def __init__(self):
        self.in_backward = False
        self.in_reference = False

    def label(self, name_or_fn):
        def wrap(fn):
            @functools.wraps(fn)
            def labelled(*args, **kwargs):
                name = name_or_fn(*args, **kwargs) if callable(name_or_fn) else name_or_fn
                if name is None:
                    return fn(*args, **kwargs)
                with torch.profiler.record_function(name):
                    return fn(*args, **kwargs)
            return labelled
        return wrap

    @contextlib.contextmanager
    def flag(self, attribute):
        setattr(self, attribute, True)
        try:
            yield
        finally:
            setattr(self, attribute, False)

    def patch_backward(self):
        original_backward, original_tensor_backward = torch.autograd.backward, torch.Tensor.backward

        def backward(*args, **kwargs):
            with self.flag("in_backward"), torch.profiler.record_function("backward"):
                return original_backward(*args, **kwargs)

        def tensor_backward(tensor, *args, **kwargs):
            with self.flag("in_backward"), torch.profiler.record_function("backward"):
                return original_tensor_backward(tensor, *args, **kwargs)

        torch.autograd.backward = backward
        torch.Tensor.backward = tensor_backward


def _summarise(profile, steps: int, cpu_ms: list, top: int = 15) -> dict:
    totals = collections.defaultdict(float)
    for event in profile.events():
        if event.name in REGIONS or event.name == "step":
            totals[event.name] += event.cpu_time_total / 1e3
    regions = {name: totals.get(name, 0.0) / steps for name in REGIONS}
    profiled_step = totals.get("step", 0.0) / steps
    regions["layers bwd"] = regions["backward"] - regions["head bwd"]
    regions["other"] = profiled_step - sum(regions[name] for name in TOP_LEVEL)
    operators = []
    for average in sorted(profile.key_averages(group_by_input_shape=True), key=lambda a: -a.self_cpu_time_total)[:top]:
        operators.append({"name": average.key, "shapes": str(average.input_shapes)[:120],
                          "self_cpu_ms_per_step": average.self_cpu_time_total / 1e3 / steps,
                          "calls_per_step": average.count / steps})
    return {"cpu_ms": statistics.median(cpu_ms), "step_cpu_ms": cpu_ms, "profiled_step_ms": profiled_step,
            "regions_ms": regions, "top_operators": operators}


# ---- rpo -------------------------------------------------------------------------------------------------------

def _rpo_side(spec: dict) -> dict:
    import trainer_step

    import rpo.models.gpt as gpt_lib
    import rpo.models.logprobs as logprobs_lib
    import rpo.train.reference_logps as reference_lib
    import rpo.train.trainer as trainer_lib

    regions = _Regions()
    trainer = trainer_step.build_trainers(dict(spec, cases=[("dpo", "dpo", False, 1)]), world=1)["dpo"]

    def forward_label(*args, **kwargs):
        if regions.in_reference:
            return None
        return "policy layers fwd" if torch.is_grad_enabled() else None

    gpt_lib.hidden_states_with_mask = regions.label(forward_label)(gpt_lib.hidden_states_with_mask)

    original_from_hidden = logprobs_lib.logprobs_from_hidden

    def from_hidden(*args, **kwargs):
        if regions.in_reference or not torch.is_grad_enabled():
            return original_from_hidden(*args, **kwargs)
        with torch.profiler.record_function("policy head fwd"):
            return original_from_hidden(*args, **kwargs)

    logprobs_lib.logprobs_from_hidden = from_hidden
    import rpo.models.packing as packing_lib

    packing_lib.logprobs_from_hidden = from_hidden
    original_reference = reference_lib.sequence_logps

    def reference_logps(*args, **kwargs):
        with regions.flag("in_reference"), torch.profiler.record_function("reference fwd"):
            return original_reference(*args, **kwargs)

    reference_lib.sequence_logps = reference_logps
    if hasattr(logprobs_lib, "_ChunkedTokenLogProbs"):
        _label_backward(logprobs_lib._ChunkedTokenLogProbs, "head bwd")
    else:  # rpo before 2026-12-07: checkpointed chunks of the output layer + megatron's cross-entropy
        from megatron.core.tensor_parallel import cross_entropy, layers

        _label_backward(cross_entropy._VocabParallelCrossEntropy, "head bwd")
        width = gpt_lib.model_info(trainer.policy).padded_vocab_size // gpt_lib.model_info(trainer.policy).tp_size
        _label_backward(layers.LinearWithGradAccumulationAndAsyncCommunication, "head bwd",
                        when=lambda grad_output: grad_output.shape[-1] == width)
        original_chunk = logprobs_lib._chunk_logprobs  # recomputed in backward by its checkpoint

        def chunk(*args, **kwargs):
            if regions.in_backward and not regions.in_reference:
                with torch.profiler.record_function("head bwd"):
                    return original_chunk(*args, **kwargs)
            return original_chunk(*args, **kwargs)

        logprobs_lib._chunk_logprobs = chunk
    regions.patch_backward()
    trainer.loss = _LabelledLoss(trainer.loss)
    trainer_lib.finalize_model_grads = regions.label("grad sync/finalize")(trainer_lib.finalize_model_grads)
    trainer.optimizer.step = regions.label("optimizer")(trainer.optimizer.step)
    trainer.optimizer.zero_grad = regions.label("zero grads")(trainer.optimizer.zero_grad)
    trainer.ddp_model.zero_grad_buffer = regions.label("zero grads")(trainer.ddp_model.zero_grad_buffer)
    import rpo.data as data_lib

    data_lib.micro_batches = regions.label("collation")(data_lib.micro_batches)
    trainer_lib.all_reduce_sum = regions.label("collation")(trainer_lib.all_reduce_sum)

    batches = len(trainer.batcher)
    cpu_ms, tokens = [], []
    total = spec["warmup"] + spec["steps"] + spec["profile_steps"]
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    for step in range(total):
        batch = trainer.batcher.batch(step // batches, step % batches)
        profiled = step >= spec["warmup"] + spec["steps"]
        if profiled and step == spec["warmup"] + spec["steps"]:
            profile.__enter__()
        started = time.process_time()
        with (torch.profiler.record_function("step") if profiled else contextlib.nullcontext()):
            trainer.train_step(batch)
        if spec["warmup"] <= step < spec["warmup"] + spec["steps"]:
            cpu_ms.append((time.process_time() - started) * 1e3)
            tokens.append(int(batch["attention_mask"].sum()))
    profile.__exit__(None, None, None)
    result = _summarise(profile, spec["profile_steps"], cpu_ms)
    result["tokens_per_step"] = statistics.mean(tokens)
    if spec.get("head_only"):
        result["head_only"] = _rpo_head_only(trainer, spec)
    return result


def _label_backward(function_class, name: str, when=None) -> None:
    """A region around an autograd Function's backward (when `when(grad)` holds, if given)."""
    backward = function_class.backward

    def labelled(ctx, *grads):
        if when is not None and not when(grads[0]):
            return backward(ctx, *grads)
        with torch.profiler.record_function(name):
            return backward(ctx, *grads)

    function_class.backward = staticmethod(labelled)


class _LabelledLoss:
    """The trainer's loss with a "loss" region around each call (every other attribute is the loss's own)."""

    def __init__(self, loss):
        self._loss = loss

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function("loss"):
            return self._loss(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._loss, name)


def _head_inputs(hidden_size: int, tokens: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    grad = torch.randn(tokens, generator=generator)
    return hidden, targets, grad


def _time_cpu(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.process_time()
        fn()
        times.append((time.process_time() - started) * 1e3)
    return statistics.median(times)


def _rpo_head_only(trainer, spec) -> dict:
    """The chunked log-probs alone (forward + backward) on random hidden states of the step's scored tokens."""
    import rpo.models.gpt as gpt_lib
    import rpo.models.logprobs as logprobs_lib

    gpt = gpt_lib.unwrap(trainer.policy)
    info = gpt_lib.model_info(gpt)
    hidden, targets, grad = _head_inputs(gpt.config.hidden_size, spec["head_tokens"], info.vocab_size)
    weight = gpt_lib.output_weight(gpt)
    weight = weight if weight is not None else gpt.output_layer.weight

    def run():
        leaf = hidden.clone().requires_grad_(True)
        if hasattr(logprobs_lib, "_ChunkedTokenLogProbs"):
            out = logprobs_lib._ChunkedTokenLogProbs.apply(leaf, weight, targets, info.vocab_size,
                                                           logprobs_lib.DEFAULT_CHUNK_SIZE)
        else:  # rpo before 2026-12-07
            out = torch.utils.checkpoint.checkpoint(logprobs_lib._chunk_logprobs, leaf, targets, gpt.output_layer,
                                                    gpt_lib.output_weight(gpt), info.vocab_size,
                                                    use_reentrant=False, preserve_rng_state=False)
        out.backward(grad)

    result = {"tokens": spec["head_tokens"], "cpu_ms": _time_cpu(run)}
    trainer.ddp_model.zero_grad_buffer()
    return result


# ---- TRL -------------------------------------------------------------------------------------------------------

def _trl_side(spec: dict) -> dict:
    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    import datasets
    import transformers
    import trl
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    regions = _Regions()
    chunked = trl_utils._ChunkedLogProbFunction
    original_apply = chunked.apply
    original_head_backward = chunked.backward

    class LabelledChunked:
        @staticmethod
        def apply(*args):
            if torch.is_grad_enabled():
                with torch.profiler.record_function("policy head fwd"):
                    return original_apply(*args)
            return original_apply(*args)

    def head_backward(ctx, *grads):
        with torch.profiler.record_function("head bwd"):
            return original_head_backward(ctx, *grads)

    chunked.backward = staticmethod(head_backward)
    trl_utils._ChunkedLogProbFunction = LabelledChunked
    regions.patch_backward()

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    total = spec["warmup"] + spec["steps"] + spec["profile_steps"]
    import tempfile

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rpo-profile-trl-"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=5e-7, optim="rmsprop", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], max_length=spec["max_length"],
        max_steps=total, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        precompute_ref_log_probs=False, logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    state = {"step": 0, "cpu_ms": [], "tokens": [], "profile": None}
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, train_state, control, **kwargs):
            step = state["step"]
            if step == spec["warmup"] + spec["steps"]:
                profile.__enter__()
            if step >= spec["warmup"] + spec["steps"]:
                state["region"] = torch.profiler.record_function("step")
                state["region"].__enter__()
            state["started"] = time.process_time()

        def on_step_end(self, args, train_state, control, **kwargs):
            step = state["step"]
            if spec["warmup"] <= step < spec["warmup"] + spec["steps"]:
                state["cpu_ms"].append((time.process_time() - state["started"]) * 1e3)
            if step >= spec["warmup"] + spec["steps"]:
                state["region"].__exit__(None, None, None)
            state["step"] += 1

    class ProfiledDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            if spec["warmup"] <= state["step"] < spec["warmup"] + spec["steps"]:
                state["tokens"].append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    trainer = ProfiledDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[Steps()])
    policy_backbone, reference_backbone = trainer.model.model, trainer.ref_model.model
    policy_backbone.forward = regions.label(lambda *a, **k: "policy layers fwd" if torch.is_grad_enabled() else None)(
        policy_backbone.forward)
    original_ref_forward = trainer.ref_model.forward

    def reference_forward(*args, **kwargs):
        with torch.profiler.record_function("reference fwd"):
            return original_ref_forward(*args, **kwargs)

    trainer.ref_model.forward = reference_forward
    original_loss = trainer._compute_loss

    def compute_loss(*args, **kwargs):  # the forwards inside are labelled themselves; "loss" is what remains
        return original_loss(*args, **kwargs)

    trainer._compute_loss = compute_loss
    original_create = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):
        optimizer = original_create(*args, **kwargs)
        optimizer.step = regions.label("optimizer")(optimizer.step)
        optimizer.zero_grad = regions.label("zero grads")(optimizer.zero_grad)
        return optimizer

    trainer.create_optimizer = create_optimizer
    trainer.accelerator.clip_grad_norm_ = regions.label("optimizer")(trainer.accelerator.clip_grad_norm_)
    trainer.train()
    profile.__exit__(None, None, None)
    result = _summarise(profile, spec["profile_steps"], state["cpu_ms"])
    # TRL's DPO loss is a few elementwise ops on 8 numbers inside _compute_loss: counted in "other".
    result["tokens_per_step"] = statistics.mean(state["tokens"])
    result["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    result["attention"] = model.config._attn_implementation
    if spec.get("head_only"):
        hidden, targets, grad = _head_inputs(model.config.hidden_size, spec["head_tokens_trl"],
                                             model.config.vocab_size)
        weight = model.get_output_embeddings().weight

        def run():
            leaf = hidden.clone().requires_grad_(True)
            out = original_apply(leaf, weight, None, targets, 1.0, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                 ("log_probs",))[0]
            out.backward(grad)

        result["head_only"] = {"tokens": spec["head_tokens_trl"], "cpu_ms": _time_cpu(run)}
    return result


def _worker(spec: dict) -> dict:
    if spec["side"] == "trl":
        return _trl_side(spec)
    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    import logging

    logging.basicConfig(level=logging.WARNING)
    return _rpo_side(spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trl-python", type=Path, default=Path(sys.executable),
                        help="interpreter of an environment with trl installed (default: this one)")
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or an HF folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="steps timed by CPU time (not profiled)")
    parser.add_argument("--profile-steps", type=int, default=1)
    parser.add_argument("--sides", nargs="+", default=["rpo", "trl"], choices=["rpo", "trl"])
    parser.add_argument("--head-only", action="store_true", help="also time the two LM heads alone")
    parser.add_argument("--out", type=Path, default=_common.default_output("profile_dpo_step"))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import trl_dpo

    if "trl" in args.sides:
        trl_dpo.check_trl_python(args.trl_python, parser)
    assets = _common.cache_root()
    if args.model == "smollm2":
        model = _common.smollm2_folder()
    elif args.model == "tiny":
        model = _common.tiny_llama_folder(assets / "models", hidden=128, layers=2, heads=4, kv_heads=2,
                                          intermediate=256)
    else:
        model = Path(args.model)
    data = _common.short_paired_subset(assets / "data", args.rows, prompt_tokens=args.prompt_tokens,
                                       response_tokens=args.response_tokens)
    max_length = 4 * (args.prompt_tokens + args.response_tokens)
    spec = dict(model=str(model), data=str(data), cache=str(assets / "rpo-cache"), batch=args.batch,
                global_batch=args.batch, max_length=max_length, max_prompt_length=max_length // 2,
                warmup=args.warmup, steps=args.steps, profile_steps=args.profile_steps, threads=args.threads,
                head_only=args.head_only, head_tokens=2 * args.batch * args.response_tokens,
                head_tokens_trl=2 * args.batch * (args.prompt_tokens + args.response_tokens))
    sides = {}
    env = _common.benchmark_env(args.threads)
    for side in args.sides:
        side_env = dict(env)
        python = sys.executable
        if side == "trl":
            python = str(args.trl_python)
            side_env.pop("PYTHONPATH", None)
            side_env["PYTHONPATH"] = str(HERE)  # _common only; TRL's environment must not see the checkout's rpo
        sides[side] = _common.run_worker(__file__, dict(spec, side=side), python=python, env=side_env,
                                         timeout=3600)[0]
    rows = []
    names = list(REGIONS[:5]) + ["head bwd", "layers bwd"] + list(REGIONS[6:]) + ["other"]
    for name in names:
        row = {"region": name}
        for side, result in sides.items():
            row[f"{side}_ms"] = result["regions_ms"].get(name)
        if len(sides) == 2 and row["trl_ms"]:
            row["rpo_minus_trl_ms"] = row["rpo_ms"] - row["trl_ms"]
        rows.append(row)
    rows.append({"region": "profiled step", **{f"{s}_ms": r["profiled_step_ms"] for s, r in sides.items()}})
    rows.append({"region": "step CPU ms (unprofiled median)", **{f"{s}_ms": r["cpu_ms"] for s, r in sides.items()}})
    rows.append({"region": "tokens/step", **{f"{s}_ms": r["tokens_per_step"] for s, r in sides.items()}})
    columns = [("region", "region", "")] + [(f"{side} CPU ms/step", f"{side}_ms", ".0f") for side in sides]
    if len(sides) == 2:
        columns.append(("rpo − TRL", "rpo_minus_trl_ms", "+.0f"))
    notes = [f"model {model}; batch {args.batch} pairs of ≤{args.prompt_tokens}+≤{args.response_tokens} tokens; "
             f"{args.threads} torch thread(s) per side; {args.profile_steps} profiled step(s) after "
             f"{args.warmup + args.steps}"]
    for side, result in sides.items():
        notes.append(f"{side}: top operators (self CPU ms per step):")
        notes += [f"  {op['self_cpu_ms_per_step']:8.1f}  {op['calls_per_step']:6.0f}x  {op['name']}  {op['shapes']}"
                  for op in result["top_operators"]]
        if "head_only" in result:
            notes.append(f"{side}: LM head alone (fwd + bwd, {result['head_only']['tokens']} tokens): "
                         f"{result['head_only']['cpu_ms']:.0f} CPU ms")
    if "trl" in sides:
        notes.append(f"TRL: {sides['trl']['versions']}, attention {sides['trl']['attention']}")
    machine = _common.machine_info("cpu")
    machine["torch_threads"] = args.threads
    _common.report(args.out, columns, rows, machine=machine, settings=vars(args), notes=notes,
                   sides={s: {k: v for k, v in r.items()} for s, r in sides.items()})
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, worker=_worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
