"""``python -m benchmarks``: set up, seed an upstream, run every scenario, report.

Run from the repository root. Unless ``--no-setup`` is given it first runs
``scripts/setup.sh --test`` (Debian packages and the virtualenv, idempotent)
and re-executes itself with the virtualenv's Python, so that it works on a
fresh Debian machine with only ``python3``. Everything before that uses the
standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(text: str) -> int:
    """``"256MiB"``, ``"1GiB"``, ``"512k"`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match[2].lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 1GiB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _herd_clients(text: str) -> int:
    value = int(text)
    if not 2 <= value <= 100:
        raise argparse.ArgumentTypeError("--herd-clients must be between 2 and 100")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Pull benchmarks of the mirror side by side with Distribution's proxy "
                    "and nginx, against a seeded Distribution upstream.")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat, short wrk runs (what CI runs)")
    parser.add_argument("--large-size", type=parse_size, default=None,
                        help="content of the large layer (default 1GiB, smoke 2MiB)")
    parser.add_argument("--herd-clients", type=_herd_clients, default=None,
                        help="clients in the thundering herd, 2..100 (default 20, smoke 4)")
    parser.add_argument("--wan-rate", type=parse_size, default=None,
                        help="per-connection upstream rate of the WAN herd, bytes/s "
                             "(default 50MiB, smoke 4MiB)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each scenario; medians are reported (default 3, smoke 1)")
    parser.add_argument("--duration", type=int, default=None,
                        help="seconds of each wrk run (default 5, smoke 1)")
    parser.add_argument("--connections", type=int, default=None,
                        help="keep-alive connections of wrk, hey and the raw client (default 4, "
                             "smoke 2)")
    parser.add_argument("--only", action="append", default=[],
                        choices=("cold", "warm", "herd", "hot", "tags", "memory", "lazy"),
                        help="run only this scenario (repeatable); lazy runs "
                             "benchmarks/lazy.py (a cold eStargz lazy start, WAN upstream) "
                             "with --large-size (default 256MiB) and --wan-rate")
    parser.add_argument("--targets", default=None,
                        help="comma-separated subset of mirror,distribution,nginx,"
                             "nginx-sendfile,upstream (default: all)")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a source tree (e.g. `git archive <commit> | tar -x -C DIR`) "
                             "whose mirror runs as target mirror-base beside this one in "
                             "the hot and tags scenarios: before and after in one run")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.json, chart.png and table.md "
                             "(default benchmarks/results/<UTC time>)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the servers' data (default: a temp folder, removed)")
    parser.add_argument("--no-setup", action="store_true",
                        help="do not run scripts/setup.sh --test first")
    return parser.parse_args(argv)


def _bootstrap(argv: list[str]) -> None:
    """Run setup.sh and re-exec under the virtualenv's Python if needed."""
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--test"], check=True)
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        python = str(venv / "bin" / "python")
        os.execve(python, [python, "-m", "benchmarks", "--no-setup", *argv], env)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.no_setup:
        _bootstrap(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.only == ["lazy"]:
        from benchmarks import lazy  # noqa: PLC0415 (after setup: needs the venv)

        size = args.large_size or (16 << 20 if args.smoke else 256 << 20)
        return lazy.main([f"--size={size}", f"--rate={args.wan_rate or 50 << 20}"])
    from benchmarks.run import run  # noqa: PLC0415 (after setup: needs the venv)

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
