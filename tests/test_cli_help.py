"""`gpunet --help` and every verb's: each option says what it does and its default."""

from __future__ import annotations

import argparse

import gpunet
from gpunet.cli import build_parser
from gpunet.clitools import every_parser, show_defaults


def test_every_option_has_help_and_shows_its_default():
    parsers = every_parser(show_defaults(build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            where = f"{parser.prog} {action.option_strings[0]}"
            assert action.help, f"{where} has no help"
            if action.nargs != 0 and not action.required:
                shown = parser.formatter_class(parser.prog)._get_help_string(action)
                assert "default" in shown, f"{where} does not show its default"
        assert "usage:" in text


def test_version(capsys):
    try:
        build_parser().parse_args(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"gpunet {gpunet.__version__}"
