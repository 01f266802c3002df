"""The one exception type for mistakes a user can make and fix."""


class LitGPTCharError(ValueError):
    """A problem with the user's input (corpus, config, checkpoint, prompt).

    The message says what went wrong and what to do about it; the CLI prints it as one line
    (``error: ...``) and exits with status 2.
    """
