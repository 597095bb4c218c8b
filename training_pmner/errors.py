"""How `train_pmner.py` tells why a run stopped: `ArgumentsError` for a setting that cannot run, an error's message on
one line, and a full disk or file-size limit recognised anywhere in an error's chain."""

import errno


class ArgumentsError(ValueError):
    """A command-line or argument-file setting that cannot run; the message names the argument (and the file)."""


# how a failed write reads where no errno comes with it (torch's archive writer, C++ streams)
WRITE_FAILURES = ("No space left", "File too large", "file write failed", "iostream error", "unexpected pos")


def out_of_space(error: BaseException) -> BaseException | None:
    """The error of a full disk or a file-size limit in `error`'s chain, as the OS (ENOSPC, EFBIG, EDQUOT) or
    torch's writer reports it; `None` for any other error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return error
        text = str(error)
        if any(marker in text for marker in WRITE_FAILURES):
            return error
        error = error.__cause__ or error.__context__
    return None


def one_line(error: Exception) -> str:
    """An error's message on one line (a multi-line message's lines joined)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())
