"""One exception type for problems the user can fix; the CLI prints it as a single line."""


class ChatforgeError(Exception):
    """Bad input or configuration: reported as `chatforge: error: <message>` with exit code 2."""
