"""Exception types that callers (CLI, UI) catch and show as plain messages.

Every error carries a message that says what went wrong and what to do about it.
"""

from __future__ import annotations


class CXRError(Exception):
    """Base class of the errors this library raises on purpose."""


class ConfigError(CXRError, ValueError):
    """A configuration value is invalid; the message lists the valid choices."""


class DatasetError(CXRError, ValueError):
    """The dataset folder cannot be used (missing, empty class, too few images...)."""


class InvalidImageError(CXRError, ValueError):
    """An input image cannot be read or is not acceptable (format, size, frames...)."""


class CheckpointError(CXRError, RuntimeError):
    """A checkpoint is missing, corrupt, of another format, or incompatible."""


class WeightsUnavailableError(CXRError, RuntimeError):
    """Pretrained weights could not be obtained (typically: no internet)."""


# ---- first run: dataset download and in-app training jobs ----


class DownloadError(CXRError, RuntimeError):
    """The dataset could not be downloaded (no network, credentials or consent needed...)."""


class JobError(CXRError, RuntimeError):
    """A background training job cannot be started, resumed or cancelled."""


class JobRunningError(JobError):
    """Another training job is running: only one at a time."""


class TrainingDisabledError(JobError):
    """In-app training is turned off on this deployment (``CXR_ALLOW_TRAINING=0``)."""


class ManifestChangedError(DatasetError):
    """A run's ``manifest.csv`` is not the one its checkpoint was trained on."""
