"""The one exception type for mistakes a user can make and fix, and how messages name a path."""

import os
from pathlib import Path


class LitGPTCharError(ValueError):
    """A problem with the user's input (corpus, config, checkpoint, prompt).

    The message says what went wrong and what to do about it; the CLI prints it as one line
    (``error: ...``) and exits with status 2.
    """


def shown(path: str | Path) -> str:
    """``path`` as a message shows it: relative to the working directory when it is below it, else absolute."""
    if not path:
        return ""
    real = Path(os.path.realpath(path))
    return str(real.relative_to(Path.cwd())) if real.is_relative_to(Path.cwd()) else str(real)
