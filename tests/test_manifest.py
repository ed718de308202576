"""rpo.manifest: the versioned JSON of a tokenised data set folder or a checkpoint, and its errors."""
import json

import pytest

from rpo.manifest import read_manifest


def test_reads_the_manifest_of_the_expected_version(tmp_path):
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps({"format": 3, "step": 7}))
    assert read_manifest(path, version_key="format", version=3, missing="none", label="x") == {"format": 3, "step": 7}


def test_a_missing_manifest_raises_the_given_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="^--resume run: not a checkpoint folder$"):
        read_manifest(tmp_path / "trainer.json", version_key="format", version=1,
                      missing="--resume run: not a checkpoint folder", label="x")


def test_another_version_names_the_folder_and_both_versions(tmp_path):
    path = tmp_path / "rpo_tokenized.json"
    path.write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ValueError, match=r"^tok/rpo_tokenized.json: format_version 2, expected 1$"):
        read_manifest(path, version_key="format_version", version=1, missing="m", label="tok/rpo_tokenized.json")


def test_the_tokenised_data_set_reader_uses_it(tmp_path):
    from rpo.data.tokenization import TokenizedPreferenceDataset

    with pytest.raises(FileNotFoundError, match="no rpo_tokenized.json; not a folder written by save_to_disk"):
        TokenizedPreferenceDataset.load_from_disk(tmp_path)
    (tmp_path / "rpo_tokenized.json").write_text(json.dumps({"format_version": 999}))
    with pytest.raises(ValueError, match=r"rpo_tokenized.json: format_version 999, expected \d+$"):
        TokenizedPreferenceDataset.load_from_disk(tmp_path)


def test_the_checkpoint_reader_tells_a_missing_folder_from_a_damaged_one(tmp_path):
    from rpo.train.checkpoint import READABLE_VERSIONS, CheckpointDamaged, load_trainer_state

    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_trainer_state(tmp_path / "absent")
    # trainer.json is written last: a folder without it was cut off while being written.
    with pytest.raises(CheckpointDamaged, match="trainer.json is missing"):
        load_trainer_state(tmp_path)
    unknown = max(READABLE_VERSIONS) + 1
    (tmp_path / "trainer.json").write_text(json.dumps({"format": unknown}))
    with pytest.raises(CheckpointDamaged, match=f"unknown checkpoint format {unknown}"):
        load_trainer_state(tmp_path)
