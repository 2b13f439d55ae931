"""The job secret, HMAC-SHA256 tags, and the modes of the files mpimig writes.

Every pickled (or dill) blob that mpimig writes to a checkpoint, sends in a
migration or keeps as an in-memory buddy copy carries an HMAC-SHA256 tag under
the job's secret; a blob whose tag does not verify is never unpickled
(docs/security.md). This module owns the secret and the tags; the codec
(:mod:`.format`), the writer, the reader and the migration transport use it.

Where the secret comes from (the first that applies, :func:`job_key`):

1. ``MPIMIG_SECRET_FILE``: a file holding the secret. ``mpimig run`` creates
   ``JOB_DIR/secret`` (mode 0600) and sets this variable for every rank,
   spawned target and spare; the secret itself never appears on a command line
   or in the environment.
2. ``MPIMIG_SECRET``: the secret itself (at least 16 characters), for setups
   that cannot share a file.
3. Plain ``mpiexec python app.py``: ``MPIMIG_JOB_DIR/secret``, else
   ``MPIMIG_CKPT_DIR/secret``, created on first use by whichever process gets
   there first (atomically: every process reads the same secret). A store
   opened on a directory ``D`` from outside a job (tests, ``mpimig inspect``)
   uses ``D/secret``, or ``D/../secret`` (the job directory's) if only that
   exists.
4. None of these: no secret. Tags are then computed with an empty key, which
   detects damage but proves nothing about who wrote the bytes; a checkpoint
   store always has a secret (:func:`key_for_directory` creates
   ``DIR/secret``).

A secret file must be a regular file owned by the user running mpimig with no
permission bits for group or others, else :class:`~mpimig.errors.SecretError`:
someone else who can write the directory could otherwise replace it.

File modes: checkpoint files are created 0600 and directories 0700, i.e. with
the umask ``MPIMIG_UMASK`` (octal, default ``077``) applied to 0666/0777,
whatever the process umask is.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

from ..errors import SecretError, SignatureError, UsageError

__all__ = ["SECRET_FILE_ENV", "SECRET_ENV", "UMASK_ENV", "SECRET_NAME", "ALGORITHM", "TAG_BYTES", "Key",
           "job_key", "key_for_directory", "read_secret_file", "create_secret_file", "tag", "tag_hex",
           "check_tag", "sign_blob", "open_blob", "key_id", "file_mode", "dir_mode", "make_dir", "open_private",
           "FILE_DIGEST", "META_DIGEST", "DIGESTS", "EXTENTS", "file_digest", "is_file_digest",
           "entry_digest", "check_extents"]

SECRET_FILE_ENV = "MPIMIG_SECRET_FILE"
SECRET_ENV = "MPIMIG_SECRET"
UMASK_ENV = "MPIMIG_UMASK"
#: Name of the secret file in a job (or checkpoint) directory.
SECRET_NAME = "secret"
ALGORITHM = "hmac-sha256"
TAG_BYTES = 32
#: A signed blob in a message or buddy copy: MAGIC, the 32-byte tag, the payload.
BLOB_MAGIC = b"MSIG"
#: The whole-file digest of every data file, kept in the (signed) manifest and checked before
#: the file is opened (docs/checkpoint-format.md, section 5; docs/security.md).
FILE_DIGEST = "sha256"
#: The other kind (docs/checkpoint-format.md, 8.2): the SHA-256 of a data file's bytes outside the raw
#: data of its big contiguous datasets (listed, with their offsets, under :data:`EXTENTS` in the
#: manifest entry), then of the file's size; those datasets' bytes are covered by their signed
#: CRC-32s instead, which a reader then always checks. libhdf5 interprets only the bytes the digest
#: covers (its metadata; a dataset's raw data is copied, never parsed), so a file that matches
#: is as safe to open as one whose whole-file digest matched, and the writer hashes kilobytes, not
#: the state (the file-server migration writes these).
META_DIGEST = "sha256-meta"
DIGESTS = (FILE_DIGEST, META_DIGEST)
EXTENTS = "data_extents"
MIN_SECRET = 16

Buffer = Union[bytes, bytearray, memoryview]


@dataclasses.dataclass(frozen=True)
class Key:
    """A job secret: the key bytes and where they came from (for messages)."""
    secret: bytes
    source: str

    @property
    def present(self) -> bool:
        """False for the empty key used when there is no secret (integrity only)."""
        return bool(self.secret)

    def __repr__(self) -> str:        # never print the secret
        return f"Key(source={self.source!r})"


NO_SECRET = Key(b"", "no secret")


# ------------------------------------------------------------------- file modes
def _umask(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get(UMASK_ENV, "") or "077"
    try:
        value = int(raw, 8)
    except ValueError:
        raise UsageError(f"{UMASK_ENV}={raw!r}: expected an octal umask such as 077 or 027") from None
    if not 0 <= value <= 0o777:
        raise UsageError(f"{UMASK_ENV}={raw!r}: expected an octal umask between 000 and 777")
    return value


def file_mode() -> int:
    """Mode of the checkpoint files mpimig creates (0600 by default)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of the directories mpimig creates (0700 by default)."""
    return 0o777 & ~_umask()


def make_dir(path: Path, parents: bool = False) -> None:
    """mkdir with :func:`dir_mode` (exact, whatever the process umask); an
    existing directory keeps its mode (it is someone's choice)."""
    if path.is_dir():
        return
    if parents and not path.parent.is_dir():
        make_dir(path.parent, parents=True)
    try:
        path.mkdir(mode=dir_mode())
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, dir_mode())


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """os.open with :func:`file_mode` applied exactly (fchmod after the umask)."""
    fd = os.open(path, flags, file_mode())
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------- secret
def read_secret_file(path: str | os.PathLike[str]) -> Key:
    """The secret in ``path``; refuses a file that is not a private regular file of ours."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise SecretError(f"cannot read the job secret {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"job secret {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SecretError(f"job secret {path} belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.geteuid()}): refusing it (someone else may have put it there)")
        if st.st_mode & 0o077:
            raise SecretError(f"job secret {path} has mode {stat.S_IMODE(st.st_mode):04o}: group and others "
                              "must have no access (chmod 600 it)")
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(data) < MIN_SECRET:
        raise SecretError(f"job secret {path} holds {len(data)} bytes; at least {MIN_SECRET} are needed")
    return Key(data, str(path))


def create_secret_file(path: str | os.PathLike[str]) -> Key:
    """Create ``path`` (mode 0600) with a fresh random secret, unless it exists;
    returns the secret in it. Safe when many processes do it at once: the file
    appears complete under its name (a hard link of a written temporary file),
    and every process reads the one that won."""
    path = Path(path)
    if not path.exists():
        make_dir(path.parent, parents=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass                                # another process won: use its secret
        except OSError as exc:
            raise SecretError(f"cannot create the job secret {path}: {exc.strerror or exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
    return read_secret_file(path)


_cache: dict[tuple, Key] = {}


def env_key(env: Mapping[str, str] | None = None) -> Key | None:
    """The secret given by the environment (MPIMIG_SECRET_FILE, MPIMIG_SECRET), or None."""
    env = os.environ if env is None else env
    sfile, sval = env.get(SECRET_FILE_ENV), env.get(SECRET_ENV)
    if sfile:
        cached = _cache.get(("file", sfile))
        if cached is None:
            cached = _cache[("file", sfile)] = read_secret_file(sfile)
        return cached
    if sval:
        if len(sval) < MIN_SECRET:
            raise SecretError(f"{SECRET_ENV} holds {len(sval)} characters; at least {MIN_SECRET} are needed")
        return Key(sval.encode(), SECRET_ENV)
    return None


def job_key(env: Mapping[str, str] | None = None) -> Key:
    """The job's secret (module docstring: environment, then the job or
    checkpoint directory's ``secret``), or the empty key if there is none."""
    env = os.environ if env is None else env
    key = env_key(env)
    if key is not None:
        return key
    if env.get("MPIMIG_JOB_DIR"):
        return _dir_secret(Path(env["MPIMIG_JOB_DIR"]) / SECRET_NAME, create=True)
    if env.get("MPIMIG_CKPT_DIR"):
        return key_for_directory(Path(env["MPIMIG_CKPT_DIR"]), create=True)
    return NO_SECRET


