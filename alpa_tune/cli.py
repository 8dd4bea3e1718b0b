"""The ``alpa-tune`` command line: parses, calls the library, prints. No logic of its own.

A user's mistake (bad config, path, URL, study name) ends with one ``error:`` line and exit
code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live

from alpa_tune import __version__
from alpa_tune.entry import fail, list_studies, run_reporting_errors, show_study
from alpa_tune.entry import storage_url as _url

app = typer.Typer(
    help="Tune the ALPA loss (Asymmetric Loss with Padé Approximation) with Optuna: "
    "k-fold cross-validation of a timm backbone, one worker per GPU, one study in a shared storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
study_app = typer.Typer(help="Create, list, show and delete studies.", no_args_is_help=True)
app.add_typer(study_app, name="study")


def _console(stderr: bool = False) -> Console:
    out = Console(stderr=stderr)
    # Piped (a SLURM or CI log), rich would fold long lines at 80 columns: print them whole.
    # Tables go out as Markdown there (``not console.is_terminal``), which rich cannot cut.
    out.soft_wrap = not out.is_terminal
    return out


console = _console()
err_console = _console(stderr=True)

StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="Storage URL: sqlite:///FILE, postgresql://USER:PASS@HOST/DB or journal:FILE. "
                 "Default: $ALPA_TUNE_STORAGE, else sqlite:///alpa-tune.db in this folder."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set training.folds=3 (value parsed as TOML; repeatable)."),
]


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Study config (TOML), e.g. studies/digits-lt.toml.")],
    storage: StorageOpt = None,
    trials: Annotated[int | None, typer.Option(help="Finished trials to reach (default: search.n_trials). A rerun tops the study up.", min=1)] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes (CPU), or per GPU with --gpus.", min=1)] = 2,
    gpus: Annotated[str | None, typer.Option(help="GPU indices to use, e.g. 0,1 (default: all visible GPUs, else CPU).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for best.json and the worker logs.")] = Path("alpa-tune-out"),
    lower_budget: Annotated[bool, typer.Option("--lower-budget", help="Allow --trials below the study's "
                                               "current budget (running workers stop at the new one).")] = False,
    set_: SetOpt = None,
) -> None:
    """Create the study if new, run local workers until the budget is met, write OUT/best.json.

    On an existing study the config must be the one it was created with (machine-local keys such
    as data.path aside): a change is refused before any work, key by key."""
    from alpa_tune.config import MACHINE_LOCAL_KEYS, load_config, override_keys
    from alpa_tune.preflight import check_registries, check_storage
    from alpa_tune.study import check_existing_study, create_study

    overrides = set_ or []
    config = load_config(config_path, overrides)
    check_registries(config)
    url = _url(storage)
    gpu_list = _gpus(gpus)  # refused before the data is loaded or the study exists
    _check_writable(out)
    check_storage(url)
    check_existing_study(config, url, trials, lower_budget=lower_budget)  # drift and budget, before the data
    _prepare_data(config)
    create_study(config, url, budget=trials, lower_budget=lower_budget)
    console.print(f"study [bold]{config.name}[/] in {_masked(url)}")
    local = [item for item, key in zip(overrides, override_keys(overrides)) if key in MACHINE_LOCAL_KEYS]
    code = _launch(config.name, url, gpu_list, workers if gpus else 1, workers, local, out)
    _finish(config.name, url, out / "best.json")
    raise typer.Exit(code)


@app.command()
def launch(
    study_name: Annotated[str, typer.Argument(metavar="STUDY_NAME")],
    storage: StorageOpt = None,
    gpus: Annotated[str | None, typer.Option(help="GPU indices, e.g. 0,1,2,3 (default: all visible, else CPU workers).")] = None,
    workers_per_gpu: Annotated[int, typer.Option(help="Worker processes per GPU.", min=1)] = 1,
    workers: Annotated[int, typer.Option(help="CPU worker processes when there is no GPU.", min=1)] = 2,
    log_dir: Annotated[Path, typer.Option(help="Folder for the worker logs.")] = Path("alpa-tune-out"),
    set_: SetOpt = None,
) -> None:
    """Start and supervise workers on this machine (one per GPU slot) until the study's budget is met."""
    url = _url(storage)
    gpu_list = _gpus(gpus)
    _check_writable(log_dir)
    raise typer.Exit(_launch(study_name, url, gpu_list, workers_per_gpu, workers, set_ or [], log_dir))


