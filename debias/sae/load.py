"""Load sae_lens SAEs (local directory or hub release) and check that they fit a model's hook site."""

from __future__ import annotations

import operator
from pathlib import Path

import torch
from sae_lens import SAE

from debias.models.hooks import HookSite, hooked_dim


def _dtype_name(dtype) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    raise TypeError(f"dtype must be a torch.dtype, a string or None, got {dtype!r}")


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def load_sae(release_or_path: str | Path, sae_id: str | None = None, device: str = "cpu", dtype=None) -> SAE:
    """An SAE from a directory written by `sae.save_model(dir)`, else from sae_lens' pretrained `release`/`sae_id`."""
    path = Path(release_or_path).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").is_file():
            raise FileNotFoundError(f"{path} has no cfg.json: not a directory written by sae_lens' save_model")
        from sae_lens.constants import SAE_WEIGHTS_FILENAME

        from debias.io import safetensors_problem

        problem = safetensors_problem(path / SAE_WEIGHTS_FILENAME)
        if problem is not None:
            raise ValueError(f"the SAE weights {path / SAE_WEIGHTS_FILENAME} {problem}")
        return SAE.load_from_disk(path, device=device, dtype=_dtype_name(dtype))
    if path.exists() or str(release_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"SAE path {str(release_or_path)!r} is not a directory written by save_model")
    if sae_id is None:
        raise ValueError(f"{release_or_path!r} is not a local directory; loading a pretrained release needs sae_id")
    try:
        return SAE.from_pretrained(str(release_or_path), sae_id, device=device, dtype=_dtype_name(dtype) or "float32")
    except _network_errors() as err:
        raise OSError(
            f"could not fetch SAE {release_or_path!r} / {sae_id!r} from the Hugging Face hub "
            "(offline or unreachable?). Download it where the hub is reachable, save it with sae.save_model(dir) "
            "and pass that directory."
        ) from err


def sae_hook_name(sae: SAE) -> str:
    """The TransformerLens hook name the SAE was trained on (`sae.cfg.metadata.hook_name`)."""
    metadata = getattr(sae.cfg, "metadata", None)
    name = getattr(metadata, "hook_name", None)
    if not name:
        raise ValueError(
            f"{type(sae).__name__} has no cfg.metadata.hook_name; set it to the TransformerLens hook name it reads "
            "(e.g. 'blocks.12.hook_mlp_out')"
        )
    return name


def check_sae_fits(sae: SAE, model: torch.nn.Module, site: HookSite) -> None:
    """Raise ValueError unless the SAE's d_in equals the size of the hooked tensor's last dim."""
    d_model = hooked_dim(model, site)
    if sae.cfg.d_in != d_model:
        model_name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        raise ValueError(
            f"SAE expects activations of shape [..., {sae.cfg.d_in}] (d_in={sae.cfg.d_in}) but {site.hook_name} "
            f"({site.module_name} {site.position}) of model {model_name!r} has shape [..., {d_model}]"
        )


def check_features(sae: SAE, features: list[int]) -> None:
    """Raise ValueError unless every feature index lies in [0, d_sae)."""
    d_sae = sae.cfg.d_sae
    if len(features) == 0:
        raise ValueError("no SAE features given")
    for feature in features:
        try:
            index = operator.index(feature)
        except TypeError:
            raise ValueError(f"SAE feature index {feature!r} is not an integer") from None
        if isinstance(feature, bool) or not 0 <= index < d_sae:
            raise ValueError(
                f"SAE feature index {feature!r} out of range: the SAE has d_sae={d_sae} latents [0, {d_sae})"
            )


def load_sae_spec(model, tokenizer, model_id: str, spec: str | None = "train", sae_id: str | None = None,
                  hook_name: str | None = None, build=None):
    """An SAE from a spec as `DebiasModule` reads it: `tiny:HOOK[:ARCH]`, `train` (or None: the project's cached
    TopK SAE build with `build` settings (a `SAETrainSettings`), trained first if missing; default: at `hook_name`
    or the default hook), a directory written by `save_model`, or a sae_lens release with `sae_id`. With
    `hook_name`, the SAE must read that hook. The SAE comes back frozen, in eval mode, on the model's device."""
    spec = "train" if spec is None else spec
    if spec.startswith("tiny:"):
        from debias.models.tiny import tiny_sae_from_spec

        sae = tiny_sae_from_spec(spec, model)
    elif spec == "train":
        from debias.sae.build import SAETrainSettings, ensure_sae

        settings = build or (SAETrainSettings(hook_name=hook_name) if hook_name else SAETrainSettings())
        sae = load_sae(str(ensure_sae(model, tokenizer, model_id, settings)))
    else:
        sae = load_sae(spec, sae_id)
    if hook_name is not None and sae_hook_name(sae) != hook_name:
        raise ValueError(f"hook_name={hook_name!r} but SAE {spec!r} reads {sae_hook_name(sae)!r}")
    for param in sae.parameters():
        param.requires_grad_(False)
    return sae.to(next(model.parameters()).device).eval()
