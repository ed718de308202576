"""tests/multirank.py, the one launcher of multi-rank test workers: environment, rendezvous, failure reports."""
import json
import time
from pathlib import Path

import pytest

import multirank

PROBE = Path(__file__).with_name("multirank_probe_worker.py")
REPO = Path(__file__).resolve().parents[1]


def test_ranks_rendezvous_with_torchrun_environment(tmp_path):
    result = multirank.launch(PROBE, 3, args=["sum", tmp_path], env={"EXTRA": "x"}, timeout=300)
    result.check()
    assert result.returncode == 0 and result.returncodes == [0, 0, 0]
    for rank in range(3):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["sum"] == 1 + 2 + 3 and seen["world"] == 3
        assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"], seen["LOCAL_WORLD_SIZE"]) == \
            (str(rank), str(rank), "3", "3")
        assert seen["MASTER_ADDR"] == "127.0.0.1" and seen["HF_HUB_OFFLINE"] == "1" and seen["EXTRA"] == "x"
        assert Path(seen["rpo"]) == REPO / "rpo"
        assert f"probe rank {rank} starting" in result.logs[rank]


def test_a_failing_rank_ends_the_launch_with_every_ranks_log(tmp_path):
    start = time.monotonic()
    result = multirank.launch(PROBE, 2, args=["fail", tmp_path], timeout=300, grace_s=2.0)
    waited = time.monotonic() - start
    assert result.returncodes[1] == 1 and result.returncodes[0] != 0  # rank 0 killed in its barrier
    assert not result.timed_out and waited < 300
    with pytest.raises(AssertionError) as failure:
        result.check()
    report = str(failure.value)
    assert "probe rank 0 starting" in report and "probe rank 1 fails on purpose" in report
    assert "rank 0 (exit" in report and "rank 1 (exit 1" in report


def test_timeout_kills_every_rank(tmp_path):
    result = multirank.launch(PROBE, 2, args=["fail", tmp_path], timeout=1.0, grace_s=600.0)
    assert result.timed_out and all(code != 0 for code in result.returncodes)
    with pytest.raises(AssertionError, match="timed out"):
        result.check()


def test_expected_exit_codes_and_bad_arguments(tmp_path):
    result = multirank.launch(PROBE, 2, args=["fail", tmp_path], timeout=300, grace_s=0.5)
    with pytest.raises(AssertionError):
        result.check([0, 1])
    assert result.check([-9, 1]) is result  # rank 0 was killed (SIGKILL) once rank 1 had failed
    with pytest.raises(ValueError, match="world_size"):
        multirank.start(PROBE, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        multirank.start(tmp_path / "missing.py", 2)


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    # A port from bind(0) is ephemeral: until the rank binds it, the kernel may hand it to any outgoing
    # connection of a concurrent launch (CI saw EADDRINUSE). Chosen ports must stay below that range.
    from rpo.models import parallel

    low, _ = parallel._ephemeral_port_range()
    ports = [multirank.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(parallel._LOWEST_CHOSEN_PORT <= port < low for port in ports)
    assert all(parallel._bindable(port) for port in ports[-20:])


def test_free_port_falls_back_to_the_kernel_when_the_range_leaves_no_room(tmp_path, monkeypatch):
    from rpo.models import parallel

    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("10500\t60999\n")
    monkeypatch.setattr(parallel, "_EPHEMERAL_RANGE_FILE", str(range_file))
    assert parallel._ephemeral_port_range() == (10500, 60999)
    ports = [parallel.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(port >= 10500 for port in ports)
