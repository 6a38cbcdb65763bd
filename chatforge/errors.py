"""One exception type for problems the user can fix (the CLI prints it as a single line), and keeping the
libraries' multi-line messages out of that line."""

from contextlib import contextmanager


class ChatforgeError(Exception):
    """Bad input or configuration: reported as `chatforge: error: <message>` with exit code 2."""


def one_line(err: BaseException | str) -> str:
    """The first non-blank line of an error's text (libraries' messages run to paragraphs), else its type."""
    text = str(err)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if line or isinstance(err, str):
        return line
    return type(err).__name__


@contextmanager
def transformers_quiet():
    """transformers' warnings off for a while (errors still show): for loads whose problems chatforge reports
    itself in one line (its load reports and model-type notes run to paragraphs)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def check_hub_reachable(what: str, hint: str) -> None:
    """One line at once when the Hub's host does not resolve (no network) and HF_HUB_OFFLINE is unset:
    huggingface_hub would retry for ~25 s, logging every try, before the same failure."""
    import os
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1" or not host or getproxies():
        return  # offline on purpose, or a proxy resolves names this machine cannot
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ChatforgeError(f"{what}: cannot reach {host} (no network?); {hint}") from None
