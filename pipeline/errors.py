"""Errors a user can cause. They end a command with one clear message and a non-zero exit.

Retries: a ``PipelineError`` is *permanent* by default (bad params, a missing or corrupt file, a
checksum mismatch, no network at all): running the stage again cannot fix it, so the stage's Airflow
task fails without a retry. A ``TransientError`` (a time-out, a dropped connection, a server's 5xx)
and any unexpected exception may pass on a second try, and are retried. How the DAG learns which:
``run_cli`` writes the error and its kind to the file named by ``PIPELINE_STATUS_FILE`` (set by the
task's guard, ``pipeline/orchestration/guard.py``), and the guard exits with ``EXIT_PERMANENT`` for a
permanent one; the DAG's stage operator turns that exit status into a failure without retry.
"""

#: a stage task's exit status when its stage failed for a reason a retry cannot fix (sysexits' EX_CONFIG)
EXIT_PERMANENT = 78


class PipelineError(Exception):
    """A user-facing error: bad params, missing data, checksum mismatch, corrupt input..."""

    exit_code = 1
    retryable = False


class ParamsError(PipelineError):
    """params.yaml (or an override of it) is invalid."""

    exit_code = 2


class TransientError(PipelineError):
    """A failure that a later try may not meet (network time-out, a server error): retried by Airflow."""

    retryable = True


def run_cli(action, messages: dict[type[BaseException], str] | None = None) -> int:
    """Call ``action()`` for a command-line entry point; user errors become one ``error:`` line.

    ``messages`` maps other exception types (e.g. MemoryError) to the message printed for them; an
    exception matches its type's entry or the first entry of a base class.
    Returns the process exit code.
    """
    import sys

    from pipeline.events import write_status

    try:
        action()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        write_status(err.retryable, str(err))
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        write_status(True, "interrupted")
        return 130
    except tuple(messages or ()) as err:  # subclasses too (numpy's _ArrayMemoryError is a MemoryError)
        text = messages.get(type(err)) or next(m for t, m in messages.items() if isinstance(err, t))
        print(f"error: {text}", file=sys.stderr)
        write_status(True, text)
        return 1
    except OSError as err:
        import errno

        if err.errno != errno.ENOSPC:
            write_status(True, f"{type(err).__name__}: {err}")
            raise
        where = f" writing {err.filename}" if err.filename else ""
        text = f"no space left on the device{where}: free some disk space, then run the stage again"
        print(f"error: {text}", file=sys.stderr)
        write_status(False, text)
        return 1
    except Exception as err:  # a bug or an unforeseen failure: the traceback is printed, a retry allowed
        write_status(True, f"{type(err).__name__}: {err}")
        raise
    return 0
