"""Every text source and its templating: the bias prompts of a spec (`debias.bias_spec`) or of a prompt directory
(profession x template gap prompts, explicit-cue prompts), and the texts of `package:`, `.txt`, `.jsonl` and `hf:`
sources. The metrics computed on them live in `debias.evaluation.bias_metrics`; the shipped files are in
`debias/data/prompts/` and `debias/data/biases/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from debias.bias_spec import SPLITS as SPEC_SPLITS
from debias.bias_spec import BiasSpec, load_bias_spec

SPLITS = ("train", "heldout")  # the splits of a prompt directory; a bias spec also has "validation"
GENDERS = ("female", "male")
GENDER_TARGETS = (" she", " he")  # the gender spec's targets: those of the prompt directory's files


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
    """Stereotyped-context prompts of one split, per group in `groups` order: `texts[g]` (contexts x templates,
    context-major), the context of each prompt in `labels[g]` and the group's contexts in `contexts[g]`.
    `targets[g]` is group g's next-token target (gender: " she", " he") and `bias` the spec's name. The gender
    names `female` / `male` (and `*_labels`, `*_professions`) are the first / second group's lists."""

    texts: tuple[list[str], ...]
    labels: tuple[list[str], ...]
    contexts: tuple[list[str], ...]
    templates: list[str]
    groups: tuple[str, ...] = GENDERS
    targets: tuple[str, ...] = GENDER_TARGETS
    bias: str = "gender"

    @property
    def prompts(self) -> list[str]:
        """All prompts, group by group (gender: female first)."""
        return [t for texts in self.texts for t in texts]

    @property
    def all_labels(self) -> list[str]:
        """The context of each prompt, aligned with `prompts`."""
        return [label for labels in self.labels for label in labels]

    @property
    def group_index(self) -> torch.Tensor:
        """Long [n]: the index in `groups` of each prompt's stereotyped group, aligned with `prompts`."""
        return torch.tensor([g for g, texts in enumerate(self.texts) for _ in texts], dtype=torch.long)

    is_female = property(lambda self: _first_of_two(self), doc="Bool [n]: of the first group (two groups only).")
    female = property(lambda self: self.texts[0], doc="The first group's prompts.")
    male = property(lambda self: self.texts[1], doc="The second group's prompts.")
    female_labels = property(lambda self: self.labels[0], doc="The first group's prompt contexts.")
    male_labels = property(lambda self: self.labels[1], doc="The second group's prompt contexts.")
    female_professions = property(lambda self: self.contexts[0], doc="The first group's contexts.")
    male_professions = property(lambda self: self.contexts[1], doc="The second group's contexts.")


def _first_of_two(prompts: GapPrompts | CuePrompts) -> torch.Tensor:
    if len(prompts.groups) != 2:
        raise ValueError(f"a female/male flag needs a two-group bias; bias {prompts.bias!r} has groups "
                         f"{list(prompts.groups)}: use group_index")
    return prompts.group_index == 0


def _spec_groups(split: str, prompt_dir: str | Path | None, bias: str | Path | BiasSpec,
                 groups: Sequence[str] | None) -> tuple[BiasSpec | None, tuple[str, ...], dict]:
    """The spec to read (None: the prompt directory's files), the groups to compare and the prompts' `groups`,
    `targets` and `bias` fields."""
    if prompt_dir is not None:
        if not (isinstance(bias, str) and bias == "gender") or groups not in (None, GENDERS, list(GENDERS)):
            raise ValueError(f"prompt_dir={str(prompt_dir)!r} holds gender prompt files; pass either prompt_dir or "
                             f"bias={bias!r} / groups={groups!r}, not both")
        return None, GENDERS, {"groups": GENDERS, "targets": GENDER_TARGETS, "bias": "gender"}
    spec = load_bias_spec(bias)
    if split not in SPEC_SPLITS:
        raise ValueError(f"unknown split {split!r} of bias spec {spec.path}; expected one of {SPEC_SPLITS}")
    chosen = tuple(groups) if groups is not None else spec.groups
    if len(chosen) < 2 or len(set(chosen)) != len(chosen) or not set(chosen) <= set(spec.groups):
        raise ValueError(f"groups must be two or more different groups of bias {spec.name!r} {list(spec.groups)}, "
                         f"got {chosen}")
    return spec, chosen, {"groups": chosen, "targets": tuple(spec.targets[g] for g in chosen), "bias": spec.name}


def _contexts(spec: BiasSpec | None, groups: tuple[str, ...], split: str, prompt_dir: str | Path | None):
    if spec is None:
        return _split_lines("templates", split, prompt_dir), {g: _split_lines(f"professions_{g}", split, prompt_dir)
                                                              for g in GENDERS}
    return list(spec.templates[split]), {g: list(spec.contexts[g][split]) for g in groups}


