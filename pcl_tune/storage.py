"""Where an experiment lives: a folder on a local or shared file system, or a prefix on object
storage, and where its Optuna study lives.

``--storage-path`` is either a file-system path (the default ``./runs``; on a cluster, a shared
file system every node mounts, e.g. NFS) or a URI that ``pyarrow.fs.FileSystem.from_uri`` opens
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ...). Ray Tune gets it as it is: trial results,
checkpoints and Tune's own state go there from whichever node wrote them.

pcl_tune's own files of an experiment (the space copy, ``space.json``, ``optuna.db``,
``trials.csv``, ``best.yaml``, the report) are written by the driver. On a file system they are
written into the experiment folder. On object storage the driver writes them into a working copy
on its own disk, :attr:`Store.local` (under ``$PCL_TUNE_CACHE``, default ``~/.cache/pcl_tune``),
and uploads them (:meth:`Store.push`): the space files at once, ``optuna.db`` whenever Tune saves
its snapshot of the searcher (just before Tune uploads that snapshot, so the stored study is never
older than the stored searcher state), the rest at the end. ``--resume`` and the
analysis first download the experiment into that copy (:meth:`Store.pull`; checkpoint weights are
left remote unless asked for).

Credentials are never part of a URI here: pyarrow reads them from the standard environment
variables (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL`` for an S3-compatible server; ``GOOGLE_APPLICATION_CREDENTIALS``), so no
log line, report or ``space.json`` can hold them. A URI with a credential in its query is refused.

**The Optuna study.** It belongs to the search's driver (TPE runs there). By default it is the
experiment folder's ``optuna.db`` (SQLite): on a file system in place; on object storage in the
working copy, uploaded as above, so a ``--resume`` from another machine downloads the study with
the rest. ``--optuna-storage URL`` puts it in a database server instead (``postgresql://...``,
``mysql+pymysql://...``), or in a file given by absolute path (``sqlite:////abs/path.db``,
``journal:////abs/path.log`` for Optuna's journal file, which suits NFS). Combinations that would
silently fork the study are refused: a relative file path (another working directory opens
another file), a file-based study beside object storage (a resume elsewhere would not find it),
and a ``--resume`` whose study is not the one the search started with. The restored searcher
always reconnects to the study the command names (:func:`pcl_tune.searcher.set_study_storage`),
never to a path pickled in an older state, so a folder moved elsewhere resumes its own study.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .space import SpaceError

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CACHE_ENV = "PCL_TUNE_CACHE"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
"""Files :meth:`Store.pull` leaves remote unless ``weights=True``: checkpoint weights, large and
not read by the analysis."""
_SECRET_QUERY = re.compile(r"(access|secret|session)[_-]?(key|token)|password|credential", re.IGNORECASE)


class StorageError(SpaceError):
    """A storage path, URI or Optuna storage that cannot be used; the message is one line."""


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a file URI is a plain path)."""
    m = SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def redact(url: str) -> str:
    """``url`` without secrets: a password in its authority and any secret-looking query value
    become ``***`` (for logs and records)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(f"{k}={'***' if _SECRET_QUERY.search(k) else v}" for k, v in parse_qsl(parts.query,
                                                                                          keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _check_uri(uri: str, what: str) -> None:
    parts = urlsplit(uri)
    secrets = [k for k, _ in parse_qsl(parts.query) if _SECRET_QUERY.search(k)]
    if secrets or ":" in parts.netloc.rsplit("@", 1)[0] and "@" in parts.netloc:
        raise StorageError(f"{what} {redact(uri)}: credentials do not belong in the URI (they would be written "
                           "to logs and records); set them in the environment (AWS_ACCESS_KEY_ID, "
                           "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server)")
    if not parts.netloc:
        raise StorageError(f"{what} {uri}: expected scheme://bucket/prefix, e.g. s3://my-bucket/pcl_tune")


def join(root: str, *parts: str) -> str:
    """``root`` (a path or a URI, whose query string stays at the end) joined with ``parts``."""
    if not is_uri(root):
        return str(Path(root, *parts))
    s = urlsplit(root)
    path = "/".join([s.path.rstrip("/"), *parts])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def resolve_root(storage_path: str, what: str = "--storage-path") -> str:
    """The storage root as Tune gets it: an absolute path, or the URI (checked, trailing ``/`` dropped)."""
    text = str(storage_path)
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    if not is_uri(text):
        return str(Path(text).expanduser().resolve())
    _check_uri(text, what)
    s = urlsplit(text)
    return urlunsplit((s.scheme, s.netloc, s.path.rstrip("/"), s.query, s.fragment))


def filesystem(uri: str, what: str = "--storage-path") -> tuple[Any, str]:
    """(``pyarrow.fs.FileSystem``, path inside it) of a URI; one-line :class:`StorageError` otherwise."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ValueError by scheme
        raise StorageError(f"{what} {redact(uri)}: pyarrow cannot open it ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def cache_root() -> Path:
    """Where working copies of remote experiments live: ``$PCL_TUNE_CACHE`` or ``~/.cache/pcl_tune``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pcl_tune").expanduser()


@dataclass(frozen=True)
class Store:
    """One experiment's location: ``root`` (an absolute path or a URI) and ``name``."""

    root: str
    name: str

    @classmethod
    def open(cls, storage_path: str, name: str) -> Store:
        return cls(resolve_root(storage_path), name)

    @classmethod
    def of_folder(cls, folder: str) -> Store:
        """The store of an experiment folder given whole (``s3://b/p/name`` or ``/runs/name``)."""
        if not is_uri(folder):
            p = Path(folder).expanduser().resolve()
            return cls(str(p.parent), p.name)
        root = resolve_root(folder, "experiment")
        s = urlsplit(root)
        parent, _, name = s.path.rpartition("/")
        if not name:
            raise StorageError(f"{redact(folder)}: expected an experiment folder, scheme://bucket/prefix/name")
        return cls(urlunsplit((s.scheme, s.netloc, parent, s.query, s.fragment)), name)

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    @property
    def uri(self) -> str:
        """The experiment folder as Tune names it: a path, or ``scheme://.../name``."""
        return join(self.root, self.name)

    @property
    def display(self) -> str:
        return redact(self.uri) if self.remote else self.uri

    @property
    def local(self) -> Path:
        """The experiment folder on this machine: the folder itself, or the remote one's working copy."""
        if not self.remote:
            return Path(self.root) / self.name
        s = urlsplit(self.root)
        return cache_root() / "experiments" / s.scheme / s.netloc / s.path.strip("/") / self.name

    # -- remote operations ------------------------------------------------------------------
    def _fs(self) -> tuple[Any, str]:
        return filesystem(self.uri)

    def _listing(self) -> list[Any]:
        """Every remote file under the experiment (FileInfo, recursive; [] when there is none)."""
        import pyarrow.fs as pafs

        fs, path = self._fs()
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except Exception as e:
            raise StorageError(f"--storage-path {redact(self.root)}: cannot list {self.display} "
                               f"({_one_line(e)})") from None
        return [i for i in infos if i.type == pafs.FileType.File]

    def exists(self) -> bool:
        """The experiment folder holds at least one file."""
        if not self.remote:
            return self.local.is_dir() and any(self.local.iterdir())
        return bool(self._listing())

    def check_writable(self) -> None:
        """Write and delete a marker under the experiment prefix; a one-line StorageError if that fails."""
        fs, path = self._fs()
        marker = f"{path}/.pcl_tune_write_check_{uuid.uuid4().hex[:8]}"
        try:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(marker) as f:
                f.write(b"ok")
            fs.delete_file(marker)
        except Exception as e:
            raise StorageError(f"--storage-path {redact(self.root)}: cannot write under {self.display} "
                               f"({_one_line(e)}); check the bucket, its permissions and the credentials in "
                               "the environment") from None

    def pull(self, *, weights: bool = False, keep: tuple[str, ...] = ()) -> Path:
        """Make :attr:`local` a copy of the remote experiment (files changed remotely are fetched,
        files gone remotely removed; modification times are the remote ones, so "written last"
        still means what it meant there). Weights (:data:`WEIGHT_SUFFIXES`) only with ``weights``;
        the local files named in ``keep`` (relative names) are left as they are. A file-system
        store is already local: returns its folder."""
        if not self.remote:
            return self.local
        fs, base = self._fs()
        local = self.local
        local.mkdir(parents=True, exist_ok=True)
        wanted: set[Path] = set()
        for info in self._listing():
            rel = info.path[len(base):].lstrip("/")
            if not rel or (not weights and rel.endswith(WEIGHT_SUFFIXES)) or rel in keep:
                continue
            dest = local / rel
            wanted.add(dest)
            mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
            if dest.is_file() and dest.stat().st_size == info.size and abs(dest.stat().st_mtime - mtime) < 1e-3:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
            os.utime(dest, (mtime, mtime))
        for path in sorted(local.rglob("*"), reverse=True):  # files gone remotely, then empty folders
            rel = path.relative_to(local).as_posix()
            if path.is_file() and path not in wanted and rel not in keep \
                    and not (not weights and path.name.endswith(WEIGHT_SUFFIXES)):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        return local

    def push(self, *names: str) -> None:
        """Upload these files or folders of :attr:`local` (relative names) to the remote
        experiment; a file-system store has nothing to do. Missing names are skipped."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        fs, base = self._fs()
        for name in names:
            src = self.local / name
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
            for f in files:
                rel = f.relative_to(self.local).as_posix()
                try:
                    fs.create_dir(f"{base}/{rel}".rsplit("/", 1)[0], recursive=True)
                    pafs.copy_files(str(f), f"{base}/{rel}", destination_filesystem=fs)
                except Exception as e:
                    raise StorageError(f"cannot upload {f} to {self.display}/{rel} ({_one_line(e)})") from None

    def reset_local(self) -> None:
        """Empty the working copy of a remote experiment (a new search must not inherit stale files)."""
        if self.remote and self.local.exists():
            shutil.rmtree(self.local)


# -- the Optuna study --------------------------------------------------------------------------
FILE_SCHEMES = ("sqlite", "journal")
SERVER_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


def default_study_url(store: Store, db_name: str) -> str:
    """The experiment folder's own SQLite study (the working copy's for a remote store)."""
    return f"sqlite:///{store.local / db_name}"


def check_study_url(url: str, store: Store, *, what: str = "--optuna-storage") -> None:
    """Refuse an Optuna storage URL that would fork the study or cannot be opened (one line)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in FILE_SCHEMES + SERVER_SCHEMES:
        raise StorageError(f"{what} {redact(url)}: expected a database URL (postgresql://user@host/db, "
                           "mysql+pymysql://...), sqlite:////absolute/path.db or journal:////absolute/path.log")
    if scheme in FILE_SCHEMES:
        if not url.split("://", 1)[1].startswith("//"):  # sqlite:///rel.db is relative, sqlite:////abs.db not
            raise StorageError(f"{what} {url}: a study file needs an absolute path (sqlite:////abs/path.db, four "
                               "slashes): a relative one opens another file from another working directory and "
                               "forks the study")
        if store.remote:
            raise StorageError(f"{what} {url}: a study file on this machine beside object storage "
                               f"({store.display}) forks the study when the search resumes elsewhere; leave "
                               "--optuna-storage out (the study is kept in the experiment folder) or give a "
                               "database server URL (postgresql://...)")


