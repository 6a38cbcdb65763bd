"""Reward functions for `chatforge rl`, in TRL's signature: `fn(prompts, completions, **columns) -> [float]`.

Each task record brings `answer`, `regex` (may be empty) and `test` (may be empty) as columns:
- exact: the answer extracted from the completion's first line (the record's regex: its first group, else
  the whole match; without one, the line) equals `answer`, ignoring case, surrounding spaces and full
  stops, the rule `chatforge eval` scores generation tasks by;
- format: the completion is one line that the record's regex matches whole (without a regex: one
  non-empty line): the answer alone, as asked;
- math: `math-verify` decides whether the completion's answer equals `answer` (`pip install math-verify`);
- code: the completion followed by the record's `test` (Python asserts) runs in `chatforge eval`'s
  sandbox (a separate, limited process) and passes;
- PATH.py:FUNCTION: the user's own, loaded from the file they name (and from nowhere else).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import re
import threading
from pathlib import Path

from chatforge.errors import ChatforgeError, one_line

BUILTIN = ("exact", "format", "math", "code")
REWARD_SECONDS = 300  # one call of a user's reward, for a batch of completions


def _text(completion) -> str:
    """A completion as text: TRL hands conversational ones as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)


def _rows(completions, *columns):
    """(text, value, ...) per completion: TRL passes each task column as one value per completion; a column
    the task lacks is None throughout."""
    n = len(completions)
    return zip(map(_text, completions), *(list(c) if c is not None else [None] * n for c in columns), strict=True)


def exact_reward(prompts, completions, answer=None, regex=None, **_) -> list[float]:
    from chatforge.eval.tasks import extract_answer, normalize_answer

    out = []
    for text, want, rx in _rows(completions, answer, regex):
        first = text.split("\n", 1)[0]  # what chatforge eval reads: generation stops at a newline
        got = extract_answer(first, rx) if rx else first
        out.append(float(want is not None and normalize_answer(got) == normalize_answer(str(want))))
    return out


def format_reward(prompts, completions, regex=None, **_) -> list[float]:
    out = []
    for text, rx in _rows(completions, regex):
        line = text.strip()
        one_line = bool(line) and "\n" not in line
        out.append(float(one_line and (not rx or re.fullmatch(rx, line) is not None)))
    return out


def math_reward(prompts, completions, answer=None, **_) -> list[float]:
    from math_verify import parse, verify

    out = []
    for text, want in _rows(completions, answer):
        try:
            out.append(float(want is not None and verify(parse(str(want)), parse(text))))
        except Exception:  # an unparsable completion earns nothing; it must not stop the run
            out.append(0.0)
    return out


def code_reward(prompts, completions, test=None, **_) -> list[float]:
    from chatforge.eval.sandbox import run_program

    return [float(run_program(f"{text}\n\n{tests}\n", timeout=5.0)[0]) for text, tests in _rows(completions, test)]


@functools.cache  # checked when the options are, used again by the run: the file is imported once
def load_user_reward(spec: str):
    """`PATH.py:FUNCTION` -> the function, imported from that file only."""
    path, _, name = spec.rpartition(":")
    if not path or not name or not path.endswith(".py"):
        raise ChatforgeError(f"--reward {spec}: a reward is one of {', '.join(BUILTIN)} or PATH.py:FUNCTION")
    if not Path(path).is_file():
        raise ChatforgeError(f"--reward {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"chatforge_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # a sys.exit() in the file would end the run without a word
        why = f"{type(err).__name__}: {one_line(str(err))}"
        raise ChatforgeError(f"--reward {spec}: {path} failed to import ({why})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ChatforgeError(f"--reward {spec}: {path} has no function {name!r}")
    try:
        takes_columns = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        takes_columns = False
    if not takes_columns:  # TRL passes the task's columns (answer, regex, test, ...) as keywords
        raise ChatforgeError(f"--reward {spec}: the function must take (prompts, completions, **kwargs)")
    return checked(fn, spec)


def checked(fn, spec: str):
    """`fn` whose failures are one clear line naming it: an exception (sys.exit included), a wrong number of
    rewards, a value that is not a finite number (None, TRL's "no reward for this one", passes), no answer
    within REWARD_SECONDS."""
    import numbers

    @functools.wraps(fn)  # TRL logs each reward under its function's name
    def reward(prompts, completions, **kwargs):
        outcome: dict = {}

        def call():
            try:
                outcome["values"] = fn(prompts, completions, **kwargs)
            except (Exception, SystemExit) as err:  # sys.exit() included: the run must not end without a word
                outcome["error"] = err

        # on a thread of its own, so that a reward that never returns is an error, not a run that hangs forever
        worker = threading.Thread(target=call, name=f"reward {spec}", daemon=True)
        worker.start()
        worker.join(REWARD_SECONDS)
        if worker.is_alive():
            raise ChatforgeError(f"--reward {spec}: no answer within {REWARD_SECONDS} s for {len(completions)} "
                                 "completions (does it loop?)")
        if "error" in outcome:
            err = outcome["error"]
            raise ChatforgeError(f"--reward {spec}: raised {type(err).__name__}: {one_line(str(err))}")
        values = outcome["values"]
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ChatforgeError(f"--reward {spec}: returned {got} for {len(completions)} completions")
        bad = next((v for v in values if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                                             or not math.isfinite(v))), None)
        if bad is not None:
            raise ChatforgeError(f"--reward {spec}: returned {bad!r:.40}, not a finite number")
        return [None if v is None else float(v) for v in values]

    return reward


def reward_functions(specs: list[str]) -> list:
    """The reward functions named by --reward, checked: unknown names, missing packages, user files."""
    if not specs:
        raise ChatforgeError("--reward: name at least one reward")
    funcs = []
    for spec in specs:
        if spec == "math" and importlib.util.find_spec("math_verify") is None:
            raise ChatforgeError("--reward math needs math-verify: pip install math-verify")
        builtin = {"exact": exact_reward, "format": format_reward, "math": math_reward, "code": code_reward}
        funcs.append(builtin[spec] if spec in builtin else load_user_reward(spec))
    return funcs
