"""`EvaluationArgs`: what `debias fit` evaluates before and after training beside the held-out metrics (YAML:
`evaluate:`); `ReportAndExport` runs it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvaluationArgs:
    """What `debias fit` evaluates before and after training, beside the held-out metrics (YAML: `evaluate:`; the CLI
    hands these to `ReportAndExport`)."""

    suites: bool = False
    """Also score CrowS-Pairs and StereoSet (the bias's domain: gender, religion) before and after (about a minute on
    SmolLM2, CPU)."""
    completions: int = 4
    """Held-out prompts greedily completed (32 tokens) before and after, for the report (0: none)."""
