"""Runs the legacy sweep with the code on PYTHONPATH and interrupts it (SIGINT, as Ctrl-C)
once its second trial has reported an epoch, so the experiment is left unfinished."""

import glob
import os
import signal
import subprocess
import sys
import time

env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR="/tmp/rl")
os.makedirs("/tmp/rl", exist_ok=True)
p = subprocess.Popen(
    [sys.executable, "-m", "dcmtune.sweep", "legacy.yaml", "--storage-path", "results", "-q"],
    env=env,
)
t0 = time.time()
while p.poll() is None and time.time() - t0 < 600:
    hist = sorted(glob.glob("results/legacy/trial_*/history.csv"))
    if len(hist) >= 2 and any(len(open(h).read().splitlines()) >= 2 for h in hist[1:]):
        p.send_signal(signal.SIGINT)
        break
    time.sleep(0.05)
print("exit", p.wait(timeout=300))
