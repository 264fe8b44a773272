"""Train the project's own TopK SAE with sae_lens on activations captured from the HF model (offline corpus).

The build is deterministic for a given machine's thread count: seeded initialisation, fixed corpus order and a
seeded shuffle of the captured activations. It is cached under `models.cache_dir()/"saes"` and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from debias.io import atomic_dir, read_regular, safetensors_problem
from debias.json_store import digest, dir_hashes, model_files, tensor_digest, warn
from debias.models import hooks
from debias.models.load import cache_dir
from debias.sae import corpus
from debias.sae.corpus import capture_activations
from debias.sae.quality import sae_metrics

DEFAULT_HOOK = "blocks.24.hook_mlp_out"
PACKAGED_BIAS_TRAIN = Path(__file__).parent.parent / "data" / "prompts" / "bias_train.txt"
DEAD_WINDOW_TOKENS = 100_000  # a latent silent for this many training tokens counts as dead (TopK aux loss)


def native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU runs bfloat16 matmuls in hardware (x86 AVX-512 BF16 or AMX BF16, Arm BF16), read from
    `cpuinfo` (default: /proc/cpuinfo; no such file, as on macOS or Windows: False)."""
    # Read by hand: torch has no public call for it (torch.backends.cpu.get_cpu_capability() says "AVX512", not
    # whether BF16 is among its instructions).
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@dataclass
class SAETrainSettings:
    """What defines an SAE build; every field enters the cache key."""

    hook_name: str = DEFAULT_HOOK
    d_sae: int = 4096
    k: int = 64  # TopK: latents active per token
    n_tokens: int = 350_000  # training tokens captured (window tokens incl. separators)
    epochs: float = 2.0  # passes of the SAE over the captured tokens
    seq_len: int = 128
    lr: float = 1e-3
    batch_size: int = 1024  # tokens per SAE step (more steps beat bigger batches at this budget)
    sae_seed: int = 0  # seeds the SAE's initial weights and the order of its training batches
    val_tokens: int = 16_384  # validation tokens for explained variance, L0, dead fraction
    ce_tokens: int = 4_096  # the first ones of those also get the three full forwards of CE-loss-recovered
    capture_batch: int = 16  # sequences per model forward
    bias_prompt_file: str | None = str(PACKAGED_BIAS_TRAIN)  # train bias prompts added to the corpus (None: none)
    # bfloat16: the capture's forward and the SAE's steps run under torch.autocast (CPUs with AMX / AVX-512 BF16 run
    # its matmuls several times faster); the activations are kept in float32 and the SAE's weights stay float32.
    # scripts/sae_build_profile.py measures speed and explained variance of both; docs/guide.md has the numbers.
    # auto (the default): bfloat16 where the CPU runs it natively (2.7x the capture, 1.7x the SAE steps at the same
    # explained variance), float32 elsewhere: an AVX2-only CPU emulates bfloat16 matmuls about 100x slower.
    # Resolved when the settings are made, so the key, the cache and the record name the dtype that ran.
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self):
        for name in ("d_sae", "k", "n_tokens", "seq_len", "batch_size", "val_tokens", "ce_tokens", "capture_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"SAETrainSettings.{name} must be positive, got {getattr(self, name)}")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"SAETrainSettings.compute_dtype must be 'auto', 'float32' or 'bfloat16', "
                             f"got {self.compute_dtype!r}")
        if self.compute_dtype == "auto":
            self.compute_dtype = "bfloat16" if native_bfloat16() else "float32"
        if self.epochs <= 0:
            raise ValueError(f"SAETrainSettings.epochs must be positive, got {self.epochs}")
        if self.bias_prompt_file is not None:
            path = self.bias_prompt_path()
            if "heldout" in path.name.replace("-", "").replace("_", "").lower():
                raise ValueError(f"bias_prompt_file {self.bias_prompt_file!r} looks like a held-out split; "
                                 "the SAE corpus takes train prompts only")

    def bias_prompt_path(self) -> Path:
        """The bias prompt file (a path or `package:NAME`, as in `debias.data`)."""
        from debias.prompts import resolve_source

        if self.bias_prompt_file is None or self.bias_prompt_file.startswith("hf:"):
            raise ValueError(f"bias_prompt_file must be a local file or package:NAME, got {self.bias_prompt_file!r}")
        return resolve_source(self.bias_prompt_file)

    def key(self) -> str:
        """Hash of the settings; the bias prompt file counts by content, not path."""
        fields = dataclasses.asdict(self)
        # `sae_seed` was `seed` (issue #24): hashed under its old name, so every cached build keeps its key
        fields["seed"] = fields.pop("sae_seed")
        if self.compute_dtype == "float32":  # added later: builds from before it keep their key
            del fields["compute_dtype"]
        if self.bias_prompt_file is not None:
            fields["bias_prompt_file"] = hashlib.sha256(self.bias_prompt_path().read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def sae_cache_path(model_id: str, settings: SAETrainSettings) -> Path:
    """`cache_dir()/saes/<model>/<hook>-<d_sae>-k<k>-<settings hash>`."""
    model_part = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id.strip("/")) or "model"
    return cache_dir() / "saes" / model_part / f"{settings.hook_name}-{settings.d_sae}-k{settings.k}-{settings.key()}"


