"""Errors a user can fix. The CLI prints their message alone, without a traceback."""

from __future__ import annotations


class MixlabError(Exception):
    """A problem with the user's input (data, config, checkpoint); the message says what to change."""


class ConfigError(MixlabError):
    """A config file or override is invalid."""


class DataError(MixlabError):
    """Input text, a data dir or a shard is missing, empty, corrupt or of another format version."""


class CheckpointError(MixlabError):
    """A checkpoint is missing, corrupt, or belongs to another config, data dir or version."""


class Stopped(MixlabError):
    """A run stopped by a signal (SIGTERM, SIGINT, SIGUSR1, SIGHUP) after writing a checkpoint.
    The CLI exits with ``exit_code`` (128 + the signal's number, as a shell reports it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
