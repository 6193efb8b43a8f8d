"""The driver's two failures and their exit codes."""


class PortError(Exception):
    """A failure the CLI reports in one line with ``exit_code``."""

    exit_code = 1


class UsageError(PortError):
    """Bad usage or bad input (a missing target, a dirty tree, a malformed series): exit code 2."""

    exit_code = 2


class StepFailed(PortError):
    """A step failed to apply or failed its checks; the target was restored: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, reports: list | None = None):
        super().__init__(message)
        self.reports = reports or []
