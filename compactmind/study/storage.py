"""The study storage: Optuna's RDB storage (SQLite by default, PostgreSQL/MySQL for many machines), opened with
a heartbeat so a killed trial is failed and retried, URL checks that need no connection, and password masking.

SQLite files are in WAL mode: readers (a dashboard, `compactmind report`) never block writers, and writers wait
for each other under SQLite's busy timeout (SQLITE_BUSY_TIMEOUT_S); a write SQLite refuses at once as locked is
retried (SQLiteStorage). The heartbeat's grace period is derived from that wait: a trial is stale only when no
beat has landed for longer than one write can wait on a lock plus two beat intervals, so a worker held up by a
lock is never taken for dead. `study_lock` lets one process at a time create and describe a study.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import time
import warnings
import weakref
from pathlib import Path

import optuna

from compactmind.errors import StorageError

log = logging.getLogger(__name__)


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        log.warning("$%s must be a number of seconds, got %r; using %s", name, value, default)
        return default


HEARTBEAT_S = _seconds("COMPACTMIND_HEARTBEAT_S", 5)  # a trial's beat interval
SQLITE_BUSY_TIMEOUT_S = _seconds("COMPACTMIND_LOCK_WAIT_S", 30)  # SQLite's own wait for another writer's lock
GRACE_S = SQLITE_BUSY_TIMEOUT_S + 2 * HEARTBEAT_S + 5  # no beat for this long: the trial's process is gone
PROCESS_ATTR = "compactmind:process"  # host:pid:start of the process running a trial (study.liveness)
STAMPED_ATTR = "compactmind:stamped"  # a heartbeat another worker stamped on a trial that had none
LOCKED_RETRIES = 8  # then ours: the whole write again, after 0.1, 0.2, 0.4 ... 12.8 s


def safe_url(url: str) -> str:
    """The storage URL with any password masked, for logs and reports."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: mask what looks like credentials
        return url.split("@")[-1] if "@" in url else url


def scrub(text: str, url: str) -> str:
    """text with the URL's password masked wherever it appears (driver errors may quote the URL)."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # not parsable: nothing to mask beyond the URL itself
        password = None
    return text.replace(url, safe_url(url)).replace(password, "***") if password else text


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def beside(url: str, name: str) -> Path:
    """A folder kept with the study store: beside the SQLite file, or under storage/ for a database server."""
    path = sqlite_path(url)
    return (path.parent if path is not None else Path("storage")) / name


def check_storage(url: str, create: bool = True) -> None:
    """Checks that need no connection (nothing is created): the URL's form, and for SQLite the file itself."""
    if "://" not in url:
        raise StorageError(f"--storage {safe_url(url)!r} is not a database URL; use e.g. sqlite:///storage/study.db "
                           "or postgresql://user@host/db.")
    path = sqlite_path(url)
    if url.startswith("sqlite") and (path is None or str(path) in ("", ":memory:")):
        raise StorageError("An in-memory SQLite storage would lose the study when the process ends; pass a file, "
                           "e.g. sqlite:///storage/compactmind.db.")
    if path is None:
        return
    if not path.exists() and not create:
        raise StorageError(f"The study database {path} does not exist; run a study first or pass --storage.")
    if path.is_dir():
        raise StorageError(f"--storage points at the folder {path}; give a database file inside it.")
    if create:
        parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise StorageError(f"Cannot create the study database {path}: its folder is not writable.")
    if path.is_file() and path.stat().st_size > 0:
        if not os.access(path, os.R_OK):
            raise StorageError(f"The study database {path} cannot be read (permission denied).")
        tables = _sqlite_tables(path)
        if tables is None:
            raise StorageError(f"{path} is not an SQLite database; pass another --storage file.")
        if not create and "studies" not in tables:
            raise StorageError(f"{path} is an SQLite database but holds no Optuna studies; pass the --storage "
                               "a study was run with.")


