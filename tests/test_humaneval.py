"""HumanEval offline and its sandbox, for real: every check is a real child process, nothing is mocked."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from chatforge.eval.humaneval import STOP, check, cut_at_stop, evaluate, load_problems, pass_at_1, pass_at_1_stderr
from chatforge.eval.sandbox import execute, run_program

BUILTIN = Path(__file__).resolve().parent.parent / "chatforge" / "eval" / "builtin"


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


def marker() -> Path:
    return Path("/tmp") / f"chatforge-sandbox-test-{uuid.uuid4().hex}"


def test_problems_load_offline_in_order(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(set(p) == {"task_id", "prompt", "test", "entry_point", "canonical_solution"} for p in problems)
    assert [p["task_id"] for p in load_problems(limit=2)] == ["HumanEval/0", "HumanEval/1"]
    assert load_problems(limit=0) == []


def test_stop_sequences_match_lm_eval():
    import yaml
    from lm_eval import tasks as lm_eval_tasks

    spec = Path(lm_eval_tasks.__file__).parent / "humaneval" / "humaneval.yaml"
    until = yaml.load(spec.read_text(), Loader=yaml.BaseLoader)["generation_kwargs"]["until"]  # no !function
    assert STOP == until
    assert cut_at_stop("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert cut_at_stop("    return 1\n") == "    return 1\n"


def test_canonical_solutions_pass(problems):
    sample = problems[:5] + problems[5::16]  # the first few, and a spread over the rest
    results = evaluate(sample, [p["canonical_solution"] for p in sample], timeout=10, workers=2)
    assert results == [(True, "passed")] * len(sample), [p["task_id"] for p, r in zip(sample, results) if not r[0]]
    assert check(problems[0], problems[0]["canonical_solution"]) == (True, "passed")


def test_wrong_completion_fails_with_the_assertion(problems):
    passed, reason = check(problems[2], "    return 0.0\n")  # truncate_number: the decimal part
    assert not passed
    assert reason.startswith("failed: AssertionError")


def test_syntax_error_is_reported(problems):
    passed, reason = check(problems[0], "    return (\n")
    assert not passed and reason.startswith("syntax error")


def test_infinite_loop_times_out():
    start = time.monotonic()
    passed, reason = run_program("while True:\n    pass\n", timeout=2)
    assert (passed, reason) == (False, "timed out")
    assert time.monotonic() - start < 2 + 3


def test_timeout_kills_a_program_that_ignores_sigterm():
    program = ("import signal, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "print('ignoring', flush=True)\nwhile True:\n    pass\n")
    start = time.monotonic()
    result = execute(program, timeout=2)
    assert (result.passed, result.reason, result.returncode) == (False, "timed out", None)
    assert "ignoring" in result.stdout  # it did run, and ignored SIGTERM
    assert time.monotonic() - start < 2 + 3


@pytest.mark.parametrize("attempt", [
    "import os\nos.system('touch {m}')",
    "import posix\nposix.system('touch {m}')",
    "import subprocess\nsubprocess.run(['touch', '{m}'])",
    "import os\nos.popen('touch {m}').read()",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{m}'], {{}})",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{m}'])",
])
def test_starting_programs_is_blocked(attempt):
    m = marker()
    try:
        passed, reason = run_program(attempt.format(m=m), timeout=10)
        assert not passed and reason.startswith("failed:"), reason
        assert not m.exists()
    finally:
        m.unlink(missing_ok=True)


def test_deleting_files_is_blocked(tmp_path):
    victim = tmp_path / "victim"
    (victim / "inner").mkdir(parents=True)
    (victim / "file").write_text("keep me")
    for attempt in (f"import shutil\nshutil.rmtree({str(victim)!r})", f"import os\nos.remove({str(victim / 'file')!r})",
                    f"import os\nos.unlink({str(victim / 'file')!r})"):
        passed, reason = run_program(attempt, timeout=10)
        assert not passed and reason.startswith("failed: TypeError"), reason
    assert (victim / "file").read_text() == "keep me" and (victim / "inner").is_dir()


def test_fork_is_blocked():
    passed, reason = run_program("import os\npid = os.fork()\n", timeout=10)
    assert not passed and reason.startswith("failed: TypeError")
    passed, reason = run_program("import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n",
                                 timeout=10)
    assert not passed and reason.startswith("failed:")


def test_memory_bomb_is_stopped():
    passed, reason = run_program("x = bytearray(4 * 1024**3)\n", timeout=10, memory_mb=512)
    assert (passed, reason) == (False, "killed: memory")
    passed, reason = run_program("x = bytearray(64 * 1024**2)\n", timeout=10, memory_mb=512)
    assert passed, reason  # a modest allocation under the limit is fine
    assert bytearray(1024)  # and this process is unharmed


def test_network_is_disabled():
    # a real listener in this process: a sandboxed program must not reach even localhost
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass
    try:
        for attempt in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                        "import socket\nsocket.getaddrinfo('localhost', 80)",
                        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)"):
            passed, reason = run_program(attempt, timeout=10)
            assert not passed and "network is disabled in the sandbox" in reason, reason
        waiter = threading.Thread(target=accept)
        waiter.start()
        waiter.join()
        assert accepted == []
    finally:
        server.close()


def test_child_environment_is_minimal_and_cwd_is_removed():
    program = ("import os, sys\nassert set(os.environ) <= {'PATH', 'LC_CTYPE', 'OMP_NUM_THREADS'}, dict(os.environ)\n"
               "assert os.environ['PATH'] == '/usr/bin:/bin'\n"
               "assert not any('site-packages' in p for p in sys.path), sys.path\n"
               "assert sys.flags.isolated and sys.flags.no_site\n"
               "open('scratch.txt', 'w').write('x')\nprint(os.readlink('/proc/self/cwd'))\n")  # getcwd is removed
    result = execute(program, timeout=10)
    assert result.passed, (result.reason, result.stderr)
    cwd = Path(result.stdout.strip())
    assert cwd.name == "work" and cwd.parent.name.startswith("chatforge-sandbox-")
    assert not cwd.parent.exists()  # the whole temporary folder is gone, scratch file and all


def test_output_is_bounded():
    result = execute("import sys\nfor i in range(100000):\n    print('line', i)\nprint('end')\n", timeout=10)
    assert result.passed, result.reason
    assert len(result.stdout) <= 4096 and result.stdout.endswith("end\n")
    result = execute("while True:\n    print('x' * 4096)\n", timeout=10)  # stopped by the file size limit
    assert not result.passed and len(result.stdout) <= 4096


def test_exits_and_exceptions_are_failures():
    assert run_program("import sys\nsys.exit(0)\n") == (False, "failed: SystemExit(0)")
    assert run_program("import os\nos._exit(0)\n")[0] is False
    assert run_program("raise KeyboardInterrupt\n") == (False, "failed: KeyboardInterrupt")
    assert run_program("def f(): return f()\nf()\n")[1].startswith("failed: RecursionError")
    assert run_program("s = '\\ud800'\nt = '\ud800'\n") == (True, "passed")  # a lone surrogate is not our crash


def test_pass_at_1_and_stderr():
    assert pass_at_1([True, False, True, True]) == 0.75
    assert pass_at_1_stderr([True, False, True, True]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert pass_at_1_stderr([True, False] * 50) == pytest.approx(math.sqrt(0.25 / 99))
    assert math.isnan(pass_at_1_stderr([True]))
    with pytest.raises(ValueError):
        pass_at_1([])
    with pytest.raises(ValueError):
        evaluate([{}], [])


# --- the built-in suite's data files ---------------------------------------------------------------------------

def read_jsonl(name: str) -> list[dict]:
    lines = (BUILTIN / name).read_text(encoding="utf-8").splitlines()
    assert lines and all(line.strip() for line in lines), f"{name}: empty or blank lines"
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name,least", [("mc_en.jsonl", 35), ("mc_zh.jsonl", 25)])
def test_builtin_multiple_choice_files(name, least):
    records = read_jsonl(name)
    assert len(records) >= least
    for r in records:
        assert set(r) == {"context", "choices", "gold"}, r
        assert isinstance(r["context"], str) and r["context"].strip()
        assert isinstance(r["choices"], list) and 3 <= len(r["choices"]) <= 4, r
        assert all(isinstance(c, str) and c.strip() for c in r["choices"]), r
        assert len(set(r["choices"])) == len(r["choices"]), r
        assert type(r["gold"]) is int and 0 <= r["gold"] < len(r["choices"]), r
        if name == "mc_en.jsonl":  # choices continue the context: a space after a word or a colon
            assert all(c.startswith(" ") and not c.startswith("  ") for c in r["choices"]), r
        else:
            assert r["context"].startswith("问题：") and r["context"].endswith("\n答案："), r
            assert all(not c.startswith(" ") for c in r["choices"]), r
    contexts = [r["context"] for r in records]
    assert len(set(contexts)) == len(contexts), "duplicate contexts"
    assert len({r["gold"] for r in records}) > 1, "the correct choice is not always in the same place"


def test_builtin_generation_file():
    import re

    records = read_jsonl("gen_en.jsonl")
    assert len(records) >= 25
    for r in records:
        assert set(r) <= {"prompt", "answer", "regex"} and {"prompt", "answer"} <= set(r), r
        assert isinstance(r["prompt"], str) and r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:"), r
        assert isinstance(r["answer"], str) and r["answer"].strip() == r["answer"] != "", r
        if "regex" in r:
            found = re.search(r["regex"], f" {r['answer']}.")  # the regex extracts the answer from a plain reply
            assert found is not None and found.group(1) == r["answer"], r
    prompts = [r["prompt"] for r in records]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"


def test_builtin_files_load_as_local_tasks():
    tasks = pytest.importorskip("chatforge.eval.tasks")
    loaded = {t.name: t for t in tasks.builtin_tasks()}
    assert {"builtin_mc_en", "builtin_mc_zh", "builtin_gen_en"} <= set(loaded)
    assert loaded["builtin_gen_en"].kind == "generate_until" and loaded["builtin_mc_zh"].kind == "multiple_choice"


def test_no_stray_children_are_left():
    # each check kills its process group; nothing of ours should remain once they return
    before = set(os.listdir("/proc")) if os.path.isdir("/proc") else set()
    run_program("import time\ntime.sleep(30)\n", timeout=1)
    if before:
        mine = [p for p in os.listdir("/proc") if p.isdigit() and p not in before and _parent(p) == os.getpid()]
        assert mine == []


def _parent(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
