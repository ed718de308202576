"""Worker for tests/test_multirank.py: checks the launch environment and the rendezvous, or fails on purpose.

`python multirank_probe_worker.py MODE OUT_DIR`; MODE "sum": every rank all-reduces rank + 1 and writes what it
saw to OUT_DIR/rank{R}.json; MODE "fail": rank 1 raises (once rank 0 has started) while rank 0 waits for it in
the rendezvous, which never completes.
"""
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main(mode: str, out_dir: Path) -> None:
    rank = int(os.environ["RANK"])
    print(f"probe rank {rank} starting", flush=True)
    started = out_dir / "rank0-started"
    if mode == "fail" and rank == 0:
        started.write_text("")
    if mode == "fail" and rank == 1:
        while not started.exists():  # fail only once rank 0 has logged, so its log has something to show
            time.sleep(0.05)
        raise RuntimeError("probe rank 1 fails on purpose")
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))  # env:// from the launcher's variables
    if mode == "fail":
        dist.barrier()  # rank 1 never arrives: the launcher must kill this rank
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    import rpo  # importable without installation: the launcher puts the checkout on PYTHONPATH

    seen = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                 "MASTER_ADDR", "HF_HUB_OFFLINE", "EXTRA")}
    seen.update(sum=total.item(), world=dist.get_world_size(), rpo=str(Path(rpo.__file__).parent))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