def study_file_path(url: str) -> Path:
    """The absolute file of a ``sqlite:////abs`` or ``journal:////abs`` URL."""
    return Path("/" + url.split("://", 1)[1].lstrip("/"))


def open_study_storage(url: str) -> Any:
    """The ``optuna.storages.BaseStorage`` of a URL (``journal:`` = Optuna's journal file)."""
    import optuna

    if url.lower().startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = study_file_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.lower().startswith("sqlite:"):
        study_file_path(url).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:
        raise StorageError(f"--optuna-storage {redact(url)}: cannot open it ({_one_line(e)})") from None


# -- is a file-system storage path shared by the cluster's nodes? ------------------------------
def nodes_missing_path(root: str, timeout: float = 60.0) -> tuple[list[str], int]:
    """(addresses of the alive Ray nodes that cannot read a marker written under ``root`` by this
    process, number of alive nodes); ([], 0) when Ray is not initialised. A one-node cluster is not
    probed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return [], 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return [], len(nodes)
    Path(root).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = Path(root) / f".pcl_tune_shared_check_{token[:12]}"
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_reads_marker)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token) for n in nodes]
        seen = ray.get(refs, timeout=timeout)
    finally:
        marker.unlink(missing_ok=True)
    return [str(n.get("NodeManagerAddress", n["NodeID"])) for n, ok in zip(nodes, seen) if not ok], len(nodes)


def _reads_marker(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False
