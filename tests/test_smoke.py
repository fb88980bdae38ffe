from pathlib import Path


def test_save_restore_small_tree(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    snapshot = local_repo.save("smoke", str(src))
    assert len(snapshot) == 64
    dest = tmp_path / "dest"
    local_repo("restore", f"{snapshot}:{src}", str(dest))
    assert (dest / "a.txt").read_text() == "hello"
    assert (dest / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 1000
