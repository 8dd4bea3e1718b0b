"""The console entry point: every process maps a user's error to one line and its exit code here,
and the two commands typed most often to watch a study (``study list``, ``study show``) run
without the Typer app.

Why a second door: Typer coerces each parameter through a pydantic TypeAdapter, and importing
Typer, pydantic and rich costs about 0.3 s, a quarter of ``study list`` (goal: within 1.3x of
``optuna studies``). The door is narrow: only ``study list [--storage URL]`` and
``study show NAME [--storage URL] [--limit N]`` pass; any other word (``--help``, a typo, a
missing value) goes to the Typer app, which owns help and usage errors. Both doors call the same
:func:`list_studies` and :func:`show_study`.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from alpa_tune.errors import EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_STORAGE_LOST, BadInput

Write = Callable[[str], None]


def main() -> None:
    """``alpa-tune``: the read-only fast door when the words fit it, else the Typer app."""
    # ``kill -USR1 PID`` writes every thread's stack to stderr (a worker's log) and the process
    # goes on: a worker, launcher or compare that seems stuck shows where without being stopped.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    call = read_only_call(sys.argv[1:])
    if call is None:
        from alpa_tune.cli import main as typer_main

        typer_main()
        return
    run_reporting_errors(call)


def read_only_call(args: list[str]) -> Callable[[], None] | None:
    """The call for ``study list`` / ``study show`` written exactly as this parser knows them, else None."""
    if args[:2] == ["study", "list"]:
        options = _options(args[2:], {"--storage"})
        return None if options is None else lambda: list_studies(storage_url(options.get("--storage")), print)
    if args[:2] == ["study", "show"] and len(args) > 2 and not args[2].startswith("-"):
        options = _options(args[3:], {"--storage", "--limit"})
        if options is None:
            return None
        limit = options.get("--limit", "20")
        if not limit.isdigit() or int(limit) < 1:
            return None  # Typer says what is wrong with it
        name = args[2]
        return lambda: show_study(name, storage_url(options.get("--storage")), int(limit), print)
    return None


def _options(args: list[str], known: set[str]) -> dict[str, str] | None:
    """``--key value`` / ``--key=value`` pairs, each key at most once; None for anything else."""
    options: dict[str, str] = {}
    words = iter(args)
    for word in words:
        key, equals, value = word.partition("=")
        if not equals:
            value = next(words, None)
            if value is None:
                return None
        if key not in known or key in options:
            return None
        options[key] = value
    return options


def storage_url(storage: str | None) -> str:
    """``--storage`` or its default, its scheme checked before anything starts."""
    from alpa_tune.storage import resolve_url, scheme_of

    url = resolve_url(storage)
    scheme_of(url)
    return url


def list_studies(url: str, write: Write) -> None:
    """``study list``: one progress line per study in the storage."""
    import optuna

    from alpa_tune.storage import mask_url, open_storage
    from alpa_tune.views import study_line

    backend = open_storage(url, read_only=True)
    summaries = optuna.get_all_study_summaries(backend, include_best_trial=False)
    if not summaries:
        write(f"no studies in {mask_url(url)}")
    for summary in summaries:
        write(study_line(optuna.load_study(study_name=summary.study_name, storage=backend)))


def show_study(study_name: str, url: str, limit: int, write: Write) -> None:
    """``study show``: the progress line and the best ``limit`` trials; a rich table on a terminal,
    Markdown (nothing cut) in a pipe or log."""
    from alpa_tune.storage import mask_url
    from alpa_tune.study import load_study
    from alpa_tune.views import trials_markdown, trials_table

    write(f"storage: {mask_url(url)}")
    study = load_study(study_name, url, read_only=True)
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(trials_table(study, limit))
    else:
        write(trials_markdown(study, limit))


def run_reporting_errors(call: Callable[[], int | None]) -> NoReturn:
    """Run ``call`` and exit with its code; a full disk exits 5, a storage gone past its patience 4,
    a user's mistake 2, each as one masked ``error:`` line on stderr."""
    from alpa_tune.storage import StorageLost, quiet_optuna
    from alpa_tune.units import DiskFull

    quiet_optuna()
    try:
        code = call()
    except DiskFull as exc:  # the storage's, the cache's or the output folder's
        fail(str(exc), EXIT_DISK_FULL)
    except StorageLost as exc:
        fail(str(exc), EXIT_STORAGE_LOST)
    except BadInput as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    """One ``error:`` line (any password masked), an optional hint line, and exit ``code``."""
    from alpa_tune.storage import mask_text

    print(f"error: {mask_text(message)}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)
    sys.exit(code)