def key_for_directory(directory: Path, create: bool = True) -> Key:
    """The secret for a checkpoint store in ``directory``: the environment's if
    it gives one (a file, the secret, or ``MPIMIG_JOB_DIR/secret``), else
    ``directory/secret`` or, if only that exists, the job directory's
    ``directory/../secret`` (a job's ``ckpt`` read from outside the job); else
    ``directory/secret`` is created (when ``create``)."""
    key = env_key()
    if key is not None:
        return key
    if os.environ.get("MPIMIG_JOB_DIR"):
        return _dir_secret(Path(os.environ["MPIMIG_JOB_DIR"]) / SECRET_NAME, create=create)
    own, above = Path(directory) / SECRET_NAME, Path(directory).parent / SECRET_NAME
    if not own.exists() and above.exists():
        return _dir_secret(above, create=False)
    return _dir_secret(own, create=create)


def _dir_secret(path: Path, create: bool) -> Key:
    cached = _cache.get(("dir", str(path)))
    if cached is not None:
        return cached
    key = create_secret_file(path) if create else read_secret_file(path)
    _cache[("dir", str(path))] = key
    return key


# ------------------------------------------------------------------------ tags
def tag(key: Key, *buffers: Buffer) -> bytes:
    """HMAC-SHA256 of the buffers' bytes, in order, under ``key``."""
    mac = hmac.new(key.secret, digestmod=hashlib.sha256)
    for b in buffers:
        mac.update(b)
    return mac.digest()


def tag_hex(key: Key, *buffers: Buffer) -> str:
    return tag(key, *buffers).hex()


