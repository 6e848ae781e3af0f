"""Installing a finished directory in place of an older one: the target is always complete."""
from __future__ import annotations

from megalign.utils.atomic import fsync_dir, install_directory


def test_install_directory_replaces_an_older_one_and_leaves_nothing_behind(tmp_path):
    first = tmp_path / ".new-1"
    first.mkdir()
    (first / "a.txt").write_text("one")
    install_directory(first, tmp_path / "final")
    assert (tmp_path / "final" / "a.txt").read_text() == "one" and not first.exists()

    second = tmp_path / ".new-2"
    second.mkdir()
    (second / "b.txt").write_text("two")
    install_directory(second, tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the old copy is gone
    fsync_dir(tmp_path / "final")
