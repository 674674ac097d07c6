"""optuna-dashboard on a study store: the study's note, its report plots as artifacts, and the server.

Trials carry their figures as user attributes (pipeline, steps, ratio, bits per weight, sparsity, bytes,
perplexity, timings, status and reason) and their per-step parameters as Optuna parameters, so the dashboard's
trial table shows them as they are; this module adds what belongs to the study.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna

from compactmind import interrupt
from compactmind.errors import ConfigError
from compactmind.study.records import StudyRecords
from compactmind.study.storage import beside, safe_url

log = logging.getLogger(__name__)

def artifact_dir(storage_url: str, override: str | None = None) -> Path:
    """Where a study's artifacts live: beside its SQLite file, or storage/artifacts for server databases."""
    return Path(override) if override else beside(storage_url, "artifacts")


def _figure(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def note(records: StudyRecords, storage_url: str) -> str:
    """The study's note (Markdown): what was compressed, on what, how it is measured, and where it stands."""
    model, data, protocol = records.model or {}, records.data or {}, records.protocol or {}
    dense, best, counts = records.dense or {}, records.best, records.counts
    objectives = ", ".join(f"{name} ({direction})" for name, direction in records.objectives.items())
    lines = [f"## compactmind study `{records.study}`", "",
             f"- **model**: {model.get('name', '-')} ({model.get('parameters', 0):,} parameters) from "
             f"`{model.get('source', '-')}`",
             *([f"- **source**: {records.source_note}"] if records.source_note else []),
             f"- **data**: {data.get('label', '-')}; calibration: {data.get('calib_source', '-')}",
             f"- **protocol**: {protocol.get('windows', '-')} windows of {protocol.get('seq_len', '-')} tokens, "
             f"{protocol.get('dtype', '-')}, {protocol.get('data_samples', '-')} calibration samples, seed "
             f"{protocol.get('seed', '-')}; ratio against {protocol.get('baseline_bits', 32):g}-bit weights",
             f"- **target**: compression ratio >= {records.target_ratio:.4g} (trials below it are infeasible)",
             f"- **dense baseline**: perplexity {_figure(dense.get('perplexity'))}",
             f"- **storage**: `{safe_url(storage_url)}`",
             f"- **trials**: {sum(counts.values())} ({records.statuses}); Optuna's \"Pruned\" covers the infeasible, "
             "invalid and early-stopped ones: each trial's `status` and `reason` attributes say which and why"]
    if best:
        lines.append(f"- **best feasible**: trial {best.number}, `{best.pipeline}`: " +
                     ", ".join(f"{name} {_figure(best.get(name))}" for name in records.objectives))
    lines += ["", f"Objectives: {objectives}. The report plots are attached as artifacts."]
    return "\n".join(lines)


def publish(study: optuna.Study, records: StudyRecords, storage_url: str, report_paths: list[Path] | None = None,
            artifacts: str | None = None) -> None:
    """Write the study note and attach the report plots; best effort (the dashboard is optional)."""
    try:
        import optuna_dashboard
    except ImportError:
        return
    optuna_dashboard.save_note(study, note(records, storage_url))
    plots = [p for p in report_paths or [] if p.suffix in (".png", ".html")]
    if not plots:
        return
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    folder = artifact_dir(storage_url, artifacts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(folder))
        for path in plots:
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                            mimetype="text/html" if path.suffix == ".html" else "image/png")
    except OSError as exc:  # the reports are written; only their copy for the dashboard is missing
        log.warning("could not attach the report plots to the study in %s: %s", folder, exc.strerror or exc)


READ_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def read_only(app):
    """WSGI middleware: only reading requests reach `app`; any other (optuna-dashboard's write API deletes
    studies, tells trials, edits the attributes the sampler trusts) gets 403."""
    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() in READ_METHODS:
            return app(environ, start_response)
        body = b'{"reason": "this dashboard is read-only (compactmind dashboard --read_only)"}'
        start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return guarded


def exposure_warning(host: str, read_only_mode: bool) -> str | None:
    """What to tell a user who serves the dashboard beyond this machine."""
    if host in LOOPBACK:
        return None
    if read_only_mode:
        return (f"the dashboard on {host} is reachable from other machines without a password; it is read-only, but "
                "anyone who reaches it sees every study in this storage")
    return (f"the dashboard on {host} is reachable from other machines without a password, and optuna-dashboard's "
            "API lets anyone who reaches it delete studies, tell trials and change the attributes the search "
            "trusts; pass --read_only, or keep --host 127.0.0.1 and reach it through an SSH tunnel")


def app(storage, storage_url: str, artifacts: str | None = None, read_only_mode: bool = False):
    """optuna-dashboard's WSGI app on a storage, with the study's artifact folder (read-only on request)."""
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError("optuna-dashboard is not installed; pip install 'compactmind[dashboard]'.") from None
    from optuna.artifacts import FileSystemArtifactStore

    folder = artifact_dir(storage_url, artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    wsgi = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(folder)))
    return read_only(wsgi) if read_only_mode else wsgi


def serve(storage, storage_url: str, host: str, port: int, artifacts: str | None = None,
          access_log: bool = False, read_only_mode: bool = False) -> None:
    """optuna-dashboard on a local server; one log line per request only with access_log."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Handler(WSGIRequestHandler):
        def log_message(self, format, *args):
            if access_log:
                super().log_message(format, *args)

    wsgi = app(storage, storage_url, artifacts, read_only_mode)
    warning = exposure_warning(host, read_only_mode)
    if warning:
        log.warning("%s", warning)
    try:
        server = make_server(host, port, wsgi, handler_class=Handler)
    except OSError as exc:
        raise ConfigError(f"Cannot serve on {host}:{port}: {exc.strerror or exc}; pass another --port.") from None
    mode = " (read-only)" if read_only_mode else ""
    print(f"optuna-dashboard{mode} on {safe_url(storage_url)}: http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    server.timeout = 0.5  # between requests, and at least this often, a signal takes effect
    try:
        while True:
            server.handle_request()
            interrupt.checkpoint()
    finally:
        server.server_close()
