"""User-facing errors: each carries one line that names the file or field and what was expected."""


class G3nError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits with code 2."""


class CheckpointError(G3nError):
    pass


class InputError(G3nError):
    pass
