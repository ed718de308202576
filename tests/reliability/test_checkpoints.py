"""Damaged checkpoints are found, not loaded: every file's size and SHA-256 are recorded at save and checked at
load; `--resume` reports a damaged checkpoint in one line and falls back to the newest intact one (which then
continues bit for bit); replacing a step is atomic; a disk that fills during a save costs one line and nothing
else; a resume that would change the learning-rate schedule is refused unless allowed, and then rebuilt.

The 2-rank runs are cases of tests/reliability/reliability_workers.py; the rest runs in this process.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_same_steps, assert_same_weights, history, metrics, one_line, outcome, weights, workers
from rpo.train import checkpoint as ckpt

REPORTED = {  # how each damage of checkpoint 4 is reported in the fallback line
    "middle": "model-tp00.safetensors: SHA-256 differs from the one recorded at save",
    "end": "model-tp00.safetensors: SHA-256 differs from the one recorded at save",
    "truncated-safetensors": "optimizer-tp00.safetensors has 103726 bytes, 207452 were written",
    "truncated-rank1-json": "rank-00001.json has",
    "truncated-trainer-json": "trainer.json cannot be read",
}


@pytest.mark.parametrize("damage", sorted(workers.DAMAGES))
def test_damaged_checkpoint_is_reported_and_resume_falls_back_to_the_intact_one(cases, damage):
    """Before: bytes changed in the middle of a safetensors file resumed (exit 0) on values of 3.4e38, at its end
    with NaN in the output layer; a truncated safetensors or JSON file gave three tracebacks and no fallback."""
    name = f"damaged-{damage}"
    assert outcome(cases, name) == [(0, []), (0, [])]
    run = cases / "runs" / name
    log = (cases / "logs" / "cases-rank0.log").read_text()
    fallback = [line for line in log.splitlines() if f"{run}/checkpoints" in line or
                (f"--resume: checkpoint step-00000004: {REPORTED[damage].split(' ')[0]}" in line)]
    assert any(f"--resume: checkpoint step-00000004: {REPORTED[damage]}" in line and
               "falling back to the previous one (step-00000002)" in line for line in fallback), fallback
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2 (the newest intact one" in log
    assert_same_steps(history(cases, name), history(cases, "reference")[2:])
    assert_same_steps(metrics(run), metrics(cases / "runs" / "reference"))
    assert_same_weights(weights(cases, name), weights(cases, "reference"))


def test_no_intact_checkpoint_is_one_line_exit_2(cases):
    line = one_line(outcome(cases, "all-damaged"), 2)
    assert line.startswith(f"train.py: error: --resume: no intact checkpoint in {cases}/runs/all-damaged/checkpoints "
                           f"(step-00000004: model-tp00.safetensors: SHA-256 differs"), line
    assert "step-00000002: rank-00000.safetensors has" in line


def test_an_explicitly_named_damaged_checkpoint_is_refused(cases):
    path = cases / "runs" / "explicit-damaged" / "checkpoints" / "step-00000004"
    line = one_line(outcome(cases, "explicit-damaged"), 2)
    assert line.startswith(f"train.py: error: --resume {path}: damaged checkpoint: step-00000004: model-tp00."
                           f"safetensors: SHA-256 differs"), line


def test_disk_full_during_a_save_is_one_line_exit_4_and_loses_nothing(cases):
    """Rank 1 cannot write its file of checkpoint 2 (ENOSPC). Before: three tracebacks."""
    run = cases / "runs" / "disk-full"
    line = one_line(outcome(cases, "disk-full"), 4)
    assert line.startswith(f"train.py: error: could not write the checkpoint of step 2 in {run / 'checkpoints'} "
                           f"(rank 1: [Errno 28] No space left on device"), line
    assert line.endswith("the earlier checkpoints are untouched")
    # then the run resumed on a disk with room: from checkpoint 1, exactly as the uninterrupted run
    assert outcome(cases, "disk-full-resumed") == [(0, []), (0, [])]
    assert [r["step"] for r in history(cases, "disk-full-resumed")] == [2, 3, 4, 5, 6]
    assert_same_steps(history(cases, "disk-full-resumed"), history(cases, "reference")[1:])
    assert_same_weights(weights(cases, "disk-full-resumed"), weights(cases, "reference"))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_schedule_change_on_resume_is_refused_unless_allowed_then_rebuilt(cases):
    """Resume from step 4 of a 6-step cosine run with --max-steps 8. Before: accepted silently, the first resumed
    step at the old schedule's learning rate, later ones at the new schedule's."""
    from rpo.train.optim import lr_factor

    path = cases / "runs" / "schedule" / "checkpoints" / "step-00000004"
    line = one_line(outcome(cases, "schedule-refused"), 2)
    assert line == (f"train.py: error: --resume {path}: the learning-rate schedule of steps 5-8 would change: "
                    f"--max-steps 6 in the checkpointed run (6 steps), now 8 (8 steps); keep the options, or pass "
                    f"--allow-schedule-change to rebuild the schedule from step 5")
    assert outcome(cases, "schedule-allowed") == [(0, []), (0, [])]
    resumed = history(cases, "schedule-allowed")
    lr = workers.RUN["lr"]
    new = [lr * lr_factor(step, warmup_steps=1, total_steps=8, schedule="cosine", min_lr_ratio=0.0)
           for step in range(5, 9)]
    old = lr * lr_factor(5, warmup_steps=1, total_steps=6, schedule="cosine", min_lr_ratio=0.0)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["lr"] for r in resumed] == pytest.approx(new, rel=1e-12)
    assert resumed[0]["lr"] != pytest.approx(old, rel=1e-6)


# ================================================================================================ units ===
def _save(root, step, value: float, **kwargs):
    return ckpt.save_checkpoint(root, step, trainer_state={"step": step, "total_steps": 9, "world_size": 1,
                                                           "tensor_parallel": 1, "config": {}},
                                model_state={"w": torch.full((4,), value)}, optimizer_state={"m": torch.zeros(2)},
                                rank_state={"rng": [1, 2]}, tp_rank=0, **kwargs)


def test_checkpoint_records_and_checks_every_file(tmp_path):
    path = _save(tmp_path, 3, 1.0)
    manifest = json.loads((path / "trainer.json").read_text())
    assert sorted(manifest["files"]) == ["model-tp00.safetensors", "optimizer-tp00.json",
                                         "optimizer-tp00.safetensors", "rank-00000.json", "rank-00000.safetensors"]
    for name, entry in manifest["files"].items():
        assert entry == ckpt.file_digest(path / name)
    loaded = ckpt.load_checkpoint(path, rank=0, tp_rank=0)
    assert torch.equal(loaded["model"]["w"], torch.ones(4)) and loaded["rank"] == {"rng": [1, 2]}
    # one changed byte anywhere, a shortened file, a missing file, an edited trainer.json
    original = (path / "model-tp00.safetensors").read_bytes()
    (path / "model-tp00.safetensors").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointDamaged, match="model-tp00.safetensors: SHA-256 differs"):
        ckpt.load_checkpoint(path, rank=0, tp_rank=0)
    (path / "model-tp00.safetensors").write_bytes(original)
    (path / "rank-00000.json").write_text("{")
    with pytest.raises(ckpt.CheckpointDamaged, match=r"rank-00000.json has 1 bytes, \d+ were written"):
        ckpt.load_checkpoint(path, rank=0, tp_rank=0)
    (path / "rank-00000.json").unlink()
    with pytest.raises(ckpt.CheckpointDamaged, match="rank-00000.json is missing"):
        ckpt.verify_file(path, "rank-00000.json", manifest)
    edited = dict(manifest, step=4)
    (path / "trainer.json").write_text(json.dumps(edited))
    with pytest.raises(ckpt.CheckpointDamaged, match="trainer.json does not match its checksum"):
        ckpt.load_trainer_state(path)


def test_replacing_a_step_is_atomic(tmp_path, monkeypatch):
    """A failed re-save of step 3 leaves the old step 3 whole; a crash between renaming the old folder aside and
    renaming the new one in leaves .old-step-…, which the next start restores."""
    _save(tmp_path, 3, 1.0)
    real = ckpt.save_file

    def fail(tensors, path, *args, **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(ckpt, "save_file", fail)
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write the checkpoint of step 3"):
        _save(tmp_path, 3, 2.0)
    monkeypatch.setattr(ckpt, "save_file", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "step-00000003", rank=0, tp_rank=0)["model"]["w"],
                       torch.ones(4))
    _save(tmp_path, 3, 2.0)  # a successful re-save replaces it
    assert torch.equal(ckpt.load_model_state(tmp_path / "step-00000003", 0)["w"], torch.full((4,), 2.0))
    # the crash window: old renamed aside, new not yet renamed in
    (tmp_path / "step-00000003").rename(tmp_path / ".old-step-00000003")
    (tmp_path / ".tmp-step-00000003").mkdir()
    ckpt.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]
    assert torch.equal(ckpt.load_model_state(tmp_path / "step-00000003", 0)["w"], torch.full((4,), 2.0))


def test_pruning_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, float(step))
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 2)] == ["step-00000001"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


@pytest.mark.parametrize("schedule, changed, refused", [
    ("constant", dict(max_steps=12), False),  # a longer run keeps every rate of the constant schedule
    ("cosine", dict(max_steps=12), True),
    ("constant", dict(lr=1e-6), True),
    ("constant", dict(warmup_steps=2), False),  # the warm-up ended before step 6 either way
    ("constant", dict(warmup_steps=8), True),
])
def test_schedule_change_is_a_change_of_a_remaining_rate(schedule, changed, refused):
    from rpo.train import TrainConfig
    from rpo.train.optim import schedule_change

    before = dict(max_steps=10, lr=5e-7, warmup_steps=1, lr_schedule=schedule)
    now = TrainConfig(**{**before, **changed})
    changes = schedule_change(TrainConfig(**before).to_dict(), 10, now, now.max_steps, step=6)
    assert bool(changes) == refused, changes
    if "lr" in changed:
        assert changes == ["--lr 5e-07 in the checkpointed run, now 1e-06"]
