"""A copy whose .git lags behind its files records the commit it claims only when its files are that commit's."""

import subprocess

import pytest

from lemo.bench.provenance import git_state, source_commit, source_tree


def _git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_claimed_commit_is_recorded_only_when_the_files_match(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@t")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "old")
    old = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "code.py").write_text("x = 2\n")  # the newer commit's code, made elsewhere
    (tmp_path / "new.py").write_text("y = 1\n")  # a file the old .git does not track
    tree = source_tree(tmp_path)
    with pytest.raises(ValueError, match="uncommitted changes"):  # a claim for code that is not the commit's
        source_commit(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}")  # measurements written during the run do not count
    monkeypatch.setenv("LEMO_SOURCE_COMMIT", f"abc123:{tree}")
    assert git_state(tmp_path) == {"git_commit": "abc123", "git_dirty": False}
    (tmp_path / "code.py").write_text("x = 3\n")  # not the claimed commit's code any more
    assert git_state(tmp_path) == {"git_commit": old, "git_dirty": True}
    monkeypatch.delenv("LEMO_SOURCE_COMMIT")
    _git(tmp_path, "checkout", "-q", "--", "code.py")
    (tmp_path / "new.py").unlink()
    assert git_state(tmp_path) == {"git_commit": old, "git_dirty": False}
    assert source_tree(tmp_path) == _git(tmp_path, "rev-parse", "HEAD^{tree}")  # clean: the commit's own tree
    assert source_commit(tmp_path) == f"{old}:{source_tree(tmp_path)}"  # results/ aside, it is clean
