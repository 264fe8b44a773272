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


def compare(pretrained: str | Path, domain: str = "gender", limit: int | None = None, batch_size: int = 16,
            device: str = "cpu", dtype: str = "float32") -> dict[str, dict[str, float]]:
    """debias's suite numbers beside the harness's on the same items (the first `limit`), in percent, with one
    column between them that separates convention from implementation: debias's own scorer ranking *summed*
    log-probabilities with strict wins, as the harness does (on CrowS-Pairs it must equal the harness's
    `pct_stereotype`; on StereoSet the intersentence items differ by the start token, docs/guide.md)."""
    import json
    import tempfile

    from debias.evaluation import suites
    from debias.models.load import load_model

    theirs = evaluate(pretrained, domain, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      bootstrap_iters=0)
    loaded = load_model(str(pretrained), dtype=dtype, device=device)
    model, tok = loaded.model, loaded.tokenizer
    crows_items = suites.load_crows_pairs(domain=domain)[:limit]
    set_items = suites.load_stereoset(domain=domain)[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        for name, items in (("crows.json", crows_items), ("stereoset.json", set_items)):
            (Path(tmp) / name).write_text(json.dumps(items))
        crows = suites.crows_pairs(model, tok, Path(tmp) / "crows.json", batch_size, progress=False)
        stereo = suites.stereoset(model, tok, Path(tmp) / "stereoset.json", batch_size, progress=False)
        by_item = suites.stereoset(model, tok, Path(tmp) / "stereoset.json", batch_size, progress=False,
                                   by_target=False)
    pairs = crows_pairs_dataset(domain)["test"].select(range(len(crows_items)))["choices"]
    sums = suites.sentence_logprobs(model, tok, [c for pair in pairs for c in pair], batch_size).double().view(-1, 2)
    docs = stereoset_dataset(domain)["test"].select(range(len(set_items)))
    texts = [c for choices in docs["choices"] for c in choices]
    contexts = [ctx for ctx in docs["context"] for _ in range(3)]
    scores = suites.sentence_logprobs(model, tok, texts, batch_size, contexts).double().view(-1, 3)
    crows_h, set_h = theirs[f"debias_crows_{domain}"], theirs[f"debias_stereoset_{domain}"]
    wins = lambda a, b: float((a > b).double().mean())  # noqa: E731 - strict, as the harness counts
    return {
        "crows_pairs": {"debias stereo_pct (mean log-prob per token, tie 1/2)": crows["stereo_pct"],
                        "debias stereo_pct, summed log-probs, strict": 100 * wins(sums[:, 0], sums[:, 1]),
                        "harness pct_stereotype": 100 * crows_h["pct_stereotype"],
                        "debias margin (nats per token)": crows["margin"],
                        "debias mean |summed difference| (nats)": float((sums[:, 0] - sums[:, 1]).abs().mean()),
                        "harness likelihood_diff (nats)": crows_h["likelihood_diff"], "items": len(crows_items)},
        "stereoset": {"debias ss (per target, official)": stereo["ss"], "debias ss (per item)": by_item["ss"],
                      "debias ss, summed log-probs, strict, per item": 100 * wins(scores[:, 0], scores[:, 1]),
                      "harness ss": 100 * set_h["ss"], "debias lms (per target, official)": stereo["lms"],
                      "debias lms (per item)": by_item["lms"],
                      "debias lms, summed log-probs, strict, per item": 50 * (wins(scores[:, 0], scores[:, 2])
                                                                               + wins(scores[:, 1], scores[:, 2])),
                      "harness lms": 100 * set_h["lms"], "items": len(set_items)},
    }


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


if __name__ == "__main__":  # python -m debias.harness EXPORT [AXIS [LIMIT]]: `compare` as a table
    import sys

    if not 2 <= len(sys.argv) <= 4:
        raise SystemExit("usage: python -m debias.harness EXPORT [AXIS [LIMIT]]")
    rows = compare(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gender",
                   int(sys.argv[3]) if len(sys.argv) > 3 else None)
    for suite, numbers in rows.items():
        for name, value in numbers.items():
            print(f"{suite:12} {name:55} " + (f"{value:10.4f}" if isinstance(value, float) else f"{value:10}"))
