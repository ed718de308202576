"""benchmarks/gpu_check.sh, the GPU proof: the script is valid bash and shellcheck-clean, and its dry run
(GPU_CHECK_DRY_RUN=1: every stage's entry point on this CPU with tiny sizes) runs every stage, writes at most 8
files and a summary.json whose figures come from real runs; plus the pieces its figures rest on (the FLOP count
behind MFU, the summary's verdict)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import check_common  # noqa: E402
import write_summary  # noqa: E402

PROOF_STAGES = {"packages", "build", "op_tests", "op_numerics", "op_benchmark", "trainer", "llama_1b",
                "trainer_accumulation"}


def dry_run(out: Path, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, OUT=str(out), **env)
    for name in ("GPU_CHECK_STAGE", "GPU_CHECK_ASSETS", "GPU_CHECK_BUNDLE"):
        if name not in env:
            environment.pop(name, None)  # the caller's settings only
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=1800)


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    proc = dry_run(out)
    summary_file = out / "summary.json"
    assert summary_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out, json.loads(summary_file.read_text())


def test_dry_run_runs_every_stage_and_passes(proof):
    proc, out, result = proof
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert result["passed"], result["failed_stages"]
    assert PROOF_STAGES <= set(result["stages"])
    assert result["stages"]["packages"]["status"] == "skipped"  # the carried wheels are for Python 3.12
    for name in PROOF_STAGES - {"packages"}:
        assert result["stages"][name]["status"] == "passed", (name, result["stages"][name])
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert result["files"] == files


def test_dry_run_figures_come_from_the_runs(proof):
    _, out, result = proof
    trainer = result["stages"]["trainer"]["figures"]
    assert trainer["dry_run"] and trainer["device"] == "cpu"
    for case in ("dpo", "rpo", "rpo --global-contrast", "dpo float32", "logps bf16 vs fp32"):
        assert trainer["cases"][case]["status"] == "passed", (case, trainer["cases"][case])
    for case in ("dpo", "rpo", "rpo --global-contrast"):
        figures = trainer["cases"][case]
        assert figures["steps"] == 2 and figures["tokens_per_s"] > 0 and figures["step_time_s"] > 0
        assert all(math.isfinite(loss) for loss in figures["loss"])
        assert figures["loss"][0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    # Both runs are float32 on a CPU: the log-probs of the same first batch agree exactly.
    assert max(trainer["cases"]["logps bf16 vs fp32"]["relative_difference"].values()) < 1e-6
    for name, case in trainer["cases"].items():
        assert case["status"] in ("passed", "not available"), (name, case)
        if name.startswith("rpo --global-contrast ") and case["status"] == "passed":  # a scale option
            assert case["first_loss_vs_baseline"] < 1e-5, (name, case)
    from rpo.train import TrainConfig

    if {"recompute", "packing", "distributed_optimizer"} <= set(TrainConfig.field_names()):
        combined = [name for name in trainer["cases"] if name.startswith("rpo --global-contrast recompute=")]
        assert combined and trainer["cases"][combined[0]]["status"] == "passed", trainer["cases"].keys()
    accumulation = result["stages"]["trainer_accumulation"]["figures"]["cases"]
    for mode in ("none", "full"):
        contrast = accumulation[f"accumulation: rpo --global-contrast, 2 micro-batches, recompute {mode}"]
        dpo = accumulation[f"accumulation: dpo, 2 micro-batches, recompute {mode}"]
        assert contrast["status"] == dpo["status"] == "passed", (contrast, dpo)
        assert contrast["kept_graphs"] == 2 and contrast["time_vs_dpo"] > 0 and dpo["tokens_per_s"] > 0
    trl = accumulation["trl"]
    try:
        import trl as _trl  # noqa: F401
    except ImportError:
        assert trl["status"] == "not available", trl
    else:
        assert trl["status"] == "passed", trl
        assert trl["rpo"]["tokens_per_s"] > 0 and trl["trl"]["tokens_per_s"] > 0 and trl["rpo_speed_vs_trl"] > 0
    numerics = result["stages"]["op_numerics"]["figures"]
    assert numerics["extension"] and numerics["native_kernel"]
    assert {c["status"] for c in numerics["cases"].values()} == {"passed"}
    llama = result["stages"]["llama_1b"]["figures"]["cases"]
    assert llama["no recomputation"]["status"] == "passed"
    assert llama["no recomputation"]["parameters"] > 0
    assert llama["full recomputation"]["status"] == "skipped"  # dry run: the first case only
    benchmark = json.loads((out / "op_benchmark.json").read_text())
    assert [row["M = N"] for row in benchmark["rows"]] == [64]
    assert benchmark["rows"][0]["op ms"] > 0 and "op error" not in benchmark["rows"][0]
    assert result["stages"]["op_benchmark"]["figures"] == benchmark["rows"]


def test_alignment_run_records_its_stage(tmp_path):
    proc = dry_run(tmp_path, GPU_CHECK_STAGE="alignment")
    result = json.loads((tmp_path / "summary.json").read_text())
    assert set(result["stages"]) == {"packages", "build", "alignment"}, result["stages"]
    expected = "passed" if (REPO / "benchmarks" / "alignment.py").is_file() else "not available"
    assert result["stages"]["alignment"]["status"] == expected
    assert proc.returncode == 0 and result["passed"], proc.stdout[-3000:]


def test_frontier_run_records_its_stage(tmp_path):
    proc = dry_run(tmp_path, GPU_CHECK_STAGE="frontier")
    result = json.loads((tmp_path / "summary.json").read_text())
    assert set(result["stages"]) == {"packages", "build", "frontier"}, result["stages"]
    assert result["stages"]["frontier"]["status"] == "passed"
    assert result["stages"]["frontier"]["limit_s"] > result["stages"]["build"]["limit_s"]  # its own budget
    log = (tmp_path / "frontier.log").read_text()
    assert "benchmarks/frontier.py --gpu --dry-run" in log and "preset gpu: 15 trainings" in log
    assert proc.returncode == 0 and result["passed"], proc.stdout[-3000:]


def test_matmul_parameters_count_every_linear_layer_and_the_tied_head():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # The tied output layer is a Linear sharing the embedding: counted once among the Linear layers.
    assert check_common.llama_matmul_params(config) == linear
    flops = check_common.train_flops_per_token(config, 100, reference_forward=False)
    attention = 3 * 8 * 16 * 100
    assert flops == 6 * linear + 12 * attention
    assert check_common.train_flops_per_token(config, 100, reference_forward=True) == flops + 2 * linear + 4 * attention


def _write_stages(work: Path, *entries):
    work.mkdir(parents=True, exist_ok=True)
    (work / "stages.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_summary_fails_on_a_failed_or_timed_out_stage(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    _write_stages(work, {"name": "build", "status": "passed", "rc": 0, "seconds": 1, "limit_s": 9},
                  {"name": "trainer", "status": "timeout", "rc": 124, "seconds": 9, "limit_s": 9},
                  {"name": "alignment", "status": "not available", "rc": 0, "seconds": 0, "limit_s": 0})
    assert write_summary.main([str(work), str(out), "--total-seconds", "10"]) == 1
    result = json.loads((out / "summary.json").read_text())
    assert result["failed_stages"] == ["trainer"] and not result["passed"]


def test_summary_fails_when_the_op_benchmark_op_errs_but_not_when_eager_runs_out_of_memory(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    _write_stages(work, {"name": "op_benchmark M=N=8", "status": "passed", "rc": 0, "seconds": 1, "limit_s": 9})
    (work / "op_benchmark").mkdir()
    row = {"M = N": 8, "op ms": 1.0, "eager error": "out of memory: CUDA out of memory"}
    (work / "op_benchmark" / "8.json").write_text(json.dumps({"rows": [row]}))
    assert write_summary.main([str(work), str(out), "--total-seconds", "1"]) == 0
    row["op error"] = "worker failed"
    (work / "op_benchmark" / "8.json").write_text(json.dumps({"rows": [row]}))
    assert write_summary.main([str(work), str(out), "--total-seconds", "1"]) == 1
    assert json.loads((out / "summary.json").read_text())["failed_stages"] == ["op_benchmark"]


def test_summary_fails_when_more_than_eight_files_would_come_back(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    for index in range(8):
        (out / f"log{index}.txt").write_text("x")
    _write_stages(work, {"name": "build", "status": "passed", "rc": 0, "seconds": 1, "limit_s": 9})
    assert write_summary.main([str(work), str(out), "--total-seconds", "1"]) == 1
