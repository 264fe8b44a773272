"""The CLI's console shows what the run says: Lightning's tips and accelerator lines and the dependencies'
deprecation notices are dropped there (`debias.commands.fit.quiet_console`), while a log handler still gets them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import logging, sys, warnings

from debias.commands.fit import quiet_console

quiet_console()
quiet_console()  # idempotent: one filter per handler
log = logging.FileHandler(sys.argv[1], encoding="utf-8")
for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).addHandler(log)

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

Trainer(accelerator="cpu", devices=1, logger=CSVLogger(sys.argv[2]), default_root_dir=sys.argv[2],
        enable_model_summary=False)  # says "GPU available: False, ..." and tips about litlogger / litmodels
rank_zero_info("💡 Tip: For seamless cloud uploads, try installing something")
rank_zero_info("a line about the run")
for module in ("transformers.modeling_utils", "lightning.pytorch.trainer", "__main__"):
    warnings.warn_explicit(f"`old_api` is deprecated (raised in {module})", FutureWarning, "x.py", 1, module=module)
warnings.warn("a warning about the user's own run")
print("filters", [len(h.filters) for h in logging.getLogger("lightning.pytorch").handlers if h is not log])
"""


def test_console_drops_lightning_noise_and_dependency_deprecations_but_the_log_keeps_them(tmp_path):
    log = tmp_path / "run.log"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(tmp_path)], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "a line about the run" in console and "a warning about the user's own run" in console
    assert "GPU available" not in console and "TPU available" not in console and "💡" not in console, console
    assert "raised in __main__" in console  # the user's own deprecations stay
    assert "raised in transformers" not in console and "raised in lightning" not in console, console
    assert "filters [1]" in console  # Lightning's console handler, filtered once
    logged = log.read_text(encoding="utf-8")
    assert "GPU available: False" in logged and "💡 Tip: For seamless cloud uploads" in logged
    assert "a line about the run" in logged
