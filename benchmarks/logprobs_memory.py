"""Peak memory and time of per-sequence log-probs: rpo's chunked (vocab-parallel) path vs full logits.

Model: a megatron GPTModel (rpo.models.build_gpt_model) with SmolLM2-135M's widths and vocabulary (hidden 576, MLP
1536, vocabulary 49152, tied embeddings) but only --layers decoder layers and 8 attention heads / 2 KV heads
(SmolLM2 has 9 / 3; 9 is not divisible by TP = 2), random weights, float32. Batch: --rows sequences of T tokens,
the last --response-fraction of each scored (the rest is prompt).

Per case, in a fresh process (per rank for TP > 1, gloo): one untimed forward + backward (allocates the
gradients), then the peak memory of one forward + backward of Σ log-probs above the memory held before it, then the
median time of --repeat more. Paths:
  chunked:     rpo.models.sequence_logprobs (final hidden states of the response positions through the output
               layer in chunks of --chunk-size tokens, each chunk checkpointed; vocab-parallel cross-entropy)
  full logits: rpo.models.sequence_logprobs_full_logits (GPTModel's own forward to [rows, T, vocab/TP] logits)
  decoder only: rpo.models.forward_hidden_states (no output layer): the decoder's share of both, subtracted to give
               what each log-prob path itself adds
Memory on CPU is the rise of the process's peak resident set (see benchmarks/_common.py).

    .venv/bin/python benchmarks/logprobs_memory.py [--lengths 256 512 1024] [--tp 1 2] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

PATHS = ("chunked", "full logits", "decoder only")
KEYS = {"chunked": "chunked", "full logits": "full", "decoder only": "decoder"}
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 576, 1536, 8, 2


def _worker(spec: dict) -> dict:
    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    from transformers import LlamaConfig

    from rpo.models import (build_gpt_model, forward_hidden_states, init_parallel, padded_vocab_size,
                            sequence_logprobs, sequence_logprobs_full_logits, teardown)

    info = init_parallel(spec["tp"], seed=0)
    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=spec["layers"], num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=max(spec["length"], 2048), rms_norm_eps=1e-5,
                         tie_word_embeddings=True)
    model = build_gpt_model(config, tp_size=spec["tp"], dtype=torch.float32)
    rows, length = spec["rows"], spec["length"]
    generator = torch.Generator().manual_seed(0)
    prompt = length - int(round(length * spec["response_fraction"]))
    loss_mask = torch.zeros(rows, length, dtype=torch.bool)
    loss_mask[:, max(prompt, 1):] = True
    batch = {"input_ids": torch.randint(0, spec["vocab"], (rows, length), generator=generator),
             "attention_mask": torch.ones(rows, length, dtype=torch.long), "loss_mask": loss_mask}

    if spec["path"] == "chunked":
        def forward():
            return sequence_logprobs(model, batch, chunk_size=spec["chunk_size"], return_token_logprobs=False).sums
    elif spec["path"] == "full logits":
        def forward():
            return sequence_logprobs_full_logits(model, batch).sums
    else:  # the decoder's share of both: final hidden states, no output layer
        def forward():
            return forward_hidden_states(model, batch["input_ids"], batch["attention_mask"]).sum(dim=(0, 2))

    def step():
        sums = forward()
        sums.sum().backward()
        return sums

    step()  # allocates the parameter gradients, which both paths keep
    model.zero_grad(set_to_none=False)
    with _common.PeakMemory("cpu") as memory:
        sums = step().detach()
    seconds = _common.time_repeated(lambda: (model.zero_grad(set_to_none=False), step()), repeat=spec["repeat"],
                                    warmup=0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"path": spec["path"], "tp": spec["tp"], "tp_rank": info.tp_rank, "rows": rows, "length": length,
              "scored_tokens": int(loss_mask.sum()), "peak_extra_mib": memory.peak_bytes / _common.MIB,
              "held_before_mib": memory.start_bytes / _common.MIB, "parameter_mib": params / _common.MIB,
              "full_logits_mib": rows * length * padded_vocab_size(spec["vocab"], spec["tp"]) // spec["tp"] * 4
              / _common.MIB, "logprob_sum": float(sums.sum()), **_common.timing_summary(seconds)}
    teardown()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="tokens per sequence T")
    parser.add_argument("--rows", type=int, default=4, help="sequences per batch (2 pairs: chosen + rejected)")
    parser.add_argument("--response-fraction", type=float, default=0.5)
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2's: 49152)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (one rank each)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per log-prob chunk (library default)")
    parser.add_argument("--repeat", type=int, default=1, help="timed forward + backward runs per case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: all cores for TP = 1, cores / TP otherwise)")
    parser.add_argument("--out", type=Path, default=_common.default_output("logprobs_memory"))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cores = os.cpu_count() or 1
    rows = []
    for tp in args.tp:
        threads = args.threads or max(1, cores // tp)
        for length in args.lengths:
            row = {"tp": tp, "length": length, "rows": args.rows, "threads": threads}
            for path in PATHS:
                spec = dict(path=path, tp=tp, length=length, rows=args.rows, vocab=args.vocab, layers=args.layers,
                            response_fraction=args.response_fraction, chunk_size=args.chunk_size,
                            repeat=args.repeat, threads=threads)
                ranks = _common.run_worker(__file__, spec, world_size=tp, env=_common.benchmark_env(threads))
                key = KEYS[path]
                row[f"{key}_peak_mib"] = max(r["peak_extra_mib"] for r in ranks)  # the fullest rank
                row[f"{key}_ms"] = max(r["median_ms"] for r in ranks)
                row[f"{key}_logprob_sum"] = ranks[0]["logprob_sum"]
                row["full_logits_mib"] = ranks[0]["full_logits_mib"]
                row["scored_tokens"] = ranks[0]["scored_tokens"]
            row["memory_ratio"] = _common.ratio(row["chunked_peak_mib"], row["full_peak_mib"])
            # What the log-prob path itself adds on top of the decoder's activations and gradients.
            row["chunked_logprob_mib"] = row["chunked_peak_mib"] - row["decoder_peak_mib"]
            row["full_logprob_mib"] = row["full_peak_mib"] - row["decoder_peak_mib"]
            row["logprob_memory_ratio"] = _common.ratio(row["chunked_logprob_mib"], row["full_logprob_mib"])
            row["time_ratio"] = _common.ratio(row["chunked_ms"], row["full_ms"])
            # Both paths compute the same numbers: a cheap guard against measuring something broken.
            row["logprob_sum_rel_diff"] = abs(row["chunked_logprob_sum"] - row["full_logprob_sum"]) / abs(
                row["full_logprob_sum"])
            rows.append(row)
            print(f"TP={tp} T={length}: chunked {row['chunked_peak_mib']:.0f} MiB / {row['chunked_ms']:.0f} ms, "
                  f"full logits {row['full_peak_mib']:.0f} MiB / {row['full_ms']:.0f} ms, decoder only "
                  f"{row['decoder_peak_mib']:.0f} MiB", flush=True)

    columns = [("TP", "tp", ""), ("T", "length", ""), ("rows", "rows", ""), ("scored tokens", "scored_tokens", ""),
               ("one logits tensor MiB", "full_logits_mib", ".0f"),
               ("decoder-only peak MiB", "decoder_peak_mib", ".0f"),
               ("full-logits peak MiB", "full_peak_mib", ".0f"), ("chunked peak MiB", "chunked_peak_mib", ".0f"),
               ("peak ratio", "memory_ratio", ".2f"), ("full − decoder MiB", "full_logprob_mib", ".0f"),
               ("chunked − decoder MiB", "chunked_logprob_mib", ".0f"), ("ratio", "logprob_memory_ratio", ".2f"),
               ("full ms", "full_ms", ".0f"), ("chunked ms", "chunked_ms", ".0f"), ("time ratio", "time_ratio", ".2f")]
    machine = _common.machine_info("cpu")
    machine["torch_threads"] = ", ".join(f"TP={tp}: {max(1, cores // tp) if not args.threads else args.threads} "
                                         f"per rank" for tp in args.tp)
    _common.report(args.out, columns, rows, machine=machine, settings=vars(args), notes=[
        f"model: {args.layers} layers, hidden {HIDDEN}, vocabulary {args.vocab}, float32; peak = rise of the "
        f"peak resident set during one forward + backward (max over TP ranks)"])
    bad = [r for r in rows if r["logprob_sum_rel_diff"] > 1e-4]  # the decoder-only "sum" is not a log-prob
    if bad:
        print(f"WARNING: the two paths disagree on {len(bad)} cases (relative difference > 1e-4)")
        return 1
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, worker=_worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
