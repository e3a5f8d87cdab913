"""The `ds4cupy` command line. Each command lives in its own module exposing add_arguments(parser) and main(args)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .format.config import ConfigError
from .format.model_file import ModelFileError
from .text.tokenizer import TokenizerError

# errors that mean "this input cannot be used", reported as one line: the message already names the file and the
# key, tensor or value at fault
USER_ERRORS = (ModelFileError, ConfigError, TokenizerError, FileNotFoundError, IsADirectoryError, PermissionError)

# command -> (module, one-line help)
COMMANDS = {
    "serve": ("ds4cupy.server.cli", "OpenAI-compatible HTTP server (the demo model when no -m is given)"),
    "run": ("ds4cupy.tools.run_cli", "generate from a prompt, or chat interactively"),
    "make-model": ("ds4cupy.tools.make_model", "write a random model in the exact ds4 GGUF layout"),
    "convert": ("ds4cupy.tools.convert", "convert a transformers DeepseekV4 directory to a ds4-layout GGUF"),
    "info": ("ds4cupy.tools.info", "show a model's config, tensor types and memory needs"),
    "bench": ("ds4cupy.tools.bench", "measure load, prefill and decode speed"),
    "verify": ("ds4cupy.tools.verify", "run the correctness checks and print a verdict per check"),
    "export-tokenizer": ("ds4cupy.tools.export_tokenizer", "write a model's tokenizer as a Hugging Face tokenizer.json"),
}


def _unavailable(name: str, error: ImportError):
    def main(args: argparse.Namespace) -> int:
        print(f"error: `ds4cupy {name}` is unavailable: {error} (reinstall ds4cupy with its dependencies)",
              file=sys.stderr)
        return 1
    main.unavailable = True
    return main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds4cupy",
        description="DeepSeek-V4-Flash inference on one NVIDIA GPU (CUDA kernels through CuPy), reading ds4 GGUF "
                    "files. Runs on the CPU reference backend when no GPU is present.")
    p.add_argument("--version", action="version", version=f"ds4cupy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            # a command whose dependencies are missing must not take the other commands down with it
            sp = sub.add_parser(name, help=f"{help_} [unavailable: {e}]", add_help=False)
            sp.set_defaults(_main=_unavailable(name, e))
            continue
        sp = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(sp)
        sp.set_defaults(_main=mod.main)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command_main = getattr(args, "_main", None)
    if extra and not getattr(command_main, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if command_main is None:
        parser.print_help()
        return 2
    try:
        return int(command_main(args) or 0)
    except USER_ERRORS as e:            # a bad file or argument: one line, no traceback (DS4CUPY_TRACEBACK=1 shows it)
        if os.environ.get("DS4CUPY_TRACEBACK"):
            raise
        print(f"ds4cupy {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
