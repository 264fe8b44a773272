"""`debias fit` with DDP on 2 CPU processes (gloo): same mask on every rank, same (all-reduced) delta, one export."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

DUMP = textwrap.dedent('''
    import json, os
    from pathlib import Path
    from lightning.pytorch import Callback

    class DumpRank(Callback):
        """Writes what each rank holds at the end of fit to $DEBIAS_TEST_DUMP/rank<N>.json."""

        def on_fit_end(self, trainer, module):
            out = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
                   "strategy": type(trainer.strategy).__name__, "mask": module.mask.indices.tolist(),
                   "delta": module.delta.values.detach().tolist(), "baseline": module.feature_baseline.tolist(),
                   "cache": module.fastpath.stats if module.fastpath else None}
            Path(os.environ["DEBIAS_TEST_DUMP"], f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
''')


def test_fit_ddp_two_cpu_processes(tmp_path):
    (tmp_path / "dumpcb.py").write_text(DUMP)
    dump = tmp_path / "dump"
    dump.mkdir()
    export = tmp_path / "export"
    env = {**os.environ, "DEBIAS_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(tmp_path), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "debias", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
           "--trainer.max_steps=6", "--trainer.val_check_interval=6", "--trainer.enable_checkpointing=false",
           f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.callbacks+=dumpcb.DumpRank",
           "--data.max_texts=32", f"--export.export_dir={export}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["world_size"] for r in ranks} == {2} and {r["strategy"] for r in ranks} == {"DDPStrategy"}
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert ranks[0]["mask"] == ranks[1]["mask"], "the ranks trained different masks"
    assert ranks[0]["baseline"] == ranks[1]["baseline"]
    # gradients are all-reduced: both ranks took the same optimizer steps from different data shards
    assert ranks[0]["delta"] == ranks[1]["delta"] and any(v != 0 for v in ranks[0]["delta"])
    assert ranks[0]["cache"]["upstream_hits"] > 0  # the fast path runs under DDP too
    # only rank 0 exported, and what it exported is the trained delta
    assert done.stdout.count("exported to") == 1, done.stdout[-2000:]
    saved = load_file(str(export / "debias" / "delta.safetensors"))
    torch.testing.assert_close(saved["values"], torch.tensor(ranks[0]["delta"]))
