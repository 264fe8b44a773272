"""lm-evaluation-harness interop (`pip install 'debias[harness]'`): the vendored suites as harness tasks.

`task_dir()` holds one task YAML per suite and bias axis (`debias_crows_gender`, `debias_crows_religion`,
`debias_stereoset_gender`, `debias_stereoset_religion`; tags `debias_suites`, `debias_<axis>`). They read the
package's own JSON files (`debias/data/benchmarks/`) through the functions below, so they run offline::

    lm_eval --model hf --model_args pretrained=EXPORT --tasks debias_crows_gender,debias_stereoset_gender \\
        --include_path "$(python -c 'import debias.harness as h; print(h.task_dir())')"

CrowS-Pairs is scored by the harness's own `crows_pairs` metric function (`likelihood_diff`, `pct_stereotype`);
StereoSet, which the harness does not ship, by `stereoset_results`. Both rank summed log-probabilities, where
`debias eval` ranks mean log-probabilities per token: docs/guide.md ("lm-evaluation-harness") compares them.
An inference-time edit runs through the harness's `steered` model with the file `debias.edits.steer_file` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).resolve().parent / "data" / "harness"
SUITES = ("crows", "stereoset")
INSTALL = "pip install 'debias[harness]'"


def task_dir() -> Path:
    """The directory of debias's harness task YAMLs (lm_eval's `--include_path`)."""
    return TASK_DIR


def task_names(domain: str = "gender", suites: tuple[str, ...] | list[str] = SUITES) -> list[str]:
    """The harness task names of `suites` (`crows`, `stereoset`) on bias axis `domain`; a one-line error for an
    axis without a vendored suite."""
    from debias.evaluation.suites import shipped_domains

    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"harness suites must be among {list(SUITES)}, got {list(suites)}")
    if domain not in shipped_domains("crows_pairs"):
        raise ValueError(f"no harness task for bias axis {domain!r}: the suites are vendored for "
                         f"{list(shipped_domains('crows_pairs'))} only")
    return [f"debias_{suite}_{domain}" for suite in suites]


def require_lm_eval() -> Any:
    """The `lm_eval` module, or an ImportError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(f"lm-evaluation-harness is not installed: {INSTALL}") from None
    return lm_eval


def command(pretrained: str | Path, domain: str = "gender", steer_path: str | Path | None = None) -> list[str]:
    """The `lm_eval` command line for an export (`--model hf`), or for `pretrained` under a steer file
    (`--model steered`)."""
    args = f"pretrained={pretrained}" + (f",steer_path={steer_path}" if steer_path else "")
    return ["lm_eval", "--model", "steered" if steer_path else "hf", "--model_args", args, "--tasks",
            ",".join(task_names(domain)), "--include_path", str(task_dir())]


def evaluate(pretrained: str | Path, domain: str = "gender", suites: tuple[str, ...] | list[str] = SUITES,
             steer_path: str | Path | None = None, limit: int | None = None, batch_size: int = 16,
             device: str = "cpu", dtype: str = "float32", bootstrap_iters: int = 1000) -> dict[str, dict]:
    """Run the harness on `pretrained` (a model directory; under `steer_path`'s edit with the `steered` model):
    {task: {metric: value, metric + "_stderr": ...}} for `task_names(domain, suites)`. `limit`: the first items
    only."""
    names = task_names(domain, suites)
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    model_args: dict[str, Any] = {"pretrained": str(pretrained), "dtype": dtype}
    if steer_path is not None:
        model_args["steer_path"] = str(steer_path)
    out = lm_eval.simple_evaluate(model="steered" if steer_path is not None else "hf", model_args=model_args,
                                  tasks=names, limit=limit, batch_size=batch_size, device=device,
                                  task_manager=TaskManager(include_path=str(task_dir()), include_defaults=False),
                                  log_samples=False, bootstrap_iters=bootstrap_iters)
    return {task: {key.split(",")[0]: value for key, value in metrics.items() if key.endswith(",none")}
            for task, metrics in out["results"].items()}


# The functions the task YAMLs name (`!function debias.harness.…`).

def crows_pairs_dataset(domain: str = "gender", **_: Any):
    """CrowS-Pairs' `domain` pairs as a `datasets.DatasetDict` with one `test` split of {"context": "",
    "choices": [stereo sentence, anti sentence]} (the harness passes its metadata as keyword arguments)."""
    from datasets import Dataset, DatasetDict

    from debias.evaluation.suites import load_crows_pairs

    rows = [{"context": "", "choices": [it["sentence"].replace("[MASK]", it[key]) for key in ("stereo", "anti")]}
            for it in load_crows_pairs(domain=domain)]
    return DatasetDict({"test": Dataset.from_list(rows)})


def stereoset_dataset(domain: str = "gender", **_: Any):
    """StereoSet's `domain` items as a `datasets.DatasetDict` (`test`) of {"context", "choices": [stereotype,
    anti-stereotype, unrelated], "type", "target"}: an intrasentence item's choices are the full sentences after no
    context; an intersentence item's are " " + candidate after its context (ended with "." when it lacks .!?), as
    `debias.evaluation.suites` builds them."""
    from datasets import Dataset, DatasetDict

    from debias.evaluation.suites import OPTIONS, _end_sentence, load_stereoset

    rows = []
    for it in load_stereoset(domain=domain):
        inter = it["type"] == "intersentence"
        rows.append({"context": _end_sentence(it["context"]) if inter else "", "type": it["type"],
                     "target": it["target"], "choices": [(" " if inter else "") + it[key] for key in OPTIONS]})
    return DatasetDict({"test": Dataset.from_list(rows)})


def stereoset_results(doc: dict, results: list) -> dict[str, float]:
    """One StereoSet item's metrics from the harness's log-likelihoods of [stereotype, anti-stereotype, unrelated]:
    ss = 1 when stereotype > anti-stereotype, lms = (stereotype > unrelated + anti-stereotype > unrelated) / 2
    (StereoSet's per-item counts; a tie counts 0, as in its evaluation code)."""
    (stereo, _), (anti, _), (unrelated, _) = results
    return {"ss": float(stereo > anti), "lms": (float(stereo > unrelated) + float(anti > unrelated)) / 2}
