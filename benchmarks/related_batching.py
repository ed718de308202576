"""Related-prompt batches (--batching related): how related they are, and what building them costs.

1. On the shared data (../shared/data, MiniLM prompt embeddings as the trainer computes them): the mean prompt
   cosine of the global batch's off-diagonal pairs (every chosen answer against every other pair's rejected one;
   what the contrast matrix weights), random vs related batches, per layout (global batch, ranks) and
   --related-fraction, averaged over the batches of --epochs epochs. The same number the trainer logs per step
   as batch/offdiag_prompt_cosine.
2. Building one epoch's batches (PreferenceBatcher's plan: permutation, bisection tree, layout) for --rows
   synthetic rows (default 170k, the paper's data size; 384-D clustered embeddings), paired and unpaired, at the
   paper's layout (8 ranks x 8 pairs), on one thread: wall and CPU seconds (the CPU time is the stable measure
   on a shared machine) and the peak memory above what was resident before.

    .venv/bin/python benchmarks/related_batching.py [--rows 170000] [--epochs 3] [--out PATH]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# (global batch, ranks): the alignment benchmark's layout and the paper's (64 pairs on 8 GPUs).
LAYOUTS = ((8, 2), (64, 8))
FRACTIONS = (0.5, 1.0)


def token_dataset(rows: int, labels: np.ndarray | None):
    """A TokenizedPreferenceDataset of `rows` one-token rows: the batcher's plan reads only the labels."""
    import datasets

    from rpo.data import TokenizedPreferenceDataset
    from rpo.data.tokenization import TokenizeReport

    ids, mask = [[1, 2]] * rows, [[False, True]] * rows
    if labels is None:
        columns = {"chosen_input_ids": ids, "chosen_loss_mask": mask, "rejected_input_ids": ids,
                   "rejected_loss_mask": mask}
    else:
        columns = {"completion_input_ids": ids, "completion_loss_mask": mask, "label": labels.tolist()}
    return TokenizedPreferenceDataset(datasets.Dataset.from_dict(columns), "paired" if labels is None else "unpaired",
                                      0, TokenizeReport(rows, rows, 0, 0, 0, False, 1, 2))


def global_batches(tokenized, embeddings: torch.Tensor, global_batch: int, ranks: int, epoch: int, **options):
    """Per global batch: (chosen rows, rejected rows) over all ranks."""
    from rpo.data import PreferenceBatcher

    batchers = [PreferenceBatcher(tokenized, embeddings, global_batch // ranks, rank, ranks, seed=0, **options)
                for rank in range(ranks)]
    plans = [b._epoch_plan(epoch) for b in batchers]  # row ids only: no token columns read
    return [(np.concatenate([plan[i][0] for plan in plans]), np.concatenate([plan[i][1] for plan in plans]))
            for i in range(len(plans[0]))]


def offdiagonal_cosine(embeddings: torch.Tensor, chosen: np.ndarray, rejected: np.ndarray, paired: bool) -> float:
    from rpo.data.related import mean_offdiagonal_cosine, offdiagonal_cosine_sums

    sums = offdiagonal_cosine_sums(embeddings[torch.as_tensor(chosen)], embeddings[torch.as_tensor(rejected)], paired)
    return mean_offdiagonal_cosine(sums, paired)


def shared_data_rows(epochs: int) -> list[dict]:
    from rpo.data import compute_prompt_embeddings, load_preference_dataset

    rows = []
    for kind in ("paired", "unpaired"):
        dataset = load_preference_dataset(SHARED_DATA / f"{kind}.jsonl")
        embeddings = compute_prompt_embeddings(list(dataset.rows["prompt"]),
                                               cache_dir=Path.home() / ".cache" / "rpo" / "prompt_embeddings")
        labels = None if kind == "paired" else np.asarray(dataset.rows["label"], dtype=bool)
        tokenized = token_dataset(len(dataset.rows), labels)
        for global_batch, ranks in LAYOUTS:
            if len(dataset.rows) < global_batch:
                continue
            cases = [("random", None)] + [("related", fraction) for fraction in FRACTIONS]
            for batching, fraction in cases:
                options = {"batching": batching, **({"related_fraction": fraction} if fraction else {})}
                values = [offdiagonal_cosine(embeddings, chosen, rejected, kind == "paired")
                          for epoch in range(epochs)
                          for chosen, rejected in global_batches(tokenized, embeddings, global_batch, ranks, epoch,
                                                                 **options)]
                rows.append({"part": "cosine", "data": f"shared {kind} ({len(dataset.rows)} rows)",
                             "layout": f"{global_batch} = {ranks} x {global_batch // ranks}", "batching": batching,
                             "fraction": fraction, "offdiag_cosine": float(np.mean(values)),
                             "batches": len(values)})
    return rows


def synthetic_embeddings(rows: int, dim: int = 384, clusters: int = 2000, seed: int = 0) -> torch.Tensor:
    """Unit vectors around `clusters` random topics (a broad data set: most pairs unrelated)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, rows)] + rng.standard_normal((rows, dim)).astype(np.float32)
    return torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)


def build_time_rows(num_rows: int) -> list[dict]:
    from rpo.data import PreferenceBatcher

    torch.set_num_threads(1)
    _common.limit_malloc_caching()  # freed blocks go back at once, so the peak counts this plan's memory only
    embeddings = synthetic_embeddings(num_rows)
    rows = []
    for kind in ("paired", "unpaired"):
        labels = None if kind == "paired" else np.random.default_rng(1).random(num_rows) < 0.55
        tokenized = token_dataset(num_rows, labels)
        for batching in ("random", "related"):
            batcher = PreferenceBatcher(tokenized, embeddings, 8, rank=0, world_size=8, seed=0, batching=batching)
            with _common.PeakMemory("cpu") as memory:
                started, cpu_started = time.perf_counter(), time.process_time()
                plan = batcher._epoch_plan(0)
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            rows.append({"part": "build", "data": f"synthetic {kind} ({num_rows} rows, 384-D)",
                         "layout": "64 = 8 x 8", "batching": batching, "fraction": 0.5 if batching == "related"
                         else None, "build_s": seconds, "build_cpu_s": cpu_seconds, "batches": len(plan),
                         "peak_mib": memory.peak_bytes / 2**20,
                         "embeddings_mib": embeddings.numel() * embeddings.element_size() / 2**20})
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, default=170_000, help="synthetic rows for the build-time part")
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged for the cosine part")
    parser.add_argument("--out", type=Path, default=_common.default_output("related_batching"))


def run(args, parser) -> int:
    rows = shared_data_rows(args.epochs) + build_time_rows(args.rows)
    columns = [("data", "data", ""), ("global batch = ranks x per rank", "layout", ""), ("batching", "batching", ""),
               ("related fraction", "fraction", ".2f"), ("mean off-diagonal prompt cosine", "offdiag_cosine", ".3f"),
               ("batches", "batches", "d"), ("epoch build s (1 thread)", "build_s", ".2f"),
               ("CPU s", "build_cpu_s", ".2f"),
               ("peak MiB above start", "peak_mib", ".0f"), ("embeddings MiB", "embeddings_mib", ".0f")]
    _common.report(args.out, columns, rows, machine=_common.machine_info(), settings=vars(args),
                   notes=["cosine: mean over the global batches of --epochs epochs (seed 0); build: one epoch's "
                          "plan of PreferenceBatcher on rank 0 (every rank builds the same plan)"])
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
