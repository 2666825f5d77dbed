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
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(root: Path | None = None) -> dict:
    """Commit of the checkout; LEMO_GIT_COMMIT overrides it where the tree was copied without .git."""
    if os.environ.get("LEMO_GIT_COMMIT"):
        return {"git_commit": os.environ["LEMO_GIT_COMMIT"], "git_dirty": os.environ.get("LEMO_GIT_DIRTY") == "1"}
    root = root or Path(__file__).resolve().parent.parent.parent

    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "git_commit": run("rev-parse", "HEAD") or None,
        "git_dirty": bool(run("status", "--porcelain", "--untracked-files=no")),
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
