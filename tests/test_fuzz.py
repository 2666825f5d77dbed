"""Fuzzing the inputs a user writes (sweep, thresholds and experiment YAML, LeMoConfig fields, CLI
arguments): every one either loads or fails with a ValueError / SystemExit carrying a message, never
another exception (a raw traceback). Derandomized, so CI runs the same examples every time."""

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lemo import LeMoConfig
from lemo.accuracy.experiment import load_experiment
from lemo.bench.bench import describe
from lemo.bench.check import load_thresholds, run_checks
from lemo.bench.cli import main
from lemo.bench.sweep import expand, validate_sweep
from tests.test_check import GOOD, _frame
from tests.test_sweep_bench import SWEEP

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        ["lora", "lemo", "token", "topk", "qkvo", "1.5", "true", "llama2-tiny", "sdpa-flash", "{predictors}"]
    ),
    st.lists(st.integers(-1, 5), max_size=3),
    st.just({}),
    st.just({"method": "lemo"}),
)


def _paths(doc, prefix=()):
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw, doc):
    """`doc` with 1-3 random edits: a value replaced by junk, a key or item deleted, or an unknown key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        if not path:
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JUNK)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["steps", "context", "step", "target", "mlp_mode", "x"]))] = draw(JUNK)
    return doc


def _clean(call, *args):
    """Run `call`; a ValueError with a message is a clean refusal. Returns whether it was accepted."""
    try:
        call(*args)
    except ValueError as err:
        assert str(err), "an error without a message"
        return False
    return True


@FUZZ
@given(mutated(SWEEP))
def test_fuzzed_sweeps_load_or_fail_cleanly(sweep):
    if _clean(validate_sweep, sweep, "s.yaml") and _clean(expand, sweep):
        for p in expand(sweep):
            assert "unusable options" not in describe(p)  # accepted options build


@FUZZ
@given(
    mutated(
        {
            "sweep": "s.yaml",
            "checks": [
                {
                    "name": "a",
                    "metric": "saved_activation_gib",
                    "method": "lemo",
                    "min": 1.5,
                    "max": 3.0,
                    "gradient_checkpointing": False,
                }
            ],
        }
    )
)
def test_fuzzed_thresholds_load_or_fail_cleanly(tmp_path, data):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        checks, _ = load_thresholds(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    run_checks(_frame(*GOOD), checks)  # accepted checks run


EXPERIMENT = yaml.safe_load((ROOT / "workflows/accuracy/ci.yaml").read_text())


@FUZZ
@given(mutated(EXPERIMENT))
def test_fuzzed_experiments_load_or_fail_cleanly(tmp_path, data):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(data))
    _clean(load_experiment, path)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(LeMoConfig.__dataclass_fields__)), JUNK, max_size=4))
def test_fuzzed_lemo_configs_build_or_fail_cleanly(fields):
    try:
        cfg = LeMoConfig.from_dict(fields)
    except ValueError as err:
        assert str(err)
        return
    assert LeMoConfig.from_json(cfg.to_json()) == cfg
    _clean(cfg.resolve_sparse_layers, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    sweep = {**copy.deepcopy(SWEEP), "device": "cuda"}  # no CUDA here: every point is recorded as skipped, fast
    contents = {
        "empty": "",
        "brace": "{",
        "list.yaml": "- a\n",
        "sweep.yaml": yaml.safe_dump(sweep),
        "bad-sweep.yaml": yaml.safe_dump({**sweep, "step": 1}),
        "t.yaml": "sweep: sweep.yaml\nchecks: []\n",
        "header.csv": "model,method\n",
        "bytes": "\udcff",
        "good.csv": _frame(*GOOD).to_csv(index=False),
        "good-t.yaml": "sweep: sweep.yaml\nchecks: [{name: a, metric: saved_activation_gib, method: lemo, min: 1}]\n",
    }
    for name, text in contents.items():
        (d / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    (d / "dir").mkdir()
    return d


FILES = st.sampled_from(
    [
        "empty",
        "brace",
        "list.yaml",
        "sweep.yaml",
        "bad-sweep.yaml",
        "t.yaml",
        "header.csv",
        "bytes",
        "dir",
        "missing.yaml",
        "good.csv",
        "good-t.yaml",
    ]
)
FILES = st.one_of(st.sampled_from(["good.csv", "good-t.yaml", "sweep.yaml"]), FILES)  # valid ones more often
# Per command: its positional arguments and options (None: a flag without a value).
COMMANDS = {
    "check": (1, {"--thresholds": FILES, "--sweep": FILES}),
    "aggregate": (2, {"--out": st.just("OUT")}),
    "jobs": (0, {"--sweep": FILES}),
    "measure": (
        0,
        {
            "--sweep": FILES,
            "--job": st.sampled_from(["llama2-tiny__sdpa-flash__gc0", "x"]),
            "--out": st.just("OUT"),
            "--methods": st.sampled_from(["lora", "nope"]),
            "--fresh": None,
        },
    ),
}


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    most, options = COMMANDS[command]
    argv = [command] + draw(st.lists(FILES, min_size=min(most, 1), max_size=most))
    for flag, values in options.items():
        if draw(st.integers(0, 5)):  # now and then a required option is left out
            argv += [flag] if values is None else [flag, draw(values)]
    return argv


@FUZZ
@given(command_lines())
@example(["check", "good.csv", "--thresholds", "good-t.yaml"])  # each command also runs through once
@example(["measure", "--sweep", "sweep.yaml", "--job", "llama2-tiny__sdpa-flash__gc0", "--out", "OUT"])
@example(["jobs", "--sweep", "sweep.yaml"])
def test_fuzzed_command_lines_end_in_a_message(files, capsys, argv):
    argv = [
        str(files / "dir" / "out")
        if a == "OUT"
        else str(files / a)
        if (files / a).exists() or a == "missing.yaml"
        else a
        for a in argv
    ]
    try:
        assert isinstance(main(argv), int)  # ran: measured nothing (no CUDA here) or found failures
        event(f"{argv[0]}: ran")
    except SystemExit as err:
        event(f"{argv[0]}: " + ("refused by lemo" if isinstance(err.code, str) else "usage error"))
        message = err.code if isinstance(err.code, str) else capsys.readouterr().err
        assert err.code != 0 and message, f"{argv}: exit {err.code!r} without a message"
