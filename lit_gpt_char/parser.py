"""The option parser of every subcommand: jsonargparse's, with its errors as one line instead of a page of usage.

Both the Lightning subcommands (cli.py) and ``sample`` (sample.py) build on it.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn, Optional

from lightning.pytorch.cli import LightningArgumentParser


class CLIParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors as one line instead of a page of usage."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is probing alternatives: let it raise
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {one_line(message)} (options: {prog} --help)\n")
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
    required = re.fullmatch(r"the following arguments are required: (.*)", message.strip())
    if required:
        return "missing " + ", ".join(f"--{name.strip()}" for name in required.group(1).split(","))
    return " ".join(message.split())