@app.command()
def worker(
    study_name: Annotated[str, typer.Argument(metavar="STUDY_NAME")],
    storage: StorageOpt = None,
    trials: Annotated[int | None, typer.Option(help="Leave after this many trials of our own (default: until the study's budget).", min=1)] = None,
    rank: Annotated[int | None, typer.Option(help="Worker rank: the sampler seed is the study seed + rank. Default: "
                                             "$ALPA_TUNE_RANK, else the next rank no worker of the study has had.", min=0)] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:K (default: the config's training.device).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads for this worker.", min=1)] = None,
    set_: SetOpt = None,
) -> None:
    """One long-lived worker: pull trials of STUDY_NAME until its budget is met. SIGTERM stops it cleanly."""
    from alpa_tune.errors import EXIT_GAVE_UP
    from alpa_tune.workers import explicit_rank, run_worker

    overrides = list(set_ or [])
    if device:
        overrides.append(f'training.device="{device}"')
    if threads:
        overrides.append(f"training.threads={threads}")
    url = _url(storage)
    result = run_worker(study_name, url, max_trials=trials, rank=explicit_rank(rank), overrides=overrides,
                        log=lambda message: err_console.print(message, markup=False, highlight=False,
                                                              soft_wrap=True))
    if result.gave_up:  # run_worker's "giving up ..." line stays the last word in the log
        raise typer.Exit(EXIT_GAVE_UP)
    console.print(f"worker done: {result.trials_run} trial(s) run"
                  + ("; stopped by signal" if result.stopped_by_signal else "")
                  + ("; study budget met" if result.budget_met else ""))


@app.command()
def export(
    study_name: Annotated[str, typer.Argument(metavar="STUDY_NAME")],
    storage: StorageOpt = None,
    top: Annotated[int, typer.Option(help="Export the best K trials (best first).", min=1)] = 1,
    output: Annotated[str | None, typer.Option("-o", "--output", help="Output file, or - for stdout. Default: "
                                               "best.json / best.toml; the python snippet goes to stdout.")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="json, toml or python (default: from the "
                                                "-o suffix, else json).")] = None,
) -> None:
    """Write the best trial's loss settings, metrics and provenance (load with alpa_tune.load_loss)."""
    from alpa_tune.export import render_records, study_records, write_records
    from alpa_tune.records import FORMATS, SUFFIXES, ExportError, format_for
    from alpa_tune.study import load_study

    fmt = format_ or (format_for(output) if output and output != "-" else None) or "json"
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    url = _url(storage)
    records = study_records(load_study(study_name, url, read_only=True), top)
    if output == "-" or (output is None and fmt == "python"):
        typer.echo(render_records(records, fmt), nl=False)
        return
    path = Path(output or f"best{SUFFIXES[fmt]}")
    write_records(records, path, fmt)
    console.print(f"wrote {path} ({len(records)} trial(s); best value {records[0]['value']:.4f}, "
                  f"trial {records[0]['trial']})", markup=False, highlight=False)


