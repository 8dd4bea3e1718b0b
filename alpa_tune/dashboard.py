"""optuna-dashboard on a study storage, and the study note it shows.

The dashboard's HTTP API has no authentication: anyone who reaches the port can read every
study and edit notes. So it binds to loopback unless told otherwise, and says so when it is not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from alpa_tune.errors import BadInput
from alpa_tune.storage import mask_url, open_storage

if TYPE_CHECKING:
    import optuna

    from alpa_tune.config import StudyConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
INSTALL_HINT = "pip install optuna-dashboard (a dependency of alpa-tune; was it uninstalled?)"


class DashboardError(BadInput):
    """The dashboard cannot start: not installed, or the address is taken or invalid."""


def is_loopback(host: str) -> bool:
    """True for localhost and any loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def exposure_warning(host: str, port: int) -> str | None:
    """A warning line when the dashboard would be reachable from other machines, else None."""
    if is_loopback(host):
        return None
    return (f"warning: binding to {host}:{port}; optuna-dashboard has no authentication, so anyone who can "
            f"reach this port can read every study and change notes. Prefer --host 127.0.0.1 with an SSH tunnel "
            f"(ssh -L {port}:127.0.0.1:{port} HOST).")


def check_address(host: str, port: int) -> None:
    """Refuse a taken port or an unknown host now, with one clear line, not a server traceback later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DashboardError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as exc:
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log: Callable[[str], None] = print) -> None:
    """Run optuna-dashboard on the storage behind ``url`` until interrupted (blocks)."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise DashboardError(f"optuna-dashboard is not installed; {INSTALL_HINT}") from None
    # Our own storage object: the psycopg2 driver, pool settings and masked errors come with it,
    # and the URL (with any password) never reaches the dashboard's own messages.
    storage = open_storage(url, read_only=True)  # never creates an empty SQLite file
    check_address(host, port)
    warning = exposure_warning(host, port)
    if warning:
        log(warning)
    shown = f"[{host}]" if ":" in host else host
    log(f"optuna-dashboard for {mask_url(url)} at http://{shown}:{port}/ (Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):
        run_server(storage, host=host, port=port)


def study_note(config: StudyConfig) -> str:
    """Markdown describing a study's config: what the dashboard shows on the study page."""
    from alpa_tune.config import to_toml

    d, m, t, s = config.data, config.model, config.training, config.search
    if s.tunes_alpa:
        space = ", ".join(f"{name} in [{low:g}, {high:g}]" for name, (low, high) in
                          (("alpha", s.space.alpha), ("beta", s.space.beta),
                           ("gamma_pos", s.space.gamma_pos), ("gamma_neg", s.space.gamma_neg)))
        space += f"; clip {s.space.clip:g}, {s.space.focusing} focusing; variants {', '.join(s.variants)}"
    else:
        narrowed = ", ".join(f"{key} {value}" for key, value in s.space.items())
        space = f"the declared space of {s.loss}" + (f", narrowed: {narrowed}" if narrowed else "")
    source = d.source + (f" ({d.path})" if d.path else "")
    return "\n".join([
        f"## {config.name}: {'ALPA' if s.tunes_alpa else s.loss} loss search",
        "",
        f"- **Data**: {source}, {d.image_size} px; {t.holdout:.0%} held out (seed {t.seed}), never used here",
        f"- **Model**: {m.backbone}{' (pretrained)' if m.pretrained else ''}",
        f"- **Training**: {t.folds}-fold CV, {t.epochs} epochs, batch {t.batch_size}, {t.optimizer} lr {t.lr:g}, "
        f"weight decay {t.weight_decay:g}",
        f"- **Search**: {s.n_trials} trials, {s.sampler} sampler, {s.pruner} pruner (report per {s.report})",
        f"- **Space**: {space}",
        "- **Value**: mean fold balanced accuracy (maximise). Trial user attributes hold per-fold "
        "balanced accuracy and macro F1, per-class recall and F1, epoch time, device and worker.",
        "",
        "Full config:",
        "",
        "```toml",
        to_toml(config.to_dict()).rstrip("\n"),
        "```",
    ])


def save_study_note(study: optuna.Study, config: StudyConfig) -> None:
    """Store :func:`study_note` as the study's dashboard note; a no-op without optuna-dashboard."""
    try:
        from optuna_dashboard import save_note
    except ImportError:  # an optional extra: the search works without it
        return
    save_note(study, study_note(config))
