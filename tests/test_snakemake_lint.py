"""The workflow by Snakemake's book: `snakemake --lint` reports nothing; the configuration comes from
workflows/config.yaml (checked against workflows/schema/config.schema.yaml) and is chosen explicitly, never
detected from the machine while the workflow is parsed; environment.yml, the rules' conda environment, lists
the package's dependencies. Each snakemake run here parses the workflow only (a few seconds)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _snakemake(*args, env=None):
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env
    )
    return done.returncode, done.stdout + done.stderr


# The accuracy experiment decides which rule file is included: accuracy.smk for a small model pretrained
# here (the default, ci), quality.smk for a real pretrained one (smollm2); every other rule file always is.
@pytest.mark.parametrize("config", [[], ["--config", "accuracy=smollm2"]], ids=["accuracy", "quality"])
def test_snakemake_lint_reports_nothing(config):
    rc, out = _snakemake("--lint", *config)
    assert rc == 0 and "Lints for" not in out, out[-6000:]
    assert "Congratulations, your workflow is in a good condition!" in out, out[-6000:]


def test_sweep_is_chosen_by_config_not_by_the_machine(tmp_path):
    # an nvidia-smi that answers with a GPU changes nothing: the default configuration is the CPU sweep
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    rc, out = _snakemake("-n", "--cores", "1", env=env)
    assert rc == 0, out[-3000:]
    assert "results/cpu/sweep.csv" in out and "results/accuracy/ci/summary.md" in out
    assert "results/h200" not in out
    # the GPU profile picks the h200 sweep (its `config:` entry), and with it the small accuracy experiment
    rc, out = _snakemake("-n", "--cores", "1", "--workflow-profile", "workflows/profiles/h200")
    assert rc == 0, out[-3000:]
    assert "results/h200/sweep.csv" in out and "results/accuracy/small/summary.md" in out
    assert "results/cpu/" not in out


def test_config_is_validated():
    rc, out = _snakemake("-n", "--cores", "1", "--config", "sweeps=workflows/sweeps/h200.yaml")  # misspelt key
    assert rc != 0 and "'sweeps' was unexpected" in out, out[-3000:]
    rc, out = _snakemake("-n", "--cores", "1", "--config", "fresh=maybe")
    assert rc != 0 and "Error validating config file" in out, out[-3000:]


def test_environment_lists_the_package_dependencies():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {(r := Requirement(s)).name.lower(): r for s in pip}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    specs, todo = list(project["dependencies"]), list(extras["test"])
    while todo:  # the test extra names the package's own extras (lemo[bench,accuracy]): list theirs
        req = Requirement(todo.pop())
        if req.name == project["name"]:
            todo += [s for extra in req.extras for s in extras[extra]]
        elif str(req) not in map(str, map(Requirement, specs)):
            specs.append(str(req))
    for spec in specs:
        want = Requirement(spec)
        have = listed.get(want.name.lower())
        assert have is not None, f"environment.yml does not list {spec}"
        if want.name == "torch":  # pinned (README) within the package's range
            assert want.specifier.contains(next(iter(have.specifier)).version), (spec, str(have))
        else:
            assert have.specifier == want.specifier and have.marker == want.marker, (spec, str(have))
    assert not any(s.startswith("-e") for s in pip), "a relative -e . breaks under snakemake --use-conda"
