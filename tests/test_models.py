"""The model cache: merged base+adapter copies are reused by content and kept within a disk budget."""

import fcntl
import os
import time

from conftest import random_lora_adapter

from fcdpo.models import LAST_USED, merge_adapter, prune_merged, resolve_model


def _age(d, seconds):
    t = time.time() - seconds
    os.utime(d / LAST_USED, (t, t))


def test_merged_copies_are_reused_and_pruned_least_recently_used_first(tmp_path, tiny_model):
    base = resolve_model(str(tiny_model))
    root = tmp_path / "cache"
    adapters = [random_lora_adapter(tiny_model, tmp_path / f"run{i}" / "adapter", seed=i) for i in range(4)]
    merged = [merge_adapter(base, a, dest_root=root) for a in adapters]
    assert len({m.path for m in merged}) == 4
    assert all((m.path / "config.json").exists() and (m.path / LAST_USED).exists() for m in merged)
    # the same adapter again is the same folder, and its use refreshes its stamp
    _age(merged[0].path, 7200)
    again = merge_adapter(base, adapters[0], dest_root=root)
    assert again.path == merged[0].path and time.time() - (again.path / LAST_USED).stat().st_mtime < 60

    size = sum(f.stat().st_size for f in merged[1].path.rglob("*") if f.is_file())
    for m, age in zip(
        merged, (10, 5000, 4000, 3000), strict=True
    ):  # [0] was just used; [1] is the least recent
        _age(m.path, age)
    # a budget of two copies: [1] and [2] go (oldest first); [0] is recent, [3] would fit anyway
    removed = prune_merged(root, budget_bytes=2 * size + size // 2)
    assert removed == [merged[1].path.name, merged[2].path.name]
    assert not merged[1].path.exists() and not merged[2].path.exists()
    assert merged[0].path.exists() and merged[3].path.exists()

    # nothing is deleted that is in `keep`, used recently, or locked by another process
    lock = root / "locks" / f"{merged[3].path.name}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert prune_merged(root, budget_bytes=0, keep={merged[0].path.name}) == []
    assert prune_merged(root, budget_bytes=0, min_idle_s=3600) == []
    assert prune_merged(root, budget_bytes=0) == [merged[3].path.name]
    # a pruned copy is re-made on demand
    assert (merge_adapter(base, adapters[1], dest_root=root).path / "config.json").exists()