def check_tag(key: Key, want: str | bytes | None, where: str, *buffers: Buffer) -> None:
    """Raise SignatureError naming ``where`` unless ``want`` is the tag of the buffers."""
    if want is None or want == "":
        raise SignatureError(f"{where}: no HMAC tag: unsigned state is never unpickled")
    if isinstance(want, str):
        try:
            want = bytes.fromhex(want)
        except ValueError:
            raise SignatureError(f"{where}: malformed HMAC tag {want[:80]!r}") from None
    if not isinstance(want, (bytes, bytearray)):
        # a tag read from a damaged manifest can be any JSON value (found by tests/fuzz:
        # true made hmac.compare_digest raise TypeError)
        raise SignatureError(f"{where}: malformed HMAC tag {want!r:.80}")
    if not hmac.compare_digest(want, tag(key, *buffers)):
        raise SignatureError(f"{where}: HMAC tag does not verify under the job secret ({key.source}): "
                             "the bytes were changed or written with another secret; not unpickled")


def sign_blob(key: Key, payload: Buffer) -> bytes:
    """A payload framed for a message or buddy copy: magic, tag, payload."""
    return BLOB_MAGIC + tag(key, payload) + bytes(payload)


def open_blob(key: Key, data: Buffer, where: str) -> memoryview:
    """The payload of a :func:`sign_blob` frame once its tag verifies; else SignatureError."""
    view = memoryview(data).cast("B")
    head = len(BLOB_MAGIC)
    if len(view) < head + TAG_BYTES or view[:head] != BLOB_MAGIC:
        raise SignatureError(f"{where}: not a signed blob (no {BLOB_MAGIC!r} frame): never unpickled")
    payload = view[head + TAG_BYTES:]
    check_tag(key, bytes(view[head:head + TAG_BYTES]), where, payload)
    return payload


def key_id(key: Key) -> str:
    """A short public name of a secret (HMAC of a constant): tells two secrets
    apart in messages without revealing either."""
    return hmac.new(key.secret, b"mpimig key id", hashlib.sha256).hexdigest()[:16]


# ---------------------------------------------------------------- file digests
def file_digest(path: str | os.PathLike[str], skip: Sequence[Sequence[int]] | None = None) -> str:
    """SHA-256 (hex) of a whole file, read in blocks (hashing releases the GIL); with ``skip``
    (``[offset, nbytes]`` extents, sorted, not overlapping: :func:`check_extents`), the
    :data:`META_DIGEST` kind: the bytes outside those extents in file order, then the file's
    size as 8 bytes little-endian (a truncated file never matches); ValueError if the file ends
    before the last extent does.

    A data file's digest goes into the epoch's manifest, whose HMAC tag signs it,
    and is checked before HDF5 opens the file: a damaged file is refused with a
    message naming it instead of reaching libhdf5 (which can crash on damaged
    metadata). Symbolic links are not followed."""
    h = hashlib.new(FILE_DIGEST)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if skip is None:
            while True:
                n = fh.readinto(buf)
                if not n:
                    return h.hexdigest()
                h.update(view[:n])
        size = os.fstat(fd).st_size
        if skip and int(skip[-1][0]) + int(skip[-1][1]) > size:
            raise ValueError(f"{path} ends at byte {size}, inside the data it should hold (bytes "
                             f"{int(skip[-1][0])}..{int(skip[-1][0]) + int(skip[-1][1])}): it was cut")
        pos = 0
        for off, nbytes in [*skip, (size, 0)]:
            end = min(int(off), size)
            while pos < end:
                n = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
                if not n:
                    break
                h.update(view[:n])
                pos += n
            pos = max(pos, int(off) + int(nbytes))
        h.update(size.to_bytes(8, "little"))
        return h.hexdigest()


def check_extents(value: object) -> list[tuple[int, int]] | None:
    """``value`` as a list of ``(offset, nbytes)`` if it is a well-formed :data:`EXTENTS` list
    (pairs of non-negative integers, sorted by offset, not overlapping), else None."""
    if not isinstance(value, list):
        return None
    out: list[tuple[int, int]] = []
    end = 0
    for x in value:
        if not (isinstance(x, (list, tuple)) and len(x) == 2
                and all(type(v) is int and v >= 0 for v in x) and x[0] >= end):
            return None
        out.append((x[0], x[1]))
        end = x[0] + x[1]
    return out


def entry_digest(entry: Mapping[str, object]) -> tuple[str, str, list[tuple[int, int]] | None] | None:
    """The digest a manifest entry holds: (kind, hex digest, extents or None for the whole file);
    None if it holds none (an epoch written before digests). Malformed values are returned as they
    are for the caller to refuse (:func:`is_file_digest`, :func:`check_extents`)."""
    for kind in DIGESTS:
        if entry.get(kind) is not None:
            ext = check_extents(entry.get(EXTENTS)) if kind == META_DIGEST else None
            return kind, str(entry[kind]), ext
    return None


def is_file_digest(value: object) -> bool:
    """Whether ``value`` has the shape of a :func:`file_digest` (64 lowercase hex digits)."""
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))
