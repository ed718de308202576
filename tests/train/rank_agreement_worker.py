"""Two gloo ranks exercise rpo.train.ranks (for tests/train/test_train_command.py; started by tests/multirank.py).

`python rank_agreement_worker.py OUT_DIR` runs every case in turn; for each, every rank writes
OUT_DIR/CASE-rankR.json with what it saw: whether it ran the block, and the type and message of the error it
raised (or null). A barrier after each case shows that no rank was left behind in a collective.
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from rpo.train import ranks
from rpo.train.config import ConfigError


# case: (context manager, rank that fails in the block, its error)
CASES = {
    "together-rank1-user": (ranks.together, 1, ConfigError("row 3 of data.jsonl is bad")),
    "together-rank0-bug": (ranks.together, 0, KeyError("missing")),
    "main-first-rank0-user": (ranks.main_first, 0, ConfigError("--dataset x: no such file")),
    "main-first-rank1-user": (ranks.main_first, 1, ConfigError("rank 1 cannot read the cache")),
    "main-first-ok": (ranks.main_first, None, None),
}


def run_case(case: str, out_dir: str) -> None:
    manager, failing_rank, error = CASES[case]
    seen = {"ran_block": False, "error_type": None, "error": None, "is_config_error": False}
    try:
        with manager():
            seen["ran_block"] = True
            if dist.get_rank() == failing_rank:
                raise error
    except Exception as raised:  # noqa: BLE001 - recorded for the test
        seen.update(error_type=type(raised).__name__, error=str(raised).strip("'"),
                    is_config_error=isinstance(raised, ConfigError))
    dist.barrier()  # every rank reaches this: no rank was left behind in a collective
    Path(out_dir, f"{case}-rank{dist.get_rank()}.json").write_text(json.dumps(seen))


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    for case in CASES:
        run_case(case, out_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
