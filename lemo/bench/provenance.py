"""Provenance for every measurement: machine, driver, library versions, git commit."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args, env=None) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60, env=env)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_tree(root: Path) -> str:
    """The git tree id of the checkout's files as they are now (tracked or not, ignored ones and the
    measurements under results/ and figures/ left out), through a scratch index: equal to a commit's tree
    (`git rev-parse COMMIT^{tree}`) exactly when the code is that commit's."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "add", "-A", "--", ".", ":!results", ":!figures", env=env)
        return _git(root, "write-tree", env=env)


def source_commit(root: Path | None = None) -> str:
    """LEMO_SOURCE_COMMIT's value for this checkout ("COMMIT:TREE"); it must be clean (results/ and
    figures/ aside), or the claim would name a commit for code that is not its own."""
    root = root or Path(__file__).resolve().parent.parent.parent
    if _git(root, "status", "--porcelain", "--", ".", ":!results", ":!figures"):
        raise ValueError(f"{root} has uncommitted changes outside results/ and figures/: commit them first")
    return f"{_git(root, 'rev-parse', 'HEAD')}:{source_tree(root)}"


def git_state(root: Path | None = None) -> dict:
    """Commit of the checkout. A copy whose .git lags behind its files (a GPU machine given the working tree
    and an older .git) names its commit in LEMO_SOURCE_COMMIT="COMMIT:TREE" (`git rev-parse HEAD
    HEAD^{tree}` where the commit was made): recorded only when the files' tree equals TREE, else the
    copy's own HEAD, dirty. LEMO_GIT_COMMIT overrides both where there is no .git at all."""
    if os.environ.get("LEMO_GIT_COMMIT"):
        return {"git_commit": os.environ["LEMO_GIT_COMMIT"], "git_dirty": os.environ.get("LEMO_GIT_DIRTY") == "1"}
    root = root or Path(__file__).resolve().parent.parent.parent
    claimed = os.environ.get("LEMO_SOURCE_COMMIT", "")
    if claimed:
        commit, _, tree = claimed.partition(":")
        if tree and source_tree(root) == tree:
            return {"git_commit": commit, "git_dirty": False}
    return {
        "git_commit": _git(root, "rev-parse", "HEAD") or None,
        "git_dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no")) or bool(claimed),
    }


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda" or not torch.cuda.is_available():  # a CUDA sweep here records its points as skipped
        return {"gpu": "cpu", "gpu_memory_gib": None, "driver": None, "cuda": None, "cudnn": None}
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        pass
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def provenance(device: torch.device) -> dict:
    return {
        **gpu_info(device),
        "cpu": platform.processor() or platform.machine(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn") if importlib.util.find_spec("flash_attn") else None,
        **git_state(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
