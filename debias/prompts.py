"""Every text source and its templating: the bias prompts of a spec (`debias.bias_spec`) or of a prompt directory
(profession x template gap prompts, explicit-cue prompts), and the texts of `package:`, `.txt`, `.jsonl` and `hf:`
sources. The metrics computed on them live in `debias.evaluation.bias_metrics`; the shipped files are in
`debias/data/prompts/` and `debias/data/biases/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from debias.bias_spec import SPLITS as SPEC_SPLITS
from debias.bias_spec import BiasSpec, load_bias_spec

SPLITS = ("train", "heldout")  # the splits of a prompt directory; a bias spec also has "validation"
GENDERS = ("female", "male")


def default_prompt_dir() -> Path:
    """The prompt files shipped with the package."""
    return Path(__file__).resolve().parent / "data" / "prompts"


def prompt_path(name: str, prompt_dir: str | Path | None = None) -> Path:
    """Path of prompt file `name` in `prompt_dir` (default: the shipped files); errors name the missing path."""
    directory = Path(prompt_dir) if prompt_dir is not None else default_prompt_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"prompt directory not found: {directory}")
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return path


def read_prompt_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt file, stripped; lines starting with `#` are comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"prompt file is empty (only blank lines or comments): {path}")
    return lines


def _split_lines(stem: str, split: str, prompt_dir: str | Path | None) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r} for a prompt directory; expected one of {SPLITS} "
                         f"(a bias spec, bias=..., also has {SPEC_SPLITS[1]!r})")
    return read_prompt_lines(prompt_path(f"{stem}_{split}.txt", prompt_dir))


def article(word: str) -> str:
    """'a' or 'an' for `word` (vowel-letter rule with the common exceptions)."""
    w = word.lower()
    if w.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if w.startswith(("uni", "use", "usu", "uti", "eu", "one", "once")):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def fill(template: str, profession: str, relative: str | None = None) -> str:
    """Expand `{profession}`, `{a_profession}`, `{A_profession}` (or their aliases `{context}`, `{a_context}`,
    `{A_context}`: a stereotyped context need not be a profession) and `{relative}` in a template."""
    a = f"{article(profession)} {profession}"
    forms = {"profession": profession, "a_profession": a, "A_profession": a[0].upper() + a[1:]}
    try:
        return template.format(**forms, **{k.replace("profession", "context"): v for k, v in forms.items()},
                               relative=relative if relative is not None else "{relative}")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"bad placeholder in prompt template {template!r}: {err}") from err


@dataclass(frozen=True)
class GapPrompts:
    """Profession prompts of one split: `female` / `male` texts (professions x templates, profession-major)
    with the profession of each prompt in `female_labels` / `male_labels`. From a bias spec, `female` holds the
    first of `groups` and `male` the second (the names are gender's; the gap is first minus second)."""

    female: list[str]
    male: list[str]
    female_labels: list[str]
    male_labels: list[str]
    female_professions: list[str]
    male_professions: list[str]
    templates: list[str]
    groups: tuple[str, str] = GENDERS

    @property
    def prompts(self) -> list[str]:
        """All prompts, female first: [n_female + n_male]."""
        return self.female + self.male

    @property
    def is_female(self) -> torch.Tensor:
        """Bool [n_female + n_male], aligned with `prompts`."""
        return torch.tensor([True] * len(self.female) + [False] * len(self.male))


def _spec_pair(split: str, prompt_dir: str | Path | None, bias: str | Path | BiasSpec,
               groups: tuple[str, str] | None) -> tuple[BiasSpec | None, tuple[str, str]]:
    """The spec to read (None: the prompt directory's files) and the two groups to compare."""
    if prompt_dir is not None:
        if not (isinstance(bias, str) and bias == "gender") or groups not in (None, GENDERS):
            raise ValueError(f"prompt_dir={str(prompt_dir)!r} holds gender prompt files; pass either prompt_dir or "
                             f"bias={bias!r} / groups={groups!r}, not both")
        return None, GENDERS
    spec = load_bias_spec(bias)
    if split not in SPEC_SPLITS:
        raise ValueError(f"unknown split {split!r} of bias spec {spec.path}; expected one of {SPEC_SPLITS}")
    pair = groups if groups is not None else (spec.groups[0], spec.groups[1])
    if len(pair) != 2 or len(set(pair)) != 2 or not set(pair) <= set(spec.groups):
        raise ValueError(f"groups must be two different groups of bias {spec.name!r} {list(spec.groups)}, got {pair}")
    return spec, (pair[0], pair[1])


def _contexts(spec: BiasSpec | None, pair: tuple[str, str], split: str, prompt_dir: str | Path | None):
    if spec is None:
        return _split_lines("templates", split, prompt_dir), {g: _split_lines(f"professions_{g}", split, prompt_dir)
                                                              for g in GENDERS}
    return list(spec.templates[split]), {g: list(spec.contexts[g][split]) for g in pair}


def load_gap_prompts(split: str = "train", prompt_dir: str | Path | None = None,
                     bias: str | Path | BiasSpec = "gender", groups: tuple[str, str] | None = None) -> GapPrompts:
    """Stereotyped contexts x templates of `split`, from the bias spec `bias` (a shipped name, a YAML path or a
    spec; splits "train", "validation", "heldout") comparing `groups` (default: its first two), or from the
    gender prompt files in `prompt_dir` when given (splits "train", "heldout"). For gender both give the same
    prompts."""
    spec, pair = _spec_pair(split, prompt_dir, bias, groups)
    templates, profs = _contexts(spec, pair, split, prompt_dir)
    texts = {g: [fill(t, p) for p in profs[g] for t in templates] for g in pair}
    labels = {g: [p for p in profs[g] for _ in templates] for g in pair}
    first, second = pair
    return GapPrompts(texts[first], texts[second], labels[first], labels[second], profs[first], profs[second],
                      templates, pair)


def write_bias_prompts(split: str, out: str | Path, prompt_dir: str | Path | None = None) -> Path:
    """Write the SAE-feature bias prompts of `split` (its professions x templates) to `out`, one per line."""
    gap = load_gap_prompts(split, prompt_dir)
    header = f"# Bias prompts, {split.upper()} split: professions_*_{split}.txt x templates_{split}.txt (generated).\n"
    Path(out).write_text(header + "\n".join(gap.prompts) + "\n", encoding="utf-8")
    return Path(out)


@dataclass(frozen=True)
class CuePrompts:
    """Explicit-cue prompts: `cued[i]` is "female"/"male" (the relative's gender); `pro[i]` is True when the
    profession's stereotype agrees with the cue ("My sister, a nurse") and False when it does not."""

    prompts: list[str]
    cued: list[str]
    pro: list[bool]
    groups: tuple[str, str] = GENDERS

    @property
    def cued_female(self) -> torch.Tensor:
        """Bool [n]: the cue names the first of `groups`."""
        return torch.tensor([c == self.groups[0] for c in self.cued])


def _relatives(spec: BiasSpec | None, pair: tuple[str, str], split: str,
               prompt_dir: str | Path | None) -> list[tuple[str, str]]:
    if spec is not None:
        return [(relative, g) for g in pair for relative in spec.cue_relatives[g][split]]
    relatives = []
    for line in _split_lines("cue_relatives", split, prompt_dir):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or parts[1].lower() not in GENDERS:
            path = prompt_path(f"cue_relatives_{split}.txt", prompt_dir)
            raise ValueError(f"{path}: expected '<relative><TAB>female|male', got {line!r}")
        relatives.append((parts[0], parts[1].lower()))
    return relatives


def load_cue_prompts(split: str = "train", prompt_dir: str | Path | None = None, limit: int | None = None,
                     seed: int = 0, bias: str | Path | BiasSpec = "gender",
                     groups: tuple[str, str] | None = None) -> CuePrompts:
    """Relatives x cue templates x contexts (both groups' stereotyped lists) of `split`, from the bias spec or
    the prompt directory as in `load_gap_prompts`; `limit` keeps a seeded random subset with equal shares of the
    four (cued group, pro/anti) cells (the full gender set is ~1,000 prompts)."""
    spec, pair = _spec_pair(split, prompt_dir, bias, groups)
    relatives = _relatives(spec, pair, split, prompt_dir)
    templates = _split_lines("cue_templates", split, prompt_dir) if spec is None else list(spec.cue_templates[split])
    profs = _contexts(spec, pair, split, prompt_dir)[1]
    prompts, cued, pro = [], [], []
    for relative, gender in relatives:
        for template in templates:
            for prof_gender in pair:
                for prof in profs[prof_gender]:
                    prompts.append(fill(template, prof, relative))
                    cued.append(gender)
                    pro.append(gender == prof_gender)
    if limit is not None:
        if limit < 4:
            raise ValueError(f"limit must be >= 4 (one prompt per cue gender x pro/anti cell), got {limit}")
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        cells = [[i for i in order if (cued[i], pro[i]) == cell] for cell in sorted(set(zip(cued, pro, strict=True)))]
        keep = sorted(i for k, cell in enumerate(cells) for i in cell[: (limit + k) // len(cells)])
        prompts, cued, pro = [prompts[i] for i in keep], [cued[i] for i in keep], [pro[i] for i in keep]
    return CuePrompts(prompts, cued, pro, pair)


PROMPT_DIR = default_prompt_dir()


def resolve_source(source: str) -> Path:
    """The file a `package:` or path source names; raises if it does not exist."""
    path = PROMPT_DIR / source.removeprefix("package:") if source.startswith("package:") else Path(source)
    if not path.is_file():
        shipped = sorted(p.name for p in PROMPT_DIR.glob("*.txt"))
        raise FileNotFoundError(f"prompt file {source!r} not found (looked at {path}); shipped files: {shipped}")
    return path


def read_texts(source: str, limit: int | None = None) -> list[str]:
    """The texts of a source (see the module docstring), the first `limit` if given; raises if it is missing or
    empty, or a JSONL line is not a JSON object with a `text` field (naming the file and line)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if source.startswith("hf:"):
        texts = _read_hf(source)
    else:
        path = resolve_source(source)
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            texts = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if not texts:
        raise ValueError(f"prompt source {source!r} holds no texts")
    return texts[:limit]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno}); "
                             "each line must be an object such as {\"text\": \"...\"}") from err
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            got = f"keys {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise ValueError(f"{path}:{n}: JSONL rows need a string 'text' field, got {got}")
        texts.append(row["text"])
    return texts


def _read_hf(source: str) -> list[str]:
    from datasets import load_dataset

    parts = source.removeprefix("hf:").split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"expected hf:DATASET[:CONFIG]:SPLIT:FIELD, got {source!r}")
    name, config, split, field = parts if len(parts) == 4 else (parts[0], None, parts[1], parts[2])
    rows = load_dataset(name, config, split=split)
    if field not in rows.column_names:
        raise ValueError(f"{source!r}: no field {field!r}; the dataset has {rows.column_names}")
    return [t for t in rows[field] if t and t.strip()]


def heldout_completion_prompts(prompt_dir: str | Path | None = None, n: int = 4) -> list[str]:
    """`n` held-out profession prompts: the first n//2 female-stereotyped professions, then the first n - n//2
    male-stereotyped ones, the i-th profession of a gender in held-out template i (cycling); deterministic."""
    from debias.prompts import load_gap_prompts

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gap = load_gap_prompts("heldout", prompt_dir)
    n_t = len(gap.templates)
    picks = []
    for texts, professions, count in ((gap.female, gap.female_professions, n // 2),
                                      (gap.male, gap.male_professions, n - n // 2)):
        if count > len(professions):
            raise ValueError(f"asked for {count} professions of a gender, the held-out list has {len(professions)}")
        picks += [texts[i * n_t + i % n_t] for i in range(count)]  # texts are profession-major
    return picks


def default_prompts() -> list[str]:
    """Four held-out profession prompts and two held-out explicit-cue prompts (one female, one male cue)."""
    from debias.prompts import load_cue_prompts

    cues = load_cue_prompts("heldout", limit=4)
    first = {g: next(p for p, c in zip(cues.prompts, cues.cued, strict=True) if c == g) for g in ("female", "male")}
    return heldout_completion_prompts(n=4) + [first["female"], first["male"]]
