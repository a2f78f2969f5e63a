"""`gpunet ledger verify` starts light: the credit verbs' parser alone, none of the heavy libraries
the other verbs bring (Dask, IPython, Starlette); its CPU at a million entries is mostly its work."""

from __future__ import annotations

import subprocess
import sys

from gpunet.cli import CREDIT_VERBS, build_parser

HEAVY = ("distributed", "dask", "IPython", "starlette", "sqlalchemy", "numpy")


def test_the_ledger_verify_command_loads_no_heavy_library(tmp_path):
    code = ("import sys\nfrom gpunet.cli import main\n"
            f"code = main(['ledger', 'verify', '--db', {str(tmp_path / 'none.sqlite3')!r}])\n"
            f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "1 []"  # it ran: no database there, said on stderr
    assert "no credit database at" in out.stderr


def test_the_credit_verbs_parse_alike_alone_and_among_every_verb():
    whole, alone = build_parser(), build_parser("ledger")
    for argv in (["ledger", "verify", "--db", "x.sqlite3"], ["credits", "serve", "--port", "0"]):
        assert argv[0] in CREDIT_VERBS
        a, b = vars(whole.parse_args(argv)), vars(alone.parse_args(argv))
        assert a == b
    assert "gateway" in whole._subparsers._group_actions[0].choices