def reachable(url: str) -> None:
    """A database server answers (asked before a long model load, so a wrong URL fails at once); an SQLite file
    is checked by check_storage."""
    if sqlite_path(url) is not None:
        return
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url)
    except Exception as exc:  # an unknown driver or a malformed URL
        raise StorageError(f"Cannot open the storage {safe_url(url)}: {scrub(_first_line(exc), url)}; check --storage "
                           "(an Optuna RDB URL such as postgresql://user@host/db).") from exc
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise StorageError(f"Cannot reach the storage {safe_url(url)}: {scrub(_first_line(exc), url)}; check the "
                           "server and --storage.") from exc
    finally:
        engine.dispose()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sqlite_tables(path: Path) -> set[str] | None:
    """The file's table names, read by SQLite itself without write access; None when it is not an SQLite file.

    The file is never opened by Python: closing any descriptor of a file drops every POSIX lock the process holds
    on it, those of its open SQLite connections included (SQLite's "how to corrupt" 2.2). A process that then
    reads the study while another writes it -- a drill, the dashboard, a worker checking the storage again --
    lets the other process's last close delete the WAL under it, and its next reads fail as "malformed".
    A WAL file's last writer removes its -wal and -shm files as it exits, and a read-only connection opened in
    that instant fails: such a failure is asked again before it counts."""
    import sqlite3

    for attempt in range(6):  # at most about half a minute on a file another process keeps locked
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                return {row[0] for row in con.execute("select name from sqlite_master where type='table'")}
            finally:
                con.close()
        except sqlite3.OperationalError:
            time.sleep(0.05 * (attempt + 1))
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                return None
            raise StorageError(f"The study database {path} cannot be read: SQLite says {exc}.") from None
    raise StorageError(f"The study database {path} cannot be read: SQLite kept refusing it (locked or being "
                       "closed by another process); try again.")


try:
    from sqlalchemy.exc import SQLAlchemyError as _DriverError
except ImportError:  # sqlalchemy comes with optuna; a server driver error is one of its errors
    _DriverError = RuntimeError
StorageTrouble = (optuna.exceptions.StorageInternalError, _DriverError)  # the storage itself failed


def _is_locked(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc).lower()
        if "database is locked" in text or "database is busy" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on an SQLite file, each write retried with exponential backoff when SQLite refuses
    it as locked. SQLite waits for a lock under its busy timeout; with every transaction beginning IMMEDIATE (below)
    two writers can no longer deadlock, so "database is locked" now means that wait ran out, and the retries wait
    longer (a read-only storage, which begins no IMMEDIATE transaction, never writes).

    A storage that writes begins every transaction with BEGIN IMMEDIATE (`serialized`), so one writer at a time
    holds the write lock from its first read: Optuna's writes read a trial's state, then change it
    (WAITING -> RUNNING when a worker takes an enqueued trial, RUNNING -> FAIL when a stale one is failed), and
    Python's sqlite3 driver otherwise runs that read outside any transaction, where two workers can both see
    WAITING and both take the same trial. Readers of a WAL file are not blocked by it. A study reaches
    this storage through Optuna's cache, which creates trials and sets parameters by the storage's private
    methods: those two writes are not retried here (they wait under SQLite's busy timeout only), as wrapping
    Optuna's private methods would break with its next release."""

    def __init__(self, url: str, engine_kwargs: dict, serialized: bool = True, **kwargs):
        if serialized:  # the driver's own transaction handling off: each transaction begins as below
            engine_kwargs = {**engine_kwargs, "connect_args": {**engine_kwargs.get("connect_args", {}),
                                                                "isolation_level": None}}
        super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)
        if serialized:
            from sqlalchemy import event

            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))

    def _retry(self, write, *args, **kwargs):
        for attempt in range(LOCKED_RETRIES + 1):
            try:
                return write(*args, **kwargs)
            except Exception as exc:  # a locked write was rolled back; anything else is not ours to handle
                if attempt == LOCKED_RETRIES or not _is_locked(exc):
                    raise
                delay = 0.1 * 2 ** attempt
                log.warning("the study database is locked; retrying in %.1f s", delay)
                time.sleep(delay)

    def create_new_study(self, *args, **kwargs):
        return self._retry(super().create_new_study, *args, **kwargs)

    def set_study_user_attr(self, *args, **kwargs):
        return self._retry(super().set_study_user_attr, *args, **kwargs)

    def set_study_system_attr(self, *args, **kwargs):
        return self._retry(super().set_study_system_attr, *args, **kwargs)

    def set_trial_state_values(self, *args, **kwargs):
        return self._retry(super().set_trial_state_values, *args, **kwargs)

    def set_trial_intermediate_value(self, *args, **kwargs):
        return self._retry(super().set_trial_intermediate_value, *args, **kwargs)

    def set_trial_user_attr(self, *args, **kwargs):
        return self._retry(super().set_trial_user_attr, *args, **kwargs)

    def set_trial_system_attr(self, *args, **kwargs):
        return self._retry(super().set_trial_system_attr, *args, **kwargs)

    def record_heartbeat(self, *args, **kwargs):
        """A heartbeat is written from Optuna's thread, where an error would end in a traceback and nothing
        else: one missed beat is harmless (the next comes HEARTBEAT_S later, and the trial goes stale only
        after GRACE_S), and a storage that has really failed stops the run at its next write in the trial."""
        try:  # one attempt, no retry: a thread waiting minutes on a lock would hold up the run's shutdown
            return super().record_heartbeat(*args, **kwargs)
        except StorageTrouble as exc:
            log.warning("a heartbeat was not recorded (%s)", str(exc).splitlines()[0][:200] if str(exc) else exc)


