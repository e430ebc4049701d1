"""Hostile model: forge what the worker reports. Writes a COMPLETE outcome that
claims AppArmor confinement, sends progress with extra fields, a thousand
parameters and labels of a megabyte, a forged ``confined`` message and a
checkpoint outside ``results/``, and reports the environment and the limits
it runs with (``HOSTILE-REPORT`` on its stdout). Then it exits at once.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import announce, save  # noqa: E402

limits = {}
with open("/proc/self/limits") as f:
    for line in f.readlines()[1:]:
        name, soft = line[:26].strip(), line[26:47].strip()
        limits[name] = soft
report = {"script": "forge", "environ": dict(os.environ), "cwd": os.getcwd(), "limits": limits,
          "finished": True}
save(report)
parameters = {"p%04d" % n: float(n) for n in range(1000)}
parameters["x" * (1 << 20)] = 1.0
forged = {"step": 7, "chisq": 0.5, "parameters": parameters, "elapsed": 1.5,
          "confinement": "apparmor(reflworkerd-fit)", "status": "COMPLETE", "html": "<script>"}
announce({"type": "confined", "confinement": "apparmor(reflworkerd-fit)+seccomp+uid 60001"})
announce({"type": "checkpoint", "path": "/etc/shadow"})
deadline = time.monotonic() + 3.0
while time.monotonic() < deadline:      # past the heartbeats' rate limit, once or twice
    announce({"type": "progress", "progress": forged})
    time.sleep(0.2)
with open(".outcome.json", "w") as f:
    json.dump({"status": "COMPLETE", "result": {"chisq": 0.0001, "forged": True}, "error": None,
               "trace": None, "confinement": "apparmor(reflworkerd-fit)+seccomp+uid 60001"}, f)
sys.stdout.flush()
os._exit(0)
