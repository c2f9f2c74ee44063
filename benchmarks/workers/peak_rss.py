"""Run a Python script as ``__main__`` and write this process's peak resident memory (``VmHWM``, MiB)
to a JSON file when it exits. Usage: python peak_rss.py OUT.json SCRIPT.py [script args]"""

import atexit
import json
import runpy
import sys


def _peak_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


out, script, *args = sys.argv[1:]
atexit.register(lambda: open(out, "w").write(json.dumps({"peak_rss_mib": _peak_mib()})))
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
