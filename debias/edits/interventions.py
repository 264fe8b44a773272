"""Inference-time interventions: a forward hook at an SAE's hook site edits activations, no weight changes.

Both baselines act on the hooked tensor `acts` [batch, seq, d_model] at every position (prompt tokens and, under
KV-cache generation, each new token as it is computed: then seq = 1):

- `SAEClamp`: z = encode(acts); z' = z with the chosen latents set to `value`;
  acts' = acts + decode(z') - decode(z), i.e. decode(z') + (acts - decode(z)): the SAE's reconstruction error is kept,
  so only the chosen latents' contribution changes. value 0 is `debias.sae.ops.ablate`.
- `SteeringVector`: acts' = acts + alpha * v, with v usually a unit direction fitted by `fit_steering_vector`
  (female minus male), so alpha is in the hooked tensor's own units (mind its typical norm when choosing alpha).
"""

from __future__ import annotations

import contextlib
import math

import torch

from debias.config import SteeringKind, choices
from debias.models import hooks
from debias.models.hooks import HookSite
from debias.sae.ops import clamp

STEERING_KINDS = choices(SteeringKind)


def _finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


class Intervention:
    """Base class: `fn(acts) -> acts'` on the tensor at `site`, applied inside `with intervention.applied(model):`."""

    method = "intervention"
    site: HookSite
    strength = 1.0  # `set_strength`: 1 is the intervention as built, 0 leaves the activations alone

    def fn(self, acts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_strength(self, strength: float) -> None:
        """Act at `strength` from now on (1: as built, 0: the activations left alone)."""
        raise NotImplementedError

    def check(self, model) -> None:
        """Raise ValueError if the intervention does not fit `model`'s hooked tensor (called by `applied`)."""

    @contextlib.contextmanager
    def applied(self, model):
        """Inside the block every forward of `model` has the hooked tensor replaced by `fn(acts)`."""
        self.check(model)
        with hooks.replace(model, self.site, self.fn):
            yield self

    def describe(self) -> dict:
        """Method name and parameters (JSON-serialisable), for reports."""
        return {"method": self.method, "hook_name": self.site.hook_name}

    def harness_entry(self) -> dict:
        """This intervention as one entry of lm-evaluation-harness's steer file (`debias.edits.steer_file`, whose
        docstring gives the format and what each intervention becomes), with a `debias` dict saying whether it is
        exact; ValueError where the format cannot hold it."""
        raise ValueError(f"{type(self).__name__} has no steer-file form")

    def _meta(self, exact: bool, note: str) -> dict:
        return {**self.describe(), "strength": float(self.strength), "exact": exact, "note": note}


class SAEClamp(Intervention):
    """Set SAE latents `features` to `value` at every token, keeping the SAE's reconstruction error.

    Any finite `value` is accepted: 0 ablates; a negative value lies outside what a ReLU/TopK/JumpReLU encoder can
    produce (it pushes along minus the decoder direction); a large one amplifies, as in Templeton et al. (2024).
    """

    method = "sae_clamp"

    def __init__(self, sae, site: HookSite, features: list[int], value: float = 0.0):
        from debias.sae.load import check_features

        if features is None or len(features) == 0:
            raise ValueError("sae_clamp needs at least one SAE feature index (features=[...])")
        check_features(sae, list(features))
        self.sae, self.site = sae, site
        self.features = [int(f) for f in features]
        self.value = _finite("clamp value", value)

    def check(self, model) -> None:
        from debias.sae.load import check_sae_fits

        check_sae_fits(self.sae, model, self.site)

    def fn(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [batch, seq, d_model] -> acts + decode(z') - decode(z), z = encode(acts), z'[..., features] = value;
        at strength s != 1 the mix acts + s · (that - acts)."""
        clamped = clamp(self.sae, acts, self.features, self.value)
        return clamped if self.strength == 1.0 else acts + self.strength * (clamped - acts)

    def set_strength(self, strength: float) -> None:
        """Move the activations `strength` of the way toward the clamped ones (1: the clamp, 0: no change)."""
        self.strength = _finite("clamp strength", strength)

    def describe(self) -> dict:
        return {**super().describe(), "features": list(self.features), "value": self.value,
                "d_sae": int(self.sae.cfg.d_sae)}

    def harness_entry(self) -> dict:
        """`clamp` along the latent's unit decoder row d, bias b_dec, coefficient value · |row|: not exact (the
        format has no encoder); one latent at strength 1 only."""
        if len(self.features) != 1:
            raise ValueError(f"sae_clamp of {len(self.features)} latents {self.features} has no steer file: the "
                             "harness's format holds one direction per module; clamp one latent")
        if self.strength != 1.0:
            raise ValueError(f"sae_clamp at strength {self.strength} mixes clamped and original activations, which "
                             "the harness's clamp cannot express; write the steer file at strength 1")
        row = self.sae.W_dec[self.features[0]].detach().float().cpu()
        norm = float(row.norm())
        if norm == 0:
            raise ValueError(f"latent {self.features[0]} has a zero decoder row: no direction to clamp along")
        return {"steering_vector": row / norm, "steering_coefficient": self.value * norm, "action": "clamp",
                "bias": self.sae.b_dec.detach().float().cpu().clone(), "head_index": None,
                "debias": self._meta(False, "the harness clamps the whole component of acts - b_dec along the decoder "
                                     "row to value*|row|; debias's sae_clamp moves only the latent's own share (its "
                                     "encoder's z_f), error term kept: equal only when that component is z_f*|row|")}


class SteeringVector(Intervention):
    """acts [batch, seq, d_model] -> acts + alpha * vector at every token; `vector` is [d_model].

    `info` (e.g. how the vector was fitted) is added to `describe()`.
    """

    method = "steering_vector"

    def __init__(self, site: HookSite, vector: torch.Tensor, alpha: float, info: dict | None = None):
        self.alpha = _finite("steering alpha", alpha)
        vector = torch.as_tensor(vector).detach()
        if vector.ndim != 1:
            raise ValueError(f"steering vector must be 1-D [d_model], got shape {list(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise ValueError("steering vector has non-finite entries")
        self.site, self.vector, self.info = site, vector, dict(info or {})
        self._shift = self.alpha * vector.float()

    def set_strength(self, strength: float) -> None:
        """Add `strength` · alpha · v from now on (1: as built, 0: no change)."""
        self.strength = _finite("steering strength", strength)
        self._shift = (self.strength * self.alpha) * self.vector.float()

    def _check_dim(self, dim: int) -> None:
        if dim != self.vector.shape[0]:
            raise ValueError(f"steering vector has dimension {self.vector.shape[0]} but {self.site.hook_name} "
                             f"({self.site.module_name} {self.site.position}) has dimension {dim}")

    def check(self, model) -> None:
        self._check_dim(hooks.hooked_dim(model, self.site))

    def fn(self, acts: torch.Tensor) -> torch.Tensor:
        self._check_dim(acts.shape[-1])
        if self._shift.device != acts.device or self._shift.dtype != acts.dtype:
            self._shift = self._shift.to(device=acts.device, dtype=acts.dtype)
        return acts + self._shift

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha, "d_model": int(self.vector.shape[0]),
                "vector_norm": float(self.vector.float().norm()), **self.info}

    def harness_entry(self) -> dict:
        """`add` of the very tensor `fn` adds (strength · alpha · v) with coefficient 1: exact, in any dtype."""
        shift = (self.strength * self.alpha) * self.vector.float()
        return {"steering_vector": shift, "steering_coefficient": 1.0, "action": "add", "bias": None,
                "head_index": None,
                "debias": self._meta(True, "acts + strength·alpha·v, as debias's own hook adds it")}


def mean_activations(model, tokenizer, site: HookSite, texts: list[str], batch_size: int = 16,
                     max_length: int = 64) -> torch.Tensor:
    """[n_texts, d_model] float32: each text's activation at `site` averaged over its real tokens (attended, not BOS).

    Runs the model only up to the hook (`hooks.forward_until`).
    """
    from debias.models.scoring import real_token_mask

    if not texts:
        raise ValueError("no texts to average activations over")
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left or right padding: same as unpadded
            acts = hooks.forward_until(model, site, input_ids=ids, attention_mask=mask, position_ids=positions).float()
            real = real_token_mask(ids, mask, tokenizer.bos_token_id).unsqueeze(-1)
            counts = real.sum(dim=1)
            if (counts == 0).any():
                empty = [chunk[i] for i in (counts.squeeze(-1) == 0).nonzero().flatten().tolist()]
                raise ValueError(f"text(s) with no real token (only BOS/padding): {empty[:3]}")
            rows.append(((acts * real).sum(dim=1) / counts).cpu())
    return torch.cat(rows)


def _unit(direction: torch.Tensor, scale: float, what: str) -> torch.Tensor:
    norm = float(direction.norm())
    if not math.isfinite(norm) or norm <= 1e-6 * max(scale, 1e-12):
        raise ValueError(f"{what} is (numerically) zero (norm {norm:.3g} vs activation norm {scale:.3g}): the female "
                         "and male texts give the same activations, there is no direction to steer along")
    return direction / norm


def _probe_direction(female: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
    """LinearSVC (female = 1, male = 0) on centred activations divided by one global scale: coef_ is the normal of
    the separating hyperplane, pointing towards the female class; a scalar rescale does not change its direction."""
    from sklearn.svm import LinearSVC

    x = torch.cat([female, male]).double()
    x = x - x.mean(dim=0)
    x = x / x.norm(dim=1).mean().clamp_min(1e-12)
    y = [1] * len(female) + [0] * len(male)
    probe = LinearSVC(C=1.0, max_iter=20_000, random_state=0).fit(x.numpy(), y)
    return torch.from_numpy(probe.coef_[0]).float()


def fit_steering(model, tokenizer, site: HookSite, female_texts: list[str], male_texts: list[str],
                 kind: str = "mean_diff", batch_size: int = 16, max_length: int = 64) -> tuple[torch.Tensor, float]:
    """A unit direction v [d_model] at `site`, oriented female (first group) minus male (second), and the strength
    calibrated on this model and layer: α = −(μ_female − μ_male)·v, which moves the female texts' average activation
    onto the male ones' along v (for `mean_diff`, minus the length of the mean difference).

    `mean_diff`: v is the mean over female texts of the token-averaged activation minus the same over male texts.
    `probe`: the weight vector of a linear SVM (scikit-learn LinearSVC) separating the token-averaged activations
    of female (label 1) from male (label 0) texts (a concept activation vector, Kim et al. 2018).
    Raises ValueError when the direction is numerically zero (e.g. identical text groups).
    """
    if kind not in STEERING_KINDS:
        raise ValueError(f"unknown steering vector kind {kind!r}; expected one of {STEERING_KINDS}")
    if not female_texts or not male_texts:
        raise ValueError(f"need female and male texts, got {len(female_texts or [])} and {len(male_texts or [])}")
    female = mean_activations(model, tokenizer, site, female_texts, batch_size, max_length)
    male = mean_activations(model, tokenizer, site, male_texts, batch_size, max_length)
    scale = float(torch.cat([female, male]).norm(dim=1).mean())
    difference = female.mean(dim=0) - male.mean(dim=0)
    if kind == "mean_diff":
        vector = _unit(difference, scale, "the mean-difference vector")
    else:
        vector = _unit(_probe_direction(female, male), 1.0, "the probe direction")
    return vector, -float(difference @ vector)


def fit_steering_vector(model, tokenizer, site: HookSite, female_texts: list[str], male_texts: list[str],
                        kind: str = "mean_diff", batch_size: int = 16, max_length: int = 64) -> torch.Tensor:
    """The unit direction of `fit_steering` alone."""
    return fit_steering(model, tokenizer, site, female_texts, male_texts, kind, batch_size, max_length)[0]


def check_two_groups(bias) -> None:
    """Raise a one-line ValueError unless the bias spec `bias` (a name, a path or a spec) has exactly two groups:
    a steering vector is one direction, from one group to the other."""
    from debias.bias_spec import load_bias_spec

    spec = load_bias_spec(bias)
    if len(spec.groups) != 2:
        raise ValueError(f"steering_vector needs a two-group bias; bias {spec.name!r} ({spec.path}) has "
                         f"{len(spec.groups)} groups {list(spec.groups)}")
