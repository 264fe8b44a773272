"""Prompt sets and the DataModule: bias and neutral texts, with explicit train and held-out splits.

A source is one of
- `package:NAME`: a file shipped in `debias/data/prompts/`;
- a `.txt` file (one text per line; blank lines and lines starting with `#` are skipped);
- a `.jsonl` file (the `text` field of each line);
- `hf:DATASET[:CONFIG]:SPLIT:FIELD`, anything `datasets.load_dataset` can open.
Batches are lists of raw strings (no chat template); the module tokenises them.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from debias.bias_spec import load_bias_spec
from debias.neutral_corpus import corpus_count, neutral_sentences
from debias.prompts import read_texts
from debias.statements import statement_texts


def _identity(batch):
    return batch


class DebiasDataModule(LightningDataModule):
    """Bias and neutral prompts for the mask, training (train splits) and held-out evaluation: the package's
    `DebiasData` (`debias.training.protocol`, what `DebiasModule` reads).

    Training batches are `{"bias", "neutral", "gap_<group>" per group of the bias, "cue"}` → list of texts,
    cycling the shorter sets (`gap_female`, `gap_male` for gender: train profession prompts stereotyped toward
    that group, for the bias term; `cue`: train explicit-cue prompts), plus
    `"statement"` and `"factual"` items (`debias.statements`) when the bias spec has statements, and `"cda"` pairs
    (`debias.cda`) when the objective asks for them. Validation
    (`val_dataloader`, what `ModelCheckpoint(monitor=...)` sees) and the held-out evaluation (`loaders("heldout")`)
    each have one loader per set of `VAL_SETS`: `bias` texts for the feature's activation and `neutral` text for
    LM loss and KL. The validation `bias` texts are the spec's validation gap prompts (none with `prompt_dir`), its
    `neutral` text every `VALIDATION_EVERY`-th text of `neutral_train` (taken out of training) unless
    `neutral_validation` is given.
    """

    VAL_SETS = ("bias", "neutral")
    VALIDATION_EVERY = 5

    def __init__(
        self,
        bias_train: str | None = None,
        bias_heldout: str | None = None,
        neutral_train: str = "package:neutral_train.txt",
        neutral_heldout: str = "package:neutral_heldout.txt",
        neutral_validation: str | None = None,
        prompt_dir: str | None = None,
        bias: str = "gender",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_texts: int | None = None,
        shuffle_seed: int = 0,
        cda_pairs: int = 512,
    ):
        """
        Args:
            bias_train: texts where the bias feature fires; used for the mask and the removal terms. None: the
                bias's train gap prompts (gender: those of `package:bias_train.txt`, which the SAE's corpus holds,
                and those of the 6 templates added since).
            bias_heldout: held-out bias texts, only evaluated. None: the bias's held-out gap prompts.
            neutral_train: text for the preservation KL; `corpus:N`: N sentences of the SAE's offline corpus that
                name no group of the bias (`debias.neutral_corpus`).
            neutral_heldout: held-out neutral text for LM loss and KL.
            neutral_validation: validation neutral text (checkpoint choice); None: every fifth text of
                `neutral_train`, which training then leaves out.
            prompt_dir: directory with the bias-metric files (professions, templates, relatives, cue templates):
                the train split feeds the `bias` and `cue_kl` terms, the held-out split the metrics. None: shipped.
            bias: the bias spec those prompts come from when `prompt_dir` is None: a shipped name
                (`debias/data/biases/NAME.yaml`) or a path to a YAML spec. Default: gender.
            batch_size: texts per set in one training step.
            eval_batch_size: texts per batch in evaluation and the mask pass.
            max_texts: keep only the first N texts of each set (quick runs).
            shuffle_seed: seed of the order of the training texts (one permutation, the same every epoch).
            cda_pairs: how many counterfactual pairs the `cda` term mines from the SAE's corpus (`debias.cda`; only
                when objective.cda > 0).
        """
        super().__init__()
        problems = [f"data.{name} must be >= 1, got {value}"
                    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)) if value < 1]
        if cda_pairs < 1:
            problems.append(f"data.cda_pairs must be >= 1, got {cda_pairs}")
        if max_texts is not None and max_texts < 1:
            problems.append(f"data.max_texts must be >= 1 or null, got {max_texts}")
        if prompt_dir is not None and bias != "gender":
            problems.append(f"data.prompt_dir holds gender prompt files; it cannot be combined with data.bias={bias!r}")
        evaluated = {"neutral_heldout": neutral_heldout, "neutral_validation": neutral_validation}
        problems += [f"data.{name} {source!r}: corpus:N is for data.neutral_train only (it would draw the same "
                     "sentences); expected a .txt, .jsonl, package: or hf: source"
                     for name, source in evaluated.items() if source is not None and corpus_count(source, name)]
        if problems:
            raise ValueError("; ".join(problems))
        corpus_count(neutral_train)  # a bad corpus:N fails here, before any model loads
        if prompt_dir is None:
            load_bias_spec(bias)  # a bad spec fails here, before any model loads
        self.save_hyperparameters()
        self.texts: dict[str, list[str]] = {}
        self.items: dict[str, list] = {}
        self.groups: tuple[str, ...] = ()  # the bias's groups: set by `setup`

    @property
    def args(self) -> Any:
        """The arguments above, by name (Lightning's `hparams`, typed loosely)."""
        return self.hparams

    @property
    def bias(self) -> str:
        return self.args["bias"]

    @property
    def prompt_dir(self) -> str | None:
        return self.args["prompt_dir"]

    @property
    def eval_batch_size(self) -> int:
        return self.args["eval_batch_size"]

    def setup(self, stage: str | None = None) -> None:
        if self.texts:
            return
        hp = self.args
        from debias.prompts import load_cue_prompts, load_gap_prompts

        sources = {"neutral_train": hp.neutral_train, "neutral_heldout": hp.neutral_heldout}
        self.texts = {"neutral_train": self._neutral_train(hp.neutral_train, hp.max_texts),
                      "neutral_heldout": read_texts(hp.neutral_heldout, hp.max_texts)}
        for split in ("train", "heldout"):
            source = hp[f"bias_{split}"]
            texts = read_texts(source, hp.max_texts) if source else \
                load_gap_prompts(split, hp.prompt_dir, bias=hp["bias"]).prompts[:hp.max_texts]
            self.texts[f"bias_{split}"] = texts
            sources[f"bias_{split}"] = source or f"the {split} gap prompts of bias {hp['bias']!r}"
        if hp.get("neutral_validation"):
            sources["neutral_validation"] = hp["neutral_validation"]
            self.texts["neutral_validation"] = read_texts(hp["neutral_validation"], hp.max_texts)
        else:
            neutral, every = self.texts["neutral_train"], self.VALIDATION_EVERY
            if len(neutral) < 2:
                raise ValueError(f"data.neutral_train has {len(neutral)} text(s); expected 2 or more (every {every}th, "
                                 "at least one, becomes the validation text), or give data.neutral_validation")
            picked = set(range(every - 1, len(neutral), every)) or {len(neutral) - 1}
            self.texts["neutral_validation"] = [t for i, t in enumerate(neutral) if i in picked]
            self.texts["neutral_train"] = [t for i, t in enumerate(neutral) if i not in picked]
        gap = load_gap_prompts("train", hp.prompt_dir, bias=hp["bias"])
        self.groups = tuple(gap.groups)
        for group, texts in zip(gap.groups, gap.texts, strict=True):
            self.texts[f"gap_{group}_train"] = texts[:hp.max_texts]
        self.texts["cue_train"] = load_cue_prompts("train", hp.prompt_dir, bias=hp["bias"]).prompts[:hp.max_texts]
        if hp.prompt_dir is None:
            self.texts["bias_validation"] = load_gap_prompts("validation", bias=hp["bias"]).prompts[:hp.max_texts]
        files = f"the prompt files in {hp['prompt_dir']}" if hp["prompt_dir"] else "the shipped prompt files"
        sources = {**{name: repr(src) for name, src in sources.items()},
                   **{f"gap_{g}_train": files for g in gap.groups}, "cue_train": files,
                   "bias_validation": f"bias spec {hp['bias']!r}",
                   "neutral_validation": repr(hp["neutral_validation"]) if hp.get("neutral_validation")
                   else "neutral_train"}
        self.items = self._spec_items() if hp.prompt_dir is None else {}
        for name, texts in self.texts.items():
            if not texts:  # an empty set makes every epoch empty: training would loop forever
                raise ValueError(f"the {name} set is empty after filtering (source: {sources[name]}, "
                                 f"data.max_texts={hp['max_texts']})")
        overlap = set(self.texts["bias_train"]) & set(self.texts["bias_heldout"])
        if overlap:
            raise ValueError(f"{len(overlap)} bias prompts are in both train and held-out sets, "
                             f"e.g. {sorted(overlap)[:2]}")

    def _neutral_train(self, source: str, limit: int | None) -> list[str]:
        n = corpus_count(source)
        if n is None:
            return read_texts(source, limit)
        return neutral_sentences(self.args["bias"], n)[:limit]

    def _loader(self, texts: list[str], batch_size: int, shuffle: bool) -> DataLoader:
        if shuffle:
            # One seeded permutation, the same every epoch: a run resumed from a checkpoint at an epoch
            # boundary then sees exactly the batches of a run that never stopped.
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.args.shuffle_seed))
            texts = [texts[i] for i in order]
        return DataLoader(texts,  # type: ignore[arg-type]  # a list is a map-style dataset
                          batch_size=batch_size, shuffle=False, collate_fn=_identity)

    def _spec_items(self) -> dict[str, list]:
        """The sentence-level train items of the bias spec: statements and factual statements (none without)."""
        from debias.bias_spec import load_bias_spec
        from debias.statements import load_factual, load_statements

        if not load_bias_spec(self.args["bias"]).subjects:
            return {}
        limit = self.args["max_texts"]
        return {"statement": load_statements("train", self.args["bias"])[:limit],
                "factual": load_factual("train", self.args["bias"])[:limit]}

    def gap_texts(self, split: str = "train") -> list[list[str]]:
        """The train gap prompts, one list per group of the bias (the `bias` term's and the gap gradient's input)."""
        return [self.texts[f"gap_{g}_{split}"] for g in self.groups]

    def require_items(self, terms: list[str]) -> None:
        """Refuse objective `terms` (e.g. ["counterfactual"]) that need the spec's statements when there are none;
        mine the `cda` term's pairs when it is among them."""
        if "cda" in terms and "cda" not in self.items:
            from debias.cda import load_pairs

            self.items["cda"] = load_pairs("train", self.args["cda_pairs"], self.args["bias"])
        named = [t for t in terms if t != "cda"]
        if named and "statement" not in self.items:
            source = "data.prompt_dir" if self.args["prompt_dir"] else f"bias spec {self.args['bias']!r}"
            raise ValueError(f"objective.{named[0]} > 0 needs the bias spec's `statements` and factual statements, "
                             f"but {source} gives none; set objective.{'/'.join(named)} to 0")

    def train_dataloader(self):
        names = ("bias", "neutral", *(f"gap_{g}" for g in self.groups), "cue")
        sets = {name: self.texts[f"{name}_train"] for name in names}
        sets.update(self.items)
        loaders = {name: self._loader(texts, self.args.batch_size, True) for name, texts in sets.items()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def loaders(self, split: str) -> list[tuple[str, DataLoader]]:
        """(set name, loader) for each set of `VAL_SETS` that `split` ("validation" / "heldout") has."""
        size = self.args.eval_batch_size
        return [(name, self._loader(self.texts[f"{name}_{split}"], size, False)) for name in self.VAL_SETS
                if f"{name}_{split}" in self.texts]

    def val_dataloader(self):
        return [loader for _, loader in self.loaders("validation")]

    def val_sets(self) -> tuple[str, ...]:
        """The names of `val_dataloader`'s loaders, in order."""
        return tuple(name for name, _ in self.loaders("validation"))

    def mask_batches(self, statements: bool = False) -> list[list[str]]:
        """The train bias texts in evaluation-sized batches, in file order (the mask's input); with `statements`,
        then every train statement (each group's prefix + the attribute)."""
        texts, size = list(self.texts["bias_train"]), self.args.eval_batch_size
        if statements:
            texts += [c + a for c, a in zip(*statement_texts(self.items.get("statement", [])), strict=True)]
        return [texts[i:i + size] for i in range(0, len(texts), size)]
