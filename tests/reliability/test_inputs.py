"""The last silent inputs: undecodable bytes in a data file are one line naming the file and line (skipped and
counted with --skip-bad-rows); a set-up error on one rank, a loss that needs pairs on unpaired data, a disk that
fills on rank 0 only and a bug on one rank all end every rank together with one line (no hang, no "Connection
closed by peer"); a run stopped by a data error leaves nothing that blocks its corrected rerun.
"""
from __future__ import annotations

import pytest

from conftest import one_line, outcome, quiet
from rpo.data import BadRowError, load_preference_dataset


def _rows(*prompts: bytes) -> bytes:
    return b"".join(b'{"prompt": "' + p + b'", "chosen": "yes", "rejected": "no"}\n' for p in prompts)


def test_undecodable_bytes_name_the_file_and_line_and_are_skipped_and_counted(tmp_path):
    """Before: a UnicodeDecodeError traceback naming no file or line, also with --skip-bad-rows."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_rows(b"hello", b"caf\xe9", b"bye"))
    with pytest.raises(BadRowError) as caught:
        load_preference_dataset(path)
    assert str(caught.value).startswith(f"{path}: row 1 (line 2), field '<row>': not UTF-8 text: byte 0xe9 at "
                                        f"column 16 [unparseable_json]")
    dataset = load_preference_dataset(path, skip_bad_rows=True)
    assert len(dataset) == 2 and dataset.report.skipped["unparseable_json"] == 1
    assert dataset.report.skipped_examples["unparseable_json"] == ["row 1 (line 2)"]
    assert [row["prompt"][0]["content"] for row in dataset] == ["hello", "bye"]


@pytest.mark.parametrize("suffix, content, message", [
    (".json", b'[{"prompt": "a\xff", "chosen": "b", "rejected": "c"}]',
     "line 1, column 15: not UTF-8 text (byte 0xff); save the file as UTF-8"),
    (".csv", b"prompt,chosen,rejected\na,b,c\nd\xff,e,f\n",
     "line 3, column 2: not UTF-8 text (byte 0xff); save the file as UTF-8 (rows of a CSV file cannot be skipped)"),
])
def test_undecodable_bytes_in_a_whole_file_format_name_the_line(tmp_path, suffix, content, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    for skip in (False, True):
        with pytest.raises(ValueError, match=None) as caught:
            load_preference_dataset(path, skip_bad_rows=skip)
        assert str(caught.value) == f"{path}: {message}"


def test_undecodable_bytes_in_a_run_are_one_line_and_the_fixed_rerun_is_not_refused(cases):
    """Before: the failed run left config.yaml and the corrected rerun into the same folder was refused as "holds a
    previous run"."""
    line = one_line(outcome(cases, "bad-bytes"), 2)
    assert line.startswith(f"train.py: error: {cases / 'bad-bytes.jsonl'}: row 5 (line 6), field '<row>': not "
                           f"UTF-8 text: byte 0xe9 at column"), line
    assert outcome(cases, "bad-bytes-fixed") == [(0, []), (0, [])]
    log = (cases / "logs" / "cases-rank0.log").read_text()
    assert "holds a previous run" not in log


def test_a_setup_error_on_one_rank_ends_every_rank_with_one_line(cases):
    """A loss plugin that refuses unpaired data on rank 1 only, where the trainer builds the loss for unpaired
    data."""
    line = one_line(outcome(cases, "rank1-refuses-unpaired"), 2)
    assert line.endswith("rank1_refuses_unpaired.py: this test loss refuses unpaired data on rank 1"), line


def test_dpo_on_unpaired_data_is_refused_before_training_on_every_rank(cases):
    """Before: dpo silently paired chosen and rejected answers of different prompts, then (3 chosen, 1 rejected in
    a batch) failed on one rank while the other reported a gloo "Connection closed by peer"."""
    line = one_line(outcome(cases, "dpo-unpaired"), 2)
    assert line.startswith("train.py: error: --loss dpo:") and "pair" in line, line
    assert not (cases / "runs" / "dpo-unpaired" / "metrics.jsonl").exists()


def _lines(result):
    return [(rank, line) for rank, log in enumerate(result.logs) for line in log.splitlines()
            if line.startswith("train.py:")]


def test_disk_full_on_rank_0_only_ends_both_ranks_with_one_line_exit_4(real_runs):
    """Rank 0 cannot append step 2 to metrics.jsonl; rank 1 is then waiting in step 3's first collective: its
    watchdog sees rank 0's failure and ends it quietly with the same status."""
    result = real_runs["metrics-full"]
    assert result.returncodes == [4, 4] and not result.timed_out, result.report()
    lines = _lines(result)
    assert len(lines) == 1 and lines[0][0] == 0, result.report()
    assert lines[0][1].startswith("train.py: error: could not write: [Errno 28] No space left on device"), lines
    assert all(quiet(log) for log in result.logs), result.report()


def test_a_bug_on_one_rank_is_one_traceback_and_one_line(real_runs):
    """Rank 1 raises after step 2: its traceback in its log, rank 0's one line, exit 1 on both ranks, no
    "Connection closed by peer"."""
    result = real_runs["bug"]
    assert result.returncodes == [1, 1] and not result.timed_out, result.report()
    lines = _lines(result)
    assert lines == [(0, "train.py: error: rank 1 failed: RuntimeError: injected bug after step 2 (traceback in "
                         "its log; please report it)")], result.report()
    assert "RuntimeError: injected bug after step 2" in result.logs[1]
    assert quiet(result.logs[0]) and quiet(result.logs[1], tracebacks=1), result.report()
