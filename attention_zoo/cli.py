"""`attention-zoo` command line. Each sub-command lives in `attention_zoo/commands/<name>.py` and
exposes `register(subparsers)`; modules there are discovered, so a new command touches no other file.

User errors (UserError, which ConfigError and DataError are) print one clean message and exit 2; so does an
OSError naming a file (a path no command checked beforehand), unless -v asks for its traceback. Ctrl-C and
SIGTERM stop a command as an interrupt (exit 130 and 143), so what it wrote atomically is whole or gone.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import traceback

from . import commands
from .env import check_environment
from .errors import UserError
from .registry import RegistryError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-zoo", description="Attention variants as plug-ins: build, "
                                     "train, benchmark and ablate causal transformers from YAML.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and other details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    parser.commands = sub.choices  # name -> its parser: an unknown option is reported with its command's usage
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may follow options (`describe f.yaml --train model.depth=6`), which argparse
    # cannot express for a positional list; collect them here for commands that take overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python lets a handler be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        check_environment()  # a mistyped switch is an error before any work, not after the run has started
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return code
    except (UserError, RegistryError) as exc:
        if args.verbose and exc.__cause__ is not None:  # a plug-in's failure behind a config problem: its traceback
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"attention-zoo {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except Terminated:
        print(f"attention-zoo {args.command}: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM
    except KeyboardInterrupt:
        print(f"attention-zoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not raise again
        return 141  # 128 + SIGPIPE
    except OSError as exc:  # a file the commands did not check first (full disk, permissions changed mid-run)
        if exc.filename is None or args.verbose:  # not about a path, or asked for details: the traceback helps
            raise
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
        print(f"attention-zoo {args.command}: error: {where}: {exc.strerror or exc} (rerun with -v for the "
              "traceback)", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:  # None: the previous handler was set outside Python; the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `timeout`'s kill, torchrun stopping its workers) raised as an interrupt, so a
    command stops as on Ctrl-C: temporary checkpoint folders removed, a bench's finished points reported."""


def _raise_terminated(signum, frame):
    raise Terminated()
