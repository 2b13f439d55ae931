"""mpimig: live migration and fault tolerance for mpi4py programs."""
from ._version import __version__
from .errors import (MpimigError, StateError, CheckpointError, NoCommittedEpoch,
                     CorruptCheckpoint, CommError, MigrationError, LaunchError)

import logging as _logging
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