def _batches(acts: torch.Tensor, batch_size: int, seed: int):
    """Endless seeded reshuffles of acts [n, d], yielded as [batch_size, d] batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def fit_topk_sae(acts: torch.Tensor, settings: SAETrainSettings, model_name: str = "", prepend_bos: bool = True):
    """Train a TopK SAE with sae_lens's `SAETrainer` on activations [n, d]; returns (sae, trainer).

    Inputs are scaled to mean norm sqrt(d) during training (folded into the weights at the end), b_dec starts at
    the data mean, the lr warms up over 5% of the steps and decays linearly to 0 over the last 20%.
    """
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    if len(acts) < settings.batch_size:
        raise ValueError(f"captured {len(acts)} tokens, fewer than one batch ({settings.batch_size}); "
                         "raise n_tokens or lower batch_size")
    cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=settings.d_sae, k=settings.k, dtype="float32",
                                device="cpu", normalize_activations="expected_average_only_in")
    cfg.metadata.hook_name = settings.hook_name
    cfg.metadata.model_name = model_name
    cfg.metadata.context_size = settings.seq_len
    cfg.metadata.prepend_bos = prepend_bos
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.sae_seed)
        sae = TopKTrainingSAE(cfg)
    scale = acts.shape[1] ** 0.5 / acts.norm(dim=-1).mean().item()
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * scale)  # scaled space

    steps = max(1, math.floor(settings.epochs * len(acts) / settings.batch_size))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * settings.batch_size, train_batch_size_samples=settings.batch_size,
        lr=settings.lr, lr_end=settings.lr, lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=steps // 5,
        dead_feature_window=max(1, DEAD_WINDOW_TOKENS // settings.batch_size), feature_sampling_window=steps + 1,
        device="cpu", autocast=settings.compute_dtype == "bfloat16",
    )
    trainer = SAETrainer(trainer_cfg, sae, _batches(acts, settings.batch_size, settings.sae_seed))
    trainer.activation_scaler.scaling_factor = scale  # folded into the weights at the end of fit()
    trainer.fit()
    return sae, trainer


def train_sae(model, tokenizer, settings: SAETrainSettings, out_dir: str | Path, model_id: str = "") -> dict:
    """Capture activations at `settings.hook_name` on the corpus, train a TopK SAE, write it to `out_dir`.

    `out_dir` gets sae_lens files (`SAE.load_from_disk` opens it) and `metrics.json`; it appears atomically.
    Returns the metrics (validation quality, token counts, wall times, settings, data hashes, versions).
    """
    from sae_lens import SAE
    from sae_lens import __version__ as sae_lens_version

    from debias.prompts import read_texts

    start = time.perf_counter()
    site = hooks.resolve_hook(model, settings.hook_name, tokenizer)
    extra = read_texts(settings.bias_prompt_file) if settings.bias_prompt_file else []
    train_ids = corpus.token_sequences(tokenizer, corpus.split_passages("train", extra), settings.seq_len,
                                       settings.n_tokens)
    val_ids = corpus.token_sequences(tokenizer, corpus.split_passages("validation"), settings.seq_len,
                                     settings.val_tokens)
    acts = capture_activations(model, site, train_ids, corpus.non_special_tokens(tokenizer, train_ids),
                               settings.capture_batch, desc=f"capture {settings.hook_name}",
                               autocast=settings.compute_dtype == "bfloat16")
    capture_s = time.perf_counter() - start

    sae, trainer = fit_topk_sae(acts, settings, model_id or getattr(model.config, "name_or_path", ""),
                                prepend_bos=tokenizer.bos_token_id is not None)
    train_s = time.perf_counter() - start - capture_s

    with atomic_dir(out_dir, replace=True) as tmp:
        sae.save_inference_model(tmp)
        saved = SAE.load_from_disk(tmp)
        # Widened: the record below adds counts, strings and nested settings to the float quality metrics.
        metrics: dict[str, Any] = sae_metrics(model, tokenizer, saved, site, val_ids, settings.ce_tokens,
                                              settings.capture_batch)
        sample = acts[: settings.val_tokens]
        with torch.no_grad():
            err = ((sample - saved(sample)) ** 2).sum() / ((sample - sample.mean(0)) ** 2).sum()
        metrics.update(
            train_explained_variance=1 - err.item(), train_dead_fraction=trainer.dead_neurons.float().mean().item(),
            n_train_tokens=int(len(acts)), n_train_steps=trainer.n_training_steps, model=model_id,
            hook_module=site.module_name,
            capture_s=round(capture_s, 1), train_s=round(train_s, 1),
            total_s=round(time.perf_counter() - start, 1), torch_threads=torch.get_num_threads(),
            settings=dataclasses.asdict(settings), settings_key=settings.key(), data_files=corpus.file_hashes(),
            model_weights=model_weights_digest(model),
            versions={"torch": torch.__version__, "sae_lens": sae_lens_version, "python": platform.python_version()},
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def model_weights_digest(model) -> str:
    """sha256 of the model's weights: of its weight files' hashes where it was loaded from a directory or the HF
    cache (memoised, so cheap), else of its tensors. An SAE cache entry is keyed on it, so other weights saved under
    the same path build another SAE."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    files = model_files(name) if name else None
    if files is not None:
        weights = {name: h for name, h in dir_hashes(files).items() if name.endswith((".safetensors", ".gguf"))}
        if weights:
            return digest(weights)
    return tensor_digest(model.state_dict())


