"""Evaluate exports on a probe: held-out sets written apart from the project's lists, for evaluation only.

    python scripts/probe.py runs/seeds/gap30/seed0/export runs/seeds/gap30/seed1/export --out runs/probe/gap30

A probe file (`debias/data/probes/gender.yaml`; its README says who wrote it and how) holds the held-out side of a
bias spec: gap contexts and templates, attribute phrases, statement templates and subjects, cue templates and
relatives, factual statements, and the swap rows and domains they add. It replaces the spec's held-out split (train
and validation stay the spec's), so the loader's checks refuse a probe item that is also in train or validation.
Each export is then scored by `debias eval` on that split, before and after (no suites: they are reported by the fit
itself). OUT/spec.yaml is the merged spec, OUT/<name>.json each evaluation, OUT/summary.{json,md} mean ± sd.

Like CrowS-Pairs and StereoSet, a probe is never trained on and never used to choose anything: run it once, on the
exports a choice made on the validation split already fixed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from seeds import summarise, table  # noqa: E402  (the same mean ± sd table as a seed sweep)

#: probe key -> where its list goes in the spec (held-out side).
PLACES = {
    "professions": ("contexts", "{group}", "heldout"),
    "gap_templates": ("templates", "heldout"),
    "attributes": ("attributes", "{group}", "heldout"),
    "statement_templates": ("statements", "templates", "heldout"),
    "subjects": ("statements", "subjects", "heldout"),
    "cue_templates": ("cues", "templates", "heldout"),
    "cue_relatives": ("cues", "relatives", "{group}", "heldout"),
    "factual": ("factual", "heldout"),
}


def merge_probe(spec: dict, probe: dict) -> dict:
    """`spec` with its held-out lists replaced by `probe`'s, and the probe's swap rows and domains added."""
    unknown = sorted(set(probe) - {*PLACES, "extra_swaps", "extra_domains"})
    if unknown:
        raise ValueError(f"probe key {unknown[0]!r} is not one of {sorted({*PLACES, 'extra_swaps', 'extra_domains'})}")
    merged = json.loads(json.dumps(spec))  # a deep copy of plain YAML values
    merged["swaps"] = [*merged["swaps"], *probe.get("extra_swaps", [])]
    if probe.get("extra_domains"):
        merged["domains"] = {**merged.get("domains", {}), **probe["extra_domains"]}
    for key, place in PLACES.items():
        if key not in probe:
            continue
        per_group = "{group}" in place
        for group in (merged["groups"] if per_group else [None]):
            target = merged
            path = [group if part == "{group}" else part for part in place]
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = probe[key][group] if per_group else probe[key]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--probe", type=Path, default=ROOT / "debias" / "data" / "probes" / "gender.yaml")
    parser.add_argument("--spec", default="gender", help="the bias spec whose held-out split the probe replaces")
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    from debias.bias_spec import bias_spec_path, load_bias_spec

    missing = [str(e) for e in args.exports if not (e / "debias" / "report.json").is_file()]
    if missing:
        parser.error(f"not a debias export (no debias/report.json): {missing[0]}")
    merged = merge_probe(yaml.safe_load(bias_spec_path(args.spec).read_text()), yaml.safe_load(args.probe.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.out / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    load_bias_spec(spec_path)  # the loader's checks: no probe item in train or validation, known domains, ...
    from debias.evaluation.heldout import outcome

    per_export = {}
    for export in args.exports:
        name = "-".join(export.parts[-3:-1]) if export.name == "export" else export.name
        result = args.out / f"{name}.json"
        if not result.is_file():
            command = [sys.executable, "-m", "debias", "eval", str(export), "--fit_config", args.config,
                       "--suites", "false", "--out", str(result),
                       "--overrides", json.dumps([f"--data.bias={spec_path}", "--evaluate.completions=0"])]
            if subprocess.call(command) != 0:
                print(f"probe: {export} failed; the finished ones are summarised", file=sys.stderr)
                break
        scored = json.loads(result.read_text())
        numbers = dict(outcome(scored["before"], scored["after"]))
        numbers["kl"] = scored["after"]["kl"]
        numbers["lm_loss_change"] = scored["after"]["lm_loss"] - scored["before"]["lm_loss"]
        per_export[name] = numbers
    summary = summarise(per_export)
    (args.out / "summary.json").write_text(json.dumps({"probe": str(args.probe), "exports": per_export,
                                                      "summary": summary}, indent=2))
    text = table(summary, f"probe {args.probe.name} on the held-out side ({', '.join(per_export)})")
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0 if len(per_export) == len(args.exports) else 1


if __name__ == "__main__":
    sys.exit(main())
