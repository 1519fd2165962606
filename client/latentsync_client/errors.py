"""What can go wrong for a client, each with the exit code the CLI reports it with."""


class ClientError(Exception):
    """Base class: a one-line message for the user and a process exit code."""

    exit_code = 1


class InputError(ClientError):
    """Bad arguments, or an input file that is missing, unreadable or unsupported."""

    exit_code = 2


class ServerUnreachable(ClientError):
    """No Triton server answers at the URL, or the connection was lost mid-stream."""

    exit_code = 3


class ServerError(ClientError):
    """The server answered with an error (its text is the message) or broke the streaming contract."""

    exit_code = 4


class NoFaceError(ServerError):
    """No frame of the video had a face the server could sync."""


class Interrupted(ClientError):
    """Stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)."""

    exit_code = 130
