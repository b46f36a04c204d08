"""Run the verbs tests (``-m rdma``) inside the SoftRoCE VM: what CI calls.

    python -m fusee.emulator.softroce.run_tests [--bench] [pytest arguments...]

The guest runs this interpreter's pytest on tests/test_conformance.py (its verbs backend) and
tests/test_rdma.py with FUSEE_RDMA_REQUIRED=1,
so a VM whose device failed to come up fails the run instead of skipping every test. With
``--bench`` the same boot then measures verbs latencies on rxe
(fusee.emulator.softroce.verbs_latency).
Exit status: pytest's (or the benchmark's, if the tests passed); 125 if the VM gave no result.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from fusee.emulator.softroce import vm

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    bench = "--bench" in args
    if bench:
        args.remove("--bench")
    py = shlex.quote(sys.executable)
    script = (f"{py} -m pytest -m rdma -p no:cacheprovider --color=no -rs "
              f"tests/test_conformance.py tests/test_rdma.py "
              f"{shlex.join(args)}")
    if bench:
        script = f"{script} && {py} -m fusee.emulator.softroce.verbs_latency"
    try:
        rc = vm.run(["sh", "-c", script], cwd=str(ROOT), env={"FUSEE_RDMA_REQUIRED": "1"})
    except vm.HarnessError as e:
        vm.log(f"error: {e}")
        return vm.NO_RESULT
    vm.log(f"verbs tests in the VM: exit status {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
