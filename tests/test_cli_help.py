"""Every option of the `lemo` command and of each of its subcommands says what it is for."""

import argparse
from pathlib import Path

from lemo.bench.cli import build_parser

CPU_SWEEP = Path(__file__).resolve().parents[1] / "workflows" / "sweeps" / "cpu.yaml"


def _subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    commands = [("lemo", parser)] + [(f"lemo {name}", p) for name, p in _subcommands(parser)]
    assert len(commands) > 20
    missing = [
        f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
        for name, p in commands
        for action in p._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and not (action.help or "").strip()
    ]
    assert not missing, f"options without help: {missing}"


def test_log_level_options_come_before_the_subcommand():
    import logging

    parser = build_parser()
    assert parser.parse_args(["jobs", "--sweep", "s.yaml"]).log_level == logging.INFO
    assert parser.parse_args(["--quiet", "jobs", "--sweep", "s.yaml"]).log_level == logging.WARNING
    args = parser.parse_args(["-v", "train-predictors", "--model", "m", "--out", "o", "--verbose"])
    assert args.log_level == logging.DEBUG and args.verbose  # train-predictors keeps its own --verbose


def test_status_goes_to_the_log_on_stderr_and_quiet_silences_it(tmp_path, capsys):
    import logging

    from lemo.bench.cli import main
    from lemo.bench.progress import progress, progress_enabled

    logger = logging.getLogger("lemo")
    level, handlers = logger.level, list(logger.handlers)
    try:
        assert main(["aggregate", str(tmp_path / "none"), "--out", str(tmp_path / "x.csv")]) == 1
        out, err = capsys.readouterr()
        assert out == "" and "ERROR lemo.bench.cli: no records under" in err
        logging.getLogger("lemo.accuracy.pretrain").info("a status line")
        assert "INFO lemo.accuracy.pretrain: a status line" in capsys.readouterr().err
        bar = progress(range(3))
        assert progress_enabled() and not bar.disable
        bar.close()
        capsys.readouterr()
        assert main(["--quiet", "jobs", "--sweep", str(CPU_SWEEP)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("llama2-tiny__") and err == ""  # the table stays on stdout
        logging.getLogger("lemo.accuracy.pretrain").info("a status line")
        bar = progress(range(3))
        assert capsys.readouterr().err == "" and not progress_enabled() and bar.disable
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
