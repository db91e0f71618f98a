"""The one exception type users see: a one-line message naming the file / field / argument."""


class MistralNNXError(Exception):
    """An error the user caused (bad input, missing file, invalid argument).

    The CLI prints its message on one line and exits non-zero without a traceback.
    """
