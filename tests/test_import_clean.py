"""`import lemo` (the library) pulls in none of the harness's dependencies."""

import subprocess
import sys


def test_import_lemo_does_not_import_the_harness_dependencies():
    code = (
        "import sys, torch; before = set(sys.modules); import lemo; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    new = set(eval(out))
    assert not new & {"pandas", "matplotlib", "snakemake", "pynvml", "yaml"}, new
    assert "lemo" in new


def test_import_lemo_does_not_import_the_harness():
    code = (
        "import sys; import lemo; from lemo import LeMoConfig, apply_lemo, remove_lemo; import lemo.predictors; "
        "print(sorted(m for m in sys.modules if m == 'lemo.bench' or m.startswith('lemo.bench.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == [], out


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "lemo", "--version"], capture_output=True, text=True, check=True)
    import lemo

    assert out.stdout.strip() == f"lemo {lemo.__version__}"