@app.command()
def compare(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The study config the search ran with.")],
    best: Annotated[Path | None, typer.Option("--best", help="Compare an exported tuned loss: best.json (or a "
                                              "TOML/Python export) against --losses.")] = None,
    losses: Annotated[str, typer.Option(help="With --best: comma-separated alpa (tuned, from --best) and baselines "
                                        "ce, bce, focal, asl, cb, ldam, ldam_drw, alpa_paper.")] = "ce,focal,asl,alpa",
    tune: Annotated[str | None, typer.Option("--tune", help="A fair shootout: tune each of these losses (e.g. "
                                             "ce,focal,asl,cb,ldam,alpa) in its own study NAME-LOSS with the same "
                                             "budget, then compare the winners.")] = None,
    trials: Annotated[int | None, typer.Option(help="With --tune: the trial budget of every study (default: "
                                               "search.n_trials).", min=1)] = None,
    paper_defaults: Annotated[bool, typer.Option("--paper-defaults", help="With --tune: add each loss at its "
                                                 "paper's default setting, untuned (LOSS_paper).")] = False,
    seeds: Annotated[int, typer.Option(help="Trainings per loss (seeds training.seed, +1, ...).", min=1)] = 3,
    storage: StorageOpt = None,
    workers: Annotated[int | None, typer.Option(help="Parallel training processes (default: one per core, "
                                                "or per GPU); with --tune also the search's CPU workers.",
                                                min=1)] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Prefix for PREFIX.csv, PREFIX.md and "
                                         "PREFIX.json.")] = Path("alpa-tune-out/compare"),
    set_: SetOpt = None,
) -> None:
    """Compare losses on the held-out 20 %: a tuned export against baselines (--best), or every
    loss tuned with the same budget (--tune); each trains on the same 80 % with the same seeds."""
    from rich.progress import Progress

    from alpa_tune.compare import check_output, find_study, load_best, parse_losses, run_comparison, store_comparison
    from alpa_tune.config import load_config
    from alpa_tune.errors import BadInput

    if (best is None) == (tune is None):
        raise BadInput("compare: give exactly one of --best FILE (an exported loss) or --tune LOSSES (a shootout)")
    if tune is None and (trials is not None or paper_defaults):
        raise BadInput("compare: --trials and --paper-defaults go with --tune")
    config = load_config(config_path, set_ or [])
    check_output(output)
    url = _url(storage)

    def progress_bar(total: int, what: str):
        progress = Progress(console=err_console, transient=True)
        task = progress.add_task(what, total=total)
        return progress, lambda run, done, _total: progress.update(task, completed=done)

    if tune is not None:
        comparison, studies = _shootout(config, url, tune, trials, paper_defaults, seeds, workers, output,
                                        progress_bar)
    else:
        labels = parse_losses(losses)
        record = load_best(best)
        study_name = record.get("study") or config.name
        found = find_study(url, study_name)
        studies = [found] if found is not None else []
        progress, on_run = progress_bar(len(labels) * seeds, f"training {len(labels)} loss(es) x {seeds} seed(s)")
        with progress:
            comparison = run_comparison(config, record, labels, seeds, workers=workers, best_path=best, on_run=on_run)
        if found is None:
            console.print(f"study {study_name} not found in {_masked(url)}: comparison not stored there",
                          markup=False, highlight=False)
    _print_comparison(comparison, output)
    for study in studies:
        store_comparison(study, comparison)
        console.print(f"stored in study {study.study_name} ({_masked(url)}); alpa-tune report shows it",
                      markup=False, highlight=False)


def _print_comparison(comparison: dict, output: Path) -> None:
    from alpa_tune.compare import write_outputs
    from alpa_tune.compare_table import rich_summary, rich_table, title, to_markdown

    if console.is_terminal:
        console.print(rich_table(comparison))
        summary = rich_summary(comparison)
        if summary is not None:
            console.print(summary)
    else:
        console.print(f"{title(comparison)}\n\n{to_markdown(comparison)}", markup=False, highlight=False)
    paths = write_outputs(comparison, output)
    console.print("wrote " + ", ".join(map(str, paths)), markup=False, highlight=False)


def _shootout(config, url: str, tune: str, trials: int | None, paper_defaults: bool, seeds: int,
              workers: int | None, output: Path, progress_bar) -> tuple[dict, list]:
    """Every loss in ``tune`` tuned in its own study with the same budget (finished ones are not
    run again), then their winners (and paper defaults) on the held-out split (stored runs reused)."""
    from alpa_tune.compare import run_entries
    from alpa_tune.preflight import check_registries, check_storage
    from alpa_tune.shootout import paper_entry, store_run, stored_runs, study_config, tuned_losses, winner
    from alpa_tune.study import budget_met, check_existing_study, create_study, load_study

    names = tuned_losses(tune)
    budget = trials or config.search.n_trials
    configs = {loss: study_config(config, loss, budget) for loss in names}
    check_registries(config)
    check_storage(url)
    for loss_config in configs.values():  # every study's drift and budget, before any work
        check_registries(loss_config)
        check_existing_study(loss_config, url, loss_config.search.n_trials)
    dataset = _prepare_data(config)
    gpu_list = _gpus(None)
    for loss, loss_config in configs.items():
        study = create_study(loss_config, url, budget=loss_config.search.n_trials)
        if budget_met(study):
            console.print(f"study {loss_config.name}: budget of {loss_config.search.n_trials} met", markup=False,
                          highlight=False)
            continue
        console.print(f"study {loss_config.name}: tuning {loss} ({loss_config.search.n_trials} trials)",
                      markup=False, highlight=False)
        code = _launch(loss_config.name, url, gpu_list, 1, workers or 2, [], output.parent)
        if code != 0:
            raise typer.Exit(code)
    studies = {loss: load_study(configs[loss].name, url) for loss in names}
    entries, owner = [], {}
    for loss in names:
        entries.append(winner(studies[loss], loss))
        owner[loss] = studies[loss]
        paper = paper_entry(loss) if paper_defaults else None
        if paper is not None:
            entries.append(paper)
            owner[paper.label] = studies[loss]
    seed_list = [config.training.seed + k for k in range(seeds)]
    done = stored_runs(owner, entries, seed_list, config, dataset.fingerprint)
    by_label = {entry.label: entry for entry in entries}
    left = len(entries) * seeds - len(done)
    if done:
        console.print(f"held-out: {len(done)} training(s) reused from the studies, {left} to run", markup=False,
                      highlight=False)
    progress, on_run = progress_bar(left, f"held-out: {len(entries)} loss(es) x {seeds} seed(s)")

    def keep(run: dict, finished: int, total: int) -> None:
        store_run(owner[run["loss"]], by_label[run["loss"]], run, config, dataset.fingerprint)
        on_run(run, finished, total)

    with progress:
        comparison = run_entries(config, entries, seeds, dataset=dataset, workers=workers, on_run=keep, done=done)
    comparison["study"] = f"{config.name} shootout"
    comparison["studies"] = {loss: configs[loss].name for loss in names}
    comparison["trials"] = {loss: configs[loss].search.n_trials for loss in names}
    return comparison, list(studies.values())


