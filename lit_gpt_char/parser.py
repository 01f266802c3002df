"""The option parser of every subcommand: jsonargparse's, with its errors as one line instead of a page of usage.

Both the Lightning subcommands (cli.py) and ``sample`` (sampling.py) build on it.
"""

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

from lightning.pytorch.cli import LightningArgumentParser

from lit_gpt_char.errors import shown
from lit_gpt_char.internals import parser_options


class CLIParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors as one line instead of a page of usage, and no abbreviations: a
    prefix of an option (--trainer.max_step) is an error that names the option, not the option taken silently."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is probing alternatives: let it raise
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        line = one_line(message)
        unknown = re.search(r"unrecognized arguments: --([^\s=]+)|does not accept option '([^']+)'", line)
        if unknown:  # on the command line or in a config file
            options = [option for action in parser_options(parser).values() for option in action.option_strings]
            given = f"--{unknown.group(1) or unknown.group(2)}"
            close = difflib.get_close_matches(given, options, n=1, cutoff=0.8)
            line += f"; did you mean {close[0]}?" if close else ""
        sys.stderr.write(f"error: {line} (options: {prog} --help)\n")
        sys.exit(2)


def one_line(message: str) -> str:
    """A jsonargparse message on one line, in the words of the command line: "--X 'v' is not one of: ...",
    "missing --X"."""
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"(?:Given value|Got value): (.*)", message)
    literals = re.findall(r"typing\.Literal\[([^\]]*)\]", message)
    if key and given and literals:
        allowed = ", ".join(dict.fromkeys(item for group in literals for item in group.split(", ")))
        return f"--{key.group(1)} {given.group(1).strip()!r} is not one of: {allowed}"
    config = re.search(r'Parser key "config": File does not exist: \'(.*)\'', message)
    if config:
        return f"config file {shown(config.group(1))} does not exist; {_configs()}"
    required = re.fullmatch(r"the following arguments are required: (.*)", message.strip())
    if required:
        return "missing " + ", ".join(f"--{name.strip()}" for name in required.group(1).split(","))
    return " ".join(message.split())


def _configs() -> str:
    """The configs a user can pass: those in ./configs, else the project's own."""
    for folder in (Path("configs"), Path(__file__).resolve().parents[1] / "configs"):
        names = sorted(p.name for p in folder.glob("*.yaml"))
        if names:
            return f"the configs in {shown(str(folder.resolve()))}{os.sep}: {', '.join(names)}"
    return "pass --config FILE.yaml"
