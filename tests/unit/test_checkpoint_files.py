"""Checkpoint integrity logic on plain files: manifest, corruption fallback, keep-last-K."""
import os

from r1mega.config import CheckpointConfig
from r1mega.train.checkpoint import (CheckpointManager, list_checkpoints, verify_checkpoint,
                                     write_manifest)


def _fake_ckpt(root, step, payload=b"weights"):
    path = os.path.join(root, f"step_{step:08d}")
    os.makedirs(os.path.join(path, "model"))
    with open(os.path.join(path, "model", "shard.distcp"), "wb") as f:
        f.write(payload * 100)
    with open(os.path.join(path, "trainer.json"), "w") as f:
        f.write('{"format": 1, "step": %d}' % step)
    write_manifest(path)
    return path


def test_intact_checkpoint_verifies(tmp_path):
    path = _fake_ckpt(str(tmp_path), 1)
    assert verify_checkpoint(path) is None


def test_each_kind_of_damage_is_detected(tmp_path):
    root = str(tmp_path)
    flipped = _fake_ckpt(root, 1)
    data = bytearray(open(os.path.join(flipped, "model", "shard.distcp"), "rb").read())
    data[10] ^= 0xFF  # same size, different bytes
    open(os.path.join(flipped, "model", "shard.distcp"), "wb").write(bytes(data))
    assert "sha256" in verify_checkpoint(flipped)

    truncated = _fake_ckpt(root, 2)
    with open(os.path.join(truncated, "model", "shard.distcp"), "r+b") as f:
        f.truncate(5)
    assert "bytes" in verify_checkpoint(truncated)

    missing = _fake_ckpt(root, 3)
    os.remove(os.path.join(missing, "trainer.json"))
    assert "missing" in verify_checkpoint(missing)

    partial = _fake_ckpt(root, 4)
    os.remove(os.path.join(partial, "manifest.json"))
    assert "manifest" in verify_checkpoint(partial)


def test_corrupt_newest_falls_back_to_previous_with_warning(tmp_path, capsys):
    root = str(tmp_path)
    good = _fake_ckpt(root, 5)
    bad = _fake_ckpt(root, 10)
    open(os.path.join(bad, "model", "shard.distcp"), "ab").write(b"garbage")
    mgr = CheckpointManager(CheckpointConfig(dir=root), layout={"world": 1})
    assert mgr.find_latest_valid() == good
    seen = capsys.readouterr()
    assert "unusable" in seen.out and (seen.out + seen.err).count("unusable") == 1  # said once


def test_temporary_dirs_are_never_taken_for_checkpoints(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, ".tmp-step_00000009"))
    _fake_ckpt(root, 3)
    assert [s for s, _ in list_checkpoints(root)] == [3]


def test_prune_keeps_last_k(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 4):
        _fake_ckpt(root, step)
    mgr = CheckpointManager(CheckpointConfig(dir=root, keep_last=2), layout={})
    mgr._prune()
    assert [s for s, _ in list_checkpoints(root)] == [4, 3]