def _file_lock(path: Path):
    """The lock file beside an SQLite file: processes opening one new file at the same moment would race to
    create its tables (one fails with "table ... already exists"), and two creating one study would describe
    it twice."""
    from filelock import FileLock

    return FileLock(str(path.parent / f".{path.name}.lock"))


@contextlib.contextmanager
def _creation_lock(path: Path | None):
    if path is None:
        yield
        return
    with _file_lock(path):
        yield


def _wal(path: Path) -> None:
    """Put the SQLite file in WAL mode (a setting of the file itself, kept by every later connection)."""
    import sqlite3

    con = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, name: str):
    """One process at a time between "does the study exist" and "it is described": the file lock beside an
    SQLite file; a session-level advisory lock on PostgreSQL (GET_LOCK on MySQL), released when the block ends."""
    from sqlalchemy import text

    dialect = storage.engine.dialect.name
    if dialect == "sqlite":
        path = Path(storage.engine.url.database)
        with _file_lock(path):
            yield
        return
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    key = int.from_bytes(hashlib.sha256(f"compactmind:{name}".encode()).digest()[:8], "big", signed=True)
    with storage.engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:k, 600)"), {"k": f"compactmind:{key}"})
        try:
            yield
        finally:
            unlock = "SELECT pg_advisory_unlock(:k)" if dialect == "postgresql" else "SELECT RELEASE_LOCK(:k)"
            conn.execute(text(unlock), {"k": key if dialect == "postgresql" else f"compactmind:{key}"})


_RETRY = None
_OPEN = weakref.WeakSet()  # every storage opened in this process, for close_all


def close_all() -> None:
    """Close every storage this process opened: its SQLite connections' last close folds the WAL back into the
    database file, so the file alone holds the whole study (the program ends without the interpreter's teardown)."""
    for storage in list(_OPEN):
        storage.engine.dispose()


def _retry_what_it_held(study: optuna.Study, trial) -> None:
    """A stale trial that had taken parameters runs again (up to 3 times), as a WAITING copy of itself; one that
    died before taking any holds nothing, and whatever it would have run is proposed again by the sampler."""
    global _RETRY
    if not trial.params:
        return
    # The copy is a new trial: the dead process and a stamp are not its own. Inherited, they would let another
    # worker take the copy for dead (its process is gone) in the moment between its taking and its first beat.
    trial = copy.copy(trial)
    trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in (PROCESS_ATTR, STAMPED_ATTR)}
    if _RETRY is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    _RETRY(study, trial)


def open_storage(url: str, create: bool = True, readonly: bool = False) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeat (a killed trial becomes FAIL and is retried once its heartbeat is stale).
    readonly: for reading a study back (report, best): no write lock taken, no heartbeat."""
    check_storage(url, create and not readonly)
    path = sqlite_path(url)
    writing = not readonly
    if path is not None and create and writing:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if path else {"pool_pre_ping": True}
    storage_class = SQLiteStorage if path else optuna.storages.RDBStorage
    try:
        with warnings.catch_warnings(), _creation_lock(path if writing else None):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: "experimental"
            heartbeat = {} if readonly else dict(
                heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=_retry_what_it_held)
            if path is not None and writing:
                _wal(path)
            serialized = {"serialized": writing} if path else {}
            storage = storage_class(url, engine_kwargs=engine_kwargs, skip_table_creation=readonly, **serialized,
                                    **heartbeat)
            _OPEN.add(storage)
            return storage
    except Exception as exc:  # driver, network and schema errors all end here, as one sentence
        raise StorageError(f"Cannot open the storage {safe_url(url)}: {scrub(_first_line(exc), url)}; check --storage "
                           "(an Optuna RDB URL such as sqlite:///storage/compactmind.db).") from exc


def study_names(storage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage, study_name: str) -> optuna.Study:
    names = study_names(storage)
    if study_name not in names:
        known = ", ".join(names) if names else "none"
        raise StorageError(f"No study named {study_name!r} in this storage (studies there: {known}).")
    return optuna.load_study(study_name=study_name, storage=storage)