@app.command()
def report(
    study_name: Annotated[str, typer.Argument(metavar="STUDY_NAME")],
    storage: StorageOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """Write one self-contained, offline HTML report: history, importances, slices, per-class metrics, comparison."""
    from alpa_tune.report import write_report
    from alpa_tune.study import load_study

    path = write_report(load_study(study_name, _url(storage), read_only=True), output)
    console.print(f"wrote {path} (open it in any browser; it needs no network)", markup=False, highlight=False)


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind. The dashboard has no login: keep it on loopback "
                                      "and use an SSH tunnel from elsewhere.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8080,
) -> None:
    """Serve optuna-dashboard on the study storage (every trial's per-fold and per-class metrics)."""
    from alpa_tune.dashboard import serve

    serve(_url(storage), host, port, log=lambda line: err_console.print(line, markup=False, highlight=False,
                                                                         soft_wrap=True))


@study_app.command("create")
def study_create(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG")],
    storage: StorageOpt = None,
    set_: SetOpt = None,
) -> None:
    """Create the schema and the study once (idempotent), store its config, enqueue the paper's points."""
    from alpa_tune.config import load_config
    from alpa_tune.preflight import check_registries
    from alpa_tune.study import create_study

    config = load_config(config_path, set_ or [])
    check_registries(config)
    url = _url(storage)
    create_study(config, url)
    console.print(f"study [bold]{config.name}[/] ready in {_masked(url)}")


@study_app.command("list")
def study_list(storage: StorageOpt = None) -> None:
    """List the studies in the storage with their progress."""
    list_studies(_url(storage), print)


@study_app.command("show")
def study_show(study_name: Annotated[str, typer.Argument(metavar="STUDY_NAME")], storage: StorageOpt = None,
               limit: Annotated[int, typer.Option(help="Rows to show.", min=1)] = 20) -> None:
    """Show a study's progress and its best trials."""
    show_study(study_name, _url(storage), limit, print)


@study_app.command("delete")
def study_delete(study_name: Annotated[str, typer.Argument(metavar="STUDY_NAME")], storage: StorageOpt = None,
                 yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False) -> None:
    """Delete a study and all its trials."""
    import optuna

    from alpa_tune.study import backend, load_study

    url = _url(storage)
    study = load_study(study_name, url, read_only=True)  # refuses an unknown name with a clear line
    if not yes and not typer.confirm(f"delete study {study_name!r} and its {len(study.trials)} trials?"):
        raise typer.Exit(1)
    optuna.delete_study(study_name=study_name, storage=backend(study))
    console.print(f"deleted study {study_name}")


@app.command()
def version() -> None:
    """Print the alpa-tune version."""
    console.print(__version__)