def _complete(path: Path, settings: SAETrainSettings, weights: str | None = None) -> bool:
    """Whether `path` holds a finished build of `settings` on the model weights `weights` (its `metrics.json` is
    written last); warns when the record exists but cannot be read or is not this build's, and deletes a build whose
    weights file is not whole (a truncated copy)."""
    record_path = path / "metrics.json"
    if not record_path.exists():
        return False
    try:
        record = json.loads(read_regular(record_path))
        key = record.get("settings_key")
    except (OSError, ValueError, AttributeError) as err:
        warn(f"the SAE build record {record_path} cannot be read ({err}); building the SAE again")
        return False
    if key is not None and key != settings.key():  # builds older than the record's key have none
        warn(f"the SAE build record {record_path} is for settings {key!r}, not {settings.key()!r}; building it again")
        return False
    if weights is not None and record.get("model_weights") != weights:
        warn(f"the SAE in {path} was built on other model weights than those now at this model path; building it "
             "again")
        return False
    from sae_lens.constants import SAE_WEIGHTS_FILENAME

    problem = safetensors_problem(path / SAE_WEIGHTS_FILENAME)
    if problem is not None:
        warn(f"the cached SAE weights {path / SAE_WEIGHTS_FILENAME} {problem}; deleting the build and building the "
             "SAE again")
        shutil.rmtree(path, ignore_errors=True)
        return False
    return True


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError as err:
        warn(f"cannot write the SAE cache in {directory} ({err}); this run builds the SAE into a temporary "
              "directory, and the next run builds it again")
        return False


def ensure_sae(model, tokenizer, model_id: str, settings: SAETrainSettings | None = None,
               force: bool = False) -> Path:
    """The cached SAE directory for (model_id, settings), built first when missing or unreadable (or when `force`).

    Where the cache cannot be written, the SAE is built into a temporary directory (returned) for this run only.
    """
    settings = settings or SAETrainSettings()
    path = sae_cache_path(model_id, settings)
    if force or not _complete(path, settings, model_weights_digest(model)):
        if not _writable(path.parent):
            path = Path(tempfile.mkdtemp(prefix="debias-sae-")) / path.name
        train_sae(model, tokenizer, settings, path, model_id=model_id)
    return path


