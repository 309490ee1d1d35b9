"""The one exception family the CLI turns into a clean message and a non-zero exit, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, data path, checkpoint, arguments): the message says what to fix."""

    exit_code = 2