def _launch(study_name: str, url: str, gpu_list: list[int], per_gpu: int, cpu_workers: int | None,
            overrides: list[str], log_dir: Path) -> int:
    from alpa_tune.launcher import launch, plan_slots
    from alpa_tune.views import ProgressLines, workers_table

    slots = plan_slots(gpu_list, per_gpu, cpu_workers)
    console.print(f"{len(slots)} worker(s) on {'GPU ' + ','.join(map(str, gpu_list)) if gpu_list else 'CPU'}; "
                  f"logs in {log_dir}/")
    if console.is_terminal:
        with Live(console=console, refresh_per_second=2) as live:
            code = launch(study_name, url, slots=slots, overrides=overrides, log_dir=log_dir,
                          view=lambda study, s: live.update(workers_table(study, s)))
    else:
        view = ProgressLines(study_name, lambda line: console.print(line, markup=False, highlight=False))
        code = launch(study_name, url, slots=slots, overrides=overrides, log_dir=log_dir, view=view)
    if code != 0:
        from alpa_tune.errors import EXIT_DISK_FULL, EXIT_STORAGE_LOST

        last_exits = {slot.exit_codes[-1] for slot in slots if slot.exit_codes}
        for slot in slots:  # the reason a worker stopped for good, not only "see the logs"
            if slot.exit_codes and slot.exit_codes[-1] not in (0, None):
                err_console.print(f"worker {slot.index}: {slot.state}", markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"the study did not reach its budget; see the worker logs in {log_dir}/")
        # A full disk or a storage gone for good is the run's own exit code too.
        code = next((fault for fault in (EXIT_DISK_FULL, EXIT_STORAGE_LOST) if fault in last_exits), code)
    return code


def _finish(study_name: str, url: str, best_path: Path) -> None:
    from alpa_tune.export import study_records, write_records
    from alpa_tune.records import ExportError
    from alpa_tune.study import load_study

    try:
        records = study_records(load_study(study_name, url), 1)
    except ExportError as exc:
        err_console.print(str(exc))
        return
    record = records[0]
    write_records(records, best_path)
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["params"].items())
    console.print(f"best trial {record['trial']}: balanced accuracy {record['value']:.4f}\n  {params}\nwrote {best_path}")


def _prepare_data(config):
    """The data loaded once, with a progress bar, before any worker starts (preflight.prepare)."""
    from rich.progress import Progress

    from alpa_tune.preflight import prepare

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"preparing {config.data.source} data", total=None)
        return prepare(config, progress=lambda done, total: progress.update(task, completed=done, total=total),
                       announce=lambda line: console.print(line, markup=False, highlight=False))


def _gpus(text: str | None) -> list[int]:
    """``--gpus`` parsed and checked against the visible devices (all of them when not given)."""
    from alpa_tune.config import ConfigError
    from alpa_tune.launcher import detect_gpus

    visible = detect_gpus()
    if text is None:
        return visible
    try:
        wanted = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {text!r}: expected comma-separated indices such as 0,1") from None
    if not wanted:
        raise ConfigError(f"--gpus {text!r}: no GPU index given")
    missing = [gpu for gpu in wanted if gpu not in visible]
    if missing:
        seen = ",".join(map(str, visible)) if visible else "none"
        raise ConfigError(f"--gpus {text}: no GPU {missing[0]} on this machine (visible GPUs: {seen})")
    return wanted


def _check_writable(folder: Path) -> None:
    from alpa_tune.files import check_writable
    from alpa_tune.records import ExportError
    from alpa_tune.storage import check_free_space

    try:
        check_writable(folder)
    except OSError as exc:
        raise ExportError(f"--out {folder}: not writable ({exc.strerror})") from None
    check_free_space(folder, "output folder")


def _masked(url: str) -> str:
    from alpa_tune.storage import mask_url

    return mask_url(url)


def main() -> None:
    """The Typer app behind :func:`alpa_tune.entry.main`: user errors become one masked line and exit 2.

    A usage error (unknown option, missing argument) is one ``error:`` line plus a hint, not
    Click's boxed panel. A full disk exits 5, a storage gone past its patience exits 4.
    """
    try:
        from typer._click import exceptions as click  # Typer >= 0.26 vendors Click under this name
    except ImportError:  # pragma: no cover - an older Typer on plain Click
        from click import exceptions as click

    def invoke() -> int | None:
        try:
            return app(standalone_mode=False, prog_name="alpa-tune")
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "alpa-tune"
            fail(exc.format_message(), 2, f"hint: {command} --help")
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            err_console.print("aborted")
            sys.exit(1)

    run_reporting_errors(invoke)
