"""Errors a user can cause. They end a command with one clear message and a non-zero exit."""


class PipelineError(Exception):
    """A user-facing error: bad params, missing data, checksum mismatch, corrupt input..."""

    exit_code = 1


class ParamsError(PipelineError):
    """params.yaml (or an override of it) is invalid."""

    exit_code = 2


def run_cli(action, messages: dict[type[BaseException], str] | None = None) -> int:
    """Call ``action()`` for a command-line entry point; user errors become one ``error:`` line.

    ``messages`` maps other exception types (e.g. MemoryError) to the message printed for them; an
    exception matches its type's entry or the first entry of a base class.
    Returns the process exit code.
    """
    import sys

    try:
        action()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except tuple(messages or ()) as err:  # subclasses too (numpy's _ArrayMemoryError is a MemoryError)
        text = messages.get(type(err)) or next(m for t, m in messages.items() if isinstance(err, t))
        print(f"error: {text}", file=sys.stderr)
        return 1
    return 0
