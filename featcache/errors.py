"""The one exception type that means "the user can fix this"."""


class UserError(Exception):
    """A mistake in the input (a path, a flag, a file).

    The CLI prints the message as one line and exits with status 2; anything
    else that escapes is a bug and keeps its traceback.
    """