def load_gap_prompts(split: str = "train", prompt_dir: str | Path | None = None,
                     bias: str | Path | BiasSpec = "gender", groups: Sequence[str] | None = None) -> GapPrompts:
    """Stereotyped contexts x templates of `split`, from the bias spec `bias` (a shipped name, a YAML path or a
    spec; splits "train", "validation", "heldout") for `groups` (default: all of its groups, in file order), or
    from the gender prompt files in `prompt_dir` when given (splits "train", "heldout"). For gender both give the
    same prompts."""
    spec, chosen, meta = _spec_groups(split, prompt_dir, bias, groups)
    templates, profs = _contexts(spec, chosen, split, prompt_dir)
    texts = tuple([fill(t, p) for p in profs[g] for t in templates] for g in chosen)
    labels = tuple([p for p in profs[g] for _ in templates] for g in chosen)
    return GapPrompts(texts, labels, tuple(profs[g] for g in chosen), templates, **meta)


@dataclass(frozen=True)
class CuePrompts:
    """Explicit-cue prompts: `cued[i]` is the group the relative names ("female" / "male" for gender); `pro[i]` is
    True when the context's stereotype agrees with the cue ("My sister, a nurse") and False when it does not.
    `groups`, `targets` and `bias` as in `GapPrompts`."""

    prompts: list[str]
    cued: list[str]
    pro: list[bool]
    groups: tuple[str, ...] = GENDERS
    targets: tuple[str, ...] = GENDER_TARGETS
    bias: str = "gender"

    @property
    def group_index(self) -> torch.Tensor:
        """Long [n]: the index in `groups` of each prompt's cued group."""
        return torch.tensor([self.groups.index(c) for c in self.cued], dtype=torch.long)

    cued_female = property(lambda self: _first_of_two(self), doc="Bool [n]: the cue names the first group "
                           "(two-group biases only).")


def _relatives(spec: BiasSpec | None, groups: tuple[str, ...], split: str,
               prompt_dir: str | Path | None) -> list[tuple[str, str]]:
    if spec is not None:
        return [(relative, g) for g in groups for relative in spec.cue_relatives[g][split]]
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
                     groups: Sequence[str] | None = None) -> CuePrompts:
    """Relatives x cue templates x contexts (every compared group's stereotyped lists) of `split`, from the bias
    spec or the prompt directory as in `load_gap_prompts`; `limit` keeps a seeded random subset with equal shares
    of the (cued group, pro/anti) cells (the full gender set is ~1,000 prompts)."""
    spec, chosen, meta = _spec_groups(split, prompt_dir, bias, groups)
    relatives = _relatives(spec, chosen, split, prompt_dir)
    templates = _split_lines("cue_templates", split, prompt_dir) if spec is None else list(spec.cue_templates[split])
    profs = _contexts(spec, chosen, split, prompt_dir)[1]
    prompts, cued, pro = [], [], []
    for relative, group in relatives:
        for template in templates:
            for prof_group in chosen:
                for prof in profs[prof_group]:
                    prompts.append(fill(template, prof, relative))
                    cued.append(group)
                    pro.append(group == prof_group)
    if limit is not None:
        if limit < 2 * len(chosen):
            raise ValueError(f"limit must be >= {2 * len(chosen)} (one prompt per cued group x pro/anti cell), "
                             f"got {limit}")
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        cells = [[i for i in order if (cued[i], pro[i]) == cell] for cell in sorted(set(zip(cued, pro, strict=True)))]
        keep = sorted(i for k, cell in enumerate(cells) for i in cell[: (limit + k) // len(cells)])
        prompts, cued, pro = [prompts[i] for i in keep], [cued[i] for i in keep], [pro[i] for i in keep]
    return CuePrompts(prompts, cued, pro, **meta)


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


def heldout_completion_prompts(prompt_dir: str | Path | None = None, n: int = 4,
                               bias: str | Path | BiasSpec = "gender") -> list[str]:
    """`n` held-out profession prompts: the first n//2 female-stereotyped professions, then the first n - n//2
    male-stereotyped ones, the i-th profession of a gender in held-out template i (cycling); deterministic."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gap = load_gap_prompts("heldout", prompt_dir, bias=bias)
    n_t = len(gap.templates)
    picks = []
    for texts, professions, count in zip(gap.texts[:2], gap.contexts[:2], (n // 2, n - n // 2), strict=True):
        if count > len(professions):
            raise ValueError(f"asked for {count} professions of a gender, the held-out list has {len(professions)}")
        picks += [texts[i * n_t + i % n_t] for i in range(count)]  # texts are profession-major
    return picks


def default_prompts() -> list[str]:
    """Four held-out profession prompts and two held-out explicit-cue prompts (one female, one male cue)."""
    cues = load_cue_prompts("heldout", limit=4)
    first = {g: next(p for p, c in zip(cues.prompts, cues.cued, strict=True) if c == g) for g in ("female", "male")}
    return heldout_completion_prompts(n=4) + [first["female"], first["male"]]
