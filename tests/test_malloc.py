"""mmcli.cpu.tune_malloc: the command line keeps freed activation buffers for reuse
instead of taking fresh, kernel-zeroed pages for every batch (glibc's mallopt)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")

FAULTS = """
import resource, sys
import numpy as np
{setup}
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # a batch's 40 MB activation, allocated, written and freed
        a = np.ones(40 << 20, np.uint8)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
faults()
print(tuned, faults())
"""


def run(setup: str, **env: str) -> tuple[str, int]:
    code = FAULTS.format(setup=setup)
    environ = {k: v for k, v in os.environ.items() if k != "MMCLI_MALLOC"} | env
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=environ, check=True)  # fmt: skip
    tuned, faults = r.stdout.split()[-2:]  # (after what the code itself prints)
    return tuned, int(faults)


def test_tuned_malloc_reuses_freed_buffers_without_page_faults():
    tune = "from mmcli.cpu import tune_malloc; tuned = tune_malloc()"
    tuned, fast = run(tune)
    opted_out, slow = run(tune, MMCLI_MALLOC="system")
    assert (tuned, opted_out) == ("True", "False")
    assert slow > 20 * 10  # fresh pages every time (fewer faults where they are huge pages)
    assert fast < slow / 20
    # glibc's own settings are the user's: left as they are
    assert run(tune, GLIBC_TUNABLES="glibc.malloc.check=0")[0] == "False"


def test_the_command_line_runs_tuned():
    """mmcli's entry point tunes before any command (and --version) runs."""
    main = (
        "sys.argv = ['mmcli', '--version']\n"
        "from mmcli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "from mmcli.cpu import tune_malloc\ntuned = tune_malloc()"
    )
    tuned, faults = run(main)
    _, untuned = run("tuned = False")
    assert tuned == "True" and faults < untuned / 20
