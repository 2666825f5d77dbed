import sys
from pathlib import Path

# `python -m lemo` from the repository root (the workflow's rules, the GPU runner) imports lemo from there,
# with no install to find the baselines' package in baselines/lemo_baselines: put baselines/ on the path.
_baselines = Path(__file__).resolve().parent.parent / "baselines"
if (_baselines / "lemo_baselines").is_dir() and str(_baselines) not in sys.path:
    sys.path.append(str(_baselines))

from .bench.cli import main  # noqa: E402  (after the path)

sys.exit(main())
