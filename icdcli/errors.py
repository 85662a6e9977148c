"""Errors the user can act on. The CLI prints each as one line and moves on to the next item."""


class ICDError(Exception):
    """A failure with a message meant for the user (no traceback needed)."""


class UsageError(ICDError):
    """A bad option, option combination or job: found before any model loads; the CLI exits 2."""


class InputError(ICDError):
    """An input file (image or latent) that cannot be used."""


class ModelError(ICDError):
    """A model that is missing, not downloaded, or malformed."""


class OutputExistsError(ICDError):
    """An output that would overwrite an existing file without --overwrite."""


def first_line(err: BaseException) -> str:
    """An exception message's first line, else its type's name (an EOFError from an empty file says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
