"""glibc keeps freed memory for chatforge commands: repeated multi-megabyte blocks stop page-faulting."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# the LM loss of a small model's training step (chunks of logits, fp32 softmax blocks: 4-16 MB each)
PROBE = """
import resource, torch
from chatforge.malloc import keep_freed_memory
from chatforge.train.loss import chunked_lm_loss
print(keep_freed_memory())
hidden = torch.randn(8, 128, 128, requires_grad=True)
weight = torch.randn(8192, 128, requires_grad=True)
labels = torch.randint(0, 8192, (8, 128))

def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_lm_loss(hidden, weight, labels).backward()

for _ in range(3):  # the heap grows to its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")} | env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    applied, tuned = _probe()
    assert applied == "True"
    # any MALLOC_* variable means the user chose: glibc's defaults stay
    left_alone, default = _probe(MALLOC_ARENA_MAX="8")
    assert left_alone == "False"
    assert tuned * 4 < default, (tuned, default)
