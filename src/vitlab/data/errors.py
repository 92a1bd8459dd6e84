"""The error a user fixes on disk (missing, corrupt or misplaced data); the message says how."""


class DataError(RuntimeError):
    """A problem with the data on disk that the user can fix; the message says how."""
