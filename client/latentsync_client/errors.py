"""What can go wrong for a client, each with the exit code the CLI reports it with (client/README.md)."""

import errno

# OS errors that mean "the disk cannot take the output", wherever they come from (encoder, spill file).
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


class ClientError(Exception):
    """Base class: a one-line message for the user and a process exit code (1: anything unforeseen, a bug)."""

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


class StreamExpired(ServerError):
    """The server dropped the stream because no request reached it within its idle timeout."""


class ServerBusy(ServerError):
    """The server refused to start the stream: too many streams open or finishing there; retry in a few seconds."""


class OutputError(ClientError):
    """The output (or a temporary file) could not be written: disk full, quota, file too large, I/O error."""

    exit_code = 5


class Interrupted(ClientError):
    """Stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)."""

    exit_code = 130
