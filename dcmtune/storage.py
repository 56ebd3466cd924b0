"""Where experiments live: a local/shared directory or an object store, through pyarrow.fs.

A sweep's `run.storage_path` is anything Ray Tune accepts as `RunConfig(storage_path=...)`:

  ./ray_results, /shared/sweeps           a directory (local, or NFS/Lustre/GPFS mounted on
                                          every node of a cluster)
  file:///shared/sweeps                   the same, as a URI
  s3://bucket/sweeps                      S3, or an S3-compatible server with query options:
  s3://bucket/sweeps?endpoint_override=minio.local:9000&scheme=http
  gs://bucket/sweeps                      Google Cloud Storage (credentials from the environment)

Ray resolves the URI with `pyarrow.fs.FileSystem.from_uri` on every node; dcmtune does the same
here, once on the driver, to check the URI before anything starts (`resolve`, `probe`) and to
read what Tune wrote (`Location`: existence, small files, directory downloads). Credentials
come from the environment of each process (AWS_ACCESS_KEY_ID, ..., on every Ray node).

A POSIX location (a plain path or file://) is read and written in place. An object-store
location is "remote": the driver keeps a local copy of what it reads and writes under
`local_copy_dir` (the Optuna journal, the lock, the ranking's inputs and outputs) and uploads
what must live with the experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "StorageError",
    "Location",
    "is_uri",
    "is_remote",
    "join",
    "resolve",
    "probe",
    "local_copy_dir",
    "PROBE_TIMEOUT_S",
]

log = logging.getLogger(__name__)

# How long the driver waits for an object store to answer before refusing it (a bad endpoint
# must fail before trials start, well within 30 s).
PROBE_TIMEOUT_S = 10.0
RAY_MARKER = ".validate_storage_marker"  # Ray writes it into every experiment it creates
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """A storage location is malformed or unreachable; one line naming the key."""


def is_uri(path: str) -> bool:
    """Whether `path` is written as a URI (scheme://...)."""
    return bool(_SCHEME.match(str(path)))


def is_remote(path: str) -> bool:
    """Whether `path` is an object store (a URI other than file://), not a POSIX directory."""
    m = _SCHEME.match(str(path))
    return m is not None and m.group(1).lower() != "file"


def join(base: str, *parts: str) -> str:
    """`base`/parts for a path or a URI; a URI keeps its query (options) at the end."""
    base = str(base)
    head, sep, query = base.partition("?") if is_uri(base) else (base, "", "")
    head = head.rstrip("/") if head.rstrip("/") else head
    out = posixpath.join(head, *parts) if is_uri(base) else str(Path(head, *parts))
    return out + (sep + query if sep else "")


def _check_syntax(uri: str, key: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme.lower() in ("s3", "gs", "gcs") and not parts.netloc:
        raise StorageError(f"{key}: {uri!r} names no bucket; expected {parts.scheme}://BUCKET/PATH")


@dataclasses.dataclass(frozen=True)
class Location:
    """A directory on some filesystem: the URI as written, pyarrow's filesystem and path."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    path: str

    @property
    def remote(self) -> bool:
        import pyarrow.fs as pafs

        return not isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> Location:
        return Location(join(self.uri, *parts), self.fs, posixpath.join(self.path, *parts))

    def _p(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if rel else self.path

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(rel)).type == pafs.FileType.File

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` ([] if it does not exist)."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self._p(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(sel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        parent = posixpath.dirname(self._p(rel))
        if parent:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self._p(rel)) as f:
            f.write(data)

    def upload(self, local: Path, rel: str) -> None:
        """A local file or directory (recursively) to `rel`."""
        local = Path(local)
        if local.is_dir():
            for p in sorted(local.rglob("*")):
                if p.is_file():
                    self.write_bytes(
                        posixpath.join(rel, p.relative_to(local).as_posix()), p.read_bytes()
                    )
        else:
            self.write_bytes(rel, local.read_bytes())

    def download(
        self, rel: str, target: Path, skip: Callable[[str], bool] = lambda name: False
    ) -> list[Path]:
        """The file or directory `rel` to `target` (files whose relative path `skip` accepts
        are left out); returns the local files written."""
        import pyarrow.fs as pafs

        from dcmtune import _io

        root = self._p(rel)
        info = self.fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{join(self.uri, rel)}: not found")
        if info.type == pafs.FileType.File:
            items = [(root, Path(target))]
        else:
            sel = pafs.FileSelector(root, recursive=True)
            items = [
                (i.path, Path(target) / posixpath.relpath(i.path, root))
                for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File
            ]
        written = []
        for src, dst in items:
            if skip(posixpath.relpath(src, root)):
                continue
            with self.fs.open_input_stream(src) as f:
                _io.write_bytes(dst, f.read())
            written.append(dst)
        return written

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        p = self._p(rel)
        if self.fs.get_file_info(p).type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif self.exists(rel):
            self.fs.delete_file(p)

    def copy(self, rel: str, new_rel: str) -> None:
        """Copies file or directory `rel` to `new_rel` on this filesystem."""
        import pyarrow.fs as pafs

        src, dst = self._p(rel), self._p(new_rel)
        if self.fs.get_file_info(src).type == pafs.FileType.Directory:
            self.fs.create_dir(dst, recursive=True)
        pafs.copy_files(src, dst, source_filesystem=self.fs, destination_filesystem=self.fs)


def resolve(path: str, key: str = "run.storage_path") -> Location:
    """The Location of a path or URI, resolved as Ray Tune resolves a storage_path.

    Raises:
      StorageError: unknown scheme, unknown query option, no bucket, ... (one line, naming key).
    """
    import pyarrow.fs as pafs

    path = str(path)
    if is_uri(path):
        _check_syntax(path, key)
    else:
        return Location(path, pafs.LocalFileSystem(), str(Path(path).expanduser().resolve()))
    try:
        fs, fs_path = pafs.FileSystem.from_uri(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ValueError ... for bad URIs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(
            f"{key}: {path!r} is not a storage URI Ray Tune can use ({first}); "
            "expected a directory, file://, s3:// or gs:// (options as "
            "?endpoint_override=HOST:PORT&scheme=http)"
        ) from None
    return Location(path, fs, fs_path.rstrip("/"))


def spec_storage_path(key: str, value: str, base_dir: Path) -> str:
    """A storage_path as written in a spec or on the command line, normalised: a directory
    (relative to `base_dir`; file:// URIs become paths) or a remote URI, checked by resolving
    it as Ray Tune will. Raises the caller's SpecError via `StorageError` (one line)."""
    if is_remote(value):
        resolve(value, key)
        return value
    if is_uri(value):
        value = urlsplit(value).path
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else Path(base_dir) / p).resolve())


# The probe runs in a child process: a request to an endpoint that never answers keeps the
# S3 client (and the interpreter's exit, which waits for it) busy for minutes.
_PROBE = r"""
import sys
import pyarrow.fs as pafs
fs, path = pafs.FileSystem.from_uri(sys.argv[1])
bucket = path.split("/", 1)[0]
try:
    if bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        fs.get_file_info(pafs.FileSelector(bucket, allow_not_found=False))  # raises: why
except Exception as e:
    print((str(e).strip().splitlines() or [type(e).__name__])[0][:300])
    sys.exit(1)
"""


def probe(loc: Location, key: str = "storage_path", timeout: float = PROBE_TIMEOUT_S) -> None:
    """Checks that an object store answers, and that its bucket exists, within `timeout` s
    (in a child process, killed at the timeout). Local locations are not probed here.

    Raises:
      StorageError: one line naming `key` (unreachable, refused, no such bucket, ...).
    """
    if not loc.remote:
        return
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, loc.uri], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise StorageError(
            f"{key}: {loc.uri} did not answer within {timeout:g} s (endpoint unreachable?)"
        ) from None
    if out.returncode == 0:
        return
    first = (out.stdout.strip() or out.stderr.strip() or "no answer").splitlines()[-1]
    if "NO_SUCH_BUCKET" in first or "does not exist" in first:
        bucket = loc.path.split("/", 1)[0]
        raise StorageError(
            f"{key}: bucket {bucket!r} of {loc.uri} does not exist (create it first)"
        )
    raise StorageError(f"{key}: cannot use {loc.uri} ({first})")


def local_copy_dir(uri: str, root: Path) -> Path:
    """The driver's local copy of a remote experiment: <root>/<scheme>/<bucket>/<path>
    (query options dropped; a short hash of the full URI keeps two endpoints apart)."""
    parts = urlsplit(str(uri))
    tag = hashlib.sha1(str(uri).encode()).hexdigest()[:8]
    rel = [p for p in (parts.netloc + parts.path).split("/") if p and p not in (".", "..")]
    return Path(root, f"{parts.scheme}-{tag}", *rel)
