"""Exceptions raised by mpimig. Every message names what is wrong: the item,
the rank, the epoch or the path."""


class MpimigError(Exception):
    """Base class of every error mpimig raises on purpose."""


class StateError(MpimigError):
    """Registered state that cannot be stored or restored (names the item)."""


class CheckpointError(MpimigError):
    """A checkpoint could not be written or committed (names rank, epoch, path)."""


class NoCommittedEpoch(CheckpointError):
    """A restart was asked for but the checkpoint directory has no committed epoch."""


class CorruptCheckpoint(CheckpointError):
    """A dataset's checksum does not match, or a file is unreadable."""


class CommError(MpimigError):
    """Misuse of the logical communicator (bad rank, reserved tag, unsupported call)."""


class MigrationError(MpimigError):
    """A migration request was refused (unknown rank or host, busy, finished job)."""


class LaunchError(MpimigError):
    """The job could not be started or did not complete."""


class UsageError(MpimigError):
    """Wrong command-line arguments; the command line prints a usage message."""


class SignatureError(CorruptCheckpoint):
    """State (a pickled blob, a manifest) whose HMAC tag does not verify under the
    job secret: it is never unpickled (names the file, blob and rank)."""


class SecretError(MpimigError):
    """The job secret cannot be read or created, or its file is not private (names the file)."""
