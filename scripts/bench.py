"""Benchmark: naive vs debias for the mask and for a training step, and the peak memory of each path.

    python scripts/bench.py --model smollm2-135m          # the default setup (blocks.24.hook_mlp_out, mid layer 15)
    python scripts/bench.py --model tiny-llama --steps 3 --repeats 2   # CI smoke
    python scripts/bench.py --memory none --eval-export heldout       # the floor ratio, and `debias eval` timed

(a) mask: the feature gradient over the train bias prompts, naive (full forward of the whole model, logits
    included, then backward) vs debias (`mask.feature_gradient`: the forward stops at the SAE's hook), at the SAE's
    layer and at the middle layer.
(b) training step (feature + KL objective by default): naive (the whole W_out trainable: full forward of the bias
    and neutral batches every step, the reference by swapping the original W_out back in, dense gradient masked to
    the k entries, dense Adam) vs debias (`DebiasModule` with the fast path: cached layer-L inputs and reference
    logits, sparse delta, Adam on k values); the DebiasModule's plain path (cache off) as a third row.
    Steps cycle over the first `--batches` training batches; debias is timed after one warm-up pass over them (the
    cache is then full: the state of every epoch after the first); the first, cache-filling pass is reported too.
    The floor (`FloorStep`) is what any step training k entries of W_out[L] must do: layers L..N forward and
    backward on cached layer-L inputs and cached reference logits, no weight gradient, the backward stopping at
    W_out[L]'s output, Adam on k values; timed in the same loop, after its own cache-filling pass.
    `train_step_vs_floor` = debias step / floor step (1.0: the debias step does nothing it could skip).
(c) peak memory: each path runs again in its own subprocess, which reports its peak RSS (CPU torch has no
    resettable peak counter): `VmHWM` where /proc exists (Linux's `ru_maxrss` keeps the parent's peak across
    fork + exec), else `resource.getrusage(...).ru_maxrss`; `load` is a process that only loads the model and SAE.
(d) with `--eval-export`: a whole `debias eval` (process start to exit) of the naively trained network, saved as
    an HF directory, on the full path (`cache_activations=false`) and on the fast path, the evaluation cache off.
Timings are medians, naive and debias interleaved so that both see the same machine load. The last line printed is
a JSON object (`train_step_speedup`, `train_step_vs_floor`, `mask_speedup`, `state_bytes_ratio`, ...).
The SAE is a random TopK SAE (`debias.tiny.tiny_sae`): the timings do not depend on its weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MEASURES = ("load", "mask_naive", "mask_debias", "train_naive", "train_debias", "train_plain")
EVAL_MODES = ("none", "heldout", "suites")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default=None, help="SAE hook (default: blocks.24.hook_mlp_out, or the last-but-one "
                                                "layer's for models with fewer than 25 layers)")
    p.add_argument("--mid-layer", type=int, default=None, help="second mask layer (default: n_layers // 2)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batches", type=int, default=4, help="distinct training batches the timed steps cycle over")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per path")
    p.add_argument("--repeats", type=int, default=3, help="timed mask passes per path")
    p.add_argument("--memory", default=",".join(MEASURES),
                   help=f"comma-separated paths whose peak memory to measure, each in its own subprocess "
                        f"(of {', '.join(MEASURES)}), or 'none'")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--eval-export", choices=EVAL_MODES, default="none",
                   help="also time a whole `debias eval` of an edited model on the fast path and on the full path, "
                        "each in its own process: 'heldout' (--suites false) or 'suites' (minutes on smollm2)")
    p.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--feature", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----- set-up shared by the timing process and the memory subprocesses -----
def default_hook(n_layers: int) -> str:
    return f"blocks.{24 if n_layers > 25 else n_layers - 2}.hook_mlp_out"


def load_plain(args):
    from debias.models.load import load_model

    loaded = load_model(args.model)
    return loaded.model, loaded.tokenizer


def make_sae(workdir: Path, hook: str, d_in: int, d_sae: int):
    """A random TopK SAE at `hook`, saved once under `workdir` (so subprocesses load the same one)."""
    from debias.models.tiny import tiny_sae
    from debias.sae.load import load_sae

    path = workdir / ("sae-" + hook.replace(".", "_"))
    if not (path / "cfg.json").is_file():
        tiny_sae(d_in, hook, d_sae=d_sae, architecture="topk").save_model(str(path))
    sae = load_sae(path)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae, str(path)


def data(args):
    from debias.training.data import DebiasDataModule

    dm = DebiasDataModule(batch_size=args.batch_size, eval_batch_size=args.eval_batch_size)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return dm, [next(it)[0] for _ in range(args.batches)]


def tokenize(tokenizer, texts, max_length):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def mask_batches(tokenizer, dm, max_length):
    return [tokenize(tokenizer, b, max_length) for b in dm.mask_batches()]


# ----- (a) mask -----
def mask_naive(net, sae, site, parameter, batches, features, bos):
    """Feature gradient through a full forward (all layers and the logits), as a plain training loop would do."""
    from debias.models import hooks
    from debias.models.scoring import real_token_mask
    from debias.sae.ops import summed_feature_acts

    weight = net.get_parameter(parameter)
    grad = torch.zeros(weight.shape)
    weight.requires_grad_(True)
    try:
        for batch in batches:
            weight.grad = None
            with hooks.capture(net, site) as cap:
                net(**batch, use_cache=False)
            real = real_token_mask(batch["input_ids"], batch["attention_mask"], bos)
            summed_feature_acts(sae, cap.value, real, features).sum().backward()
            grad += weight.grad.float()
    finally:
        weight.grad = None
        weight.requires_grad_(False)
    return grad


def mask_debias(net, sae, site, parameter, batches, features, bos):
    from debias.edits.mask import feature_gradient

    return feature_gradient(net, sae, site, parameter, batches, features, bos, progress=False)


def mask_setup(net, workdir, hook, d_sae):
    from debias.models import hooks

    site = hooks.resolve_hook(net, hook)
    parameter = hooks.w_out_name(net, site.layer)
    sae, _ = make_sae(workdir, hook, net.config.hidden_size, d_sae)
    return site, parameter, sae


def pick_feature(net, sae, site, batches, bos) -> int:
    """The latent with the largest summed activation on the bias prompts (a random SAE has no meaningful one)."""
    from debias.models import hooks
    from debias.models.scoring import real_token_mask

    total = 0
    with torch.no_grad():
        for batch in batches:
            acts = hooks.forward_until(net, site, **batch)
            real = real_token_mask(batch["input_ids"], batch["attention_mask"], bos)
            total = total + (sae.encode(acts) * real.unsqueeze(-1)).sum(dim=(0, 1))
    return int(total.argmax())


# ----- (b) training step -----
class NaiveTrainer:
    """The whole W_out trainable: full forwards every step, dense gradient masked to the k entries, dense Adam."""

    def __init__(self, net, tokenizer, sae, site, parameter, mask, features, baseline, max_length, lr=1e-2):
        from debias.training.objective import ObjectiveWeights

        self.net, self.tok, self.sae, self.site = net, tokenizer, sae, site
        self.weight = net.get_parameter(parameter)
        self.original = self.weight.detach().clone()
        self.dense_mask = mask.dense().to(self.weight.dtype)
        self.features, self.baseline, self.max_length = features, baseline, max_length
        self.weights = ObjectiveWeights().active()
        self.weight.requires_grad_(True)
        self.opt = torch.optim.Adam([self.weight], lr=lr)

    def loss(self, texts):
        from debias.models import hooks
        from debias.models.scoring import real_token_mask
        from debias.training.objective import feature_term, mean_kl

        bias = tokenize(self.tok, texts["bias"], self.max_length)
        with hooks.capture(self.net, self.site) as cap:
            self.net(**bias, use_cache=False)  # the whole model, logits included
        real = real_token_mask(bias["input_ids"], bias["attention_mask"], self.tok.bos_token_id)
        latents = self.sae.encode(cap.value)[..., self.features]
        terms = {"feature": feature_term(latents, real, self.baseline)}
        neutral = tokenize(self.tok, texts["neutral"], self.max_length)
        with torch.no_grad():
            trained = self.weight.data.clone()
            self.weight.data.copy_(self.original)  # the original model: the original W_out swapped back in
            ref = self.net(**neutral, use_cache=False).logits
            self.weight.data.copy_(trained)
        terms["kl"] = mean_kl(ref, self.net(**neutral, use_cache=False).logits, neutral["attention_mask"].bool())
        return sum(self.weights[k] * v for k, v in terms.items())

    def step(self, texts):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(texts)
        loss.backward()
        self.weight.grad.mul_(self.dense_mask)
        self.opt.step()
        return loss.item()

    def state_bytes(self) -> int:
        state = [self.weight, self.original, self.dense_mask]
        state += [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        if self.weight.grad is not None:
            state.append(self.weight.grad)
        return sum(t.numel() * t.element_size() for t in state)


class DebiasTrainer:
    """`DebiasModule`'s training step without Lightning: loss terms, backward, Adam on the k values."""

    def __init__(self, module, plain: bool = False):
        self.module = module
        self.plain = plain
        self.opt = module.configure_optimizers()
        self.weights = module.objective.active()

    def step(self, texts):
        fast = self.module.fastpath
        if self.plain:
            self.module.fastpath = None
        try:
            self.opt.zero_grad(set_to_none=True)
            terms = self.module.loss_terms(texts)
            loss = sum(self.weights[k] * v for k, v in terms.items())
            loss.backward()
            self.opt.step()
        finally:
            self.module.fastpath = fast
        return loss.item()

    def state_bytes(self, with_grad_and_indices: bool = False) -> int:
        values = self.module.delta.values
        state = [values] + [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        if with_grad_and_indices:
            state += [values.grad] if values.grad is not None else []
            state += [b for n, b in self.module.named_buffers() if "supertuning_indices" in n or n.endswith(".indices")]
        return sum(t.numel() * t.element_size() for t in state)


class FloorStep:
    """The floor of a masked training step (feature + KL): what any method training k entries of W_out[L] must do.

    Layers 0..L-1 are skipped (a `FastPath` on the plain network caches layer L's input, and the reference logits),
    every weight is frozen, and the backward stops at W_out[L]'s output: beyond activation gradients, only the k
    values' gradient is computed (x[:, in] · g[:, out] per masked entry), then Adam on the k values.
    """

    def __init__(self, net, tokenizer, sae, site, mask, features, baseline, max_length, budget_mb, lr=1e-2):
        from debias.training.cache import FastPath
        from debias.training.objective import ObjectiveWeights

        self.net, self.tok, self.sae, self.site = net, tokenizer, sae, site
        self.features, self.baseline, self.max_length = features, baseline, max_length
        self.fast = FastPath(net, mask.parameter, budget_mb)
        self.w_out = net.get_submodule(mask.parameter.removesuffix(".weight"))
        major, minor = torch.div(mask.indices, mask.shape[-1], rounding_mode="floor"), mask.indices % mask.shape[-1]
        # nn.Linear's weight is [out, in]; GPT-2's Conv1D is [in, out]
        self.out_idx, self.in_idx = (major, minor) if isinstance(self.w_out, torch.nn.Linear) else (minor, major)
        self.values = torch.zeros(mask.k, requires_grad=True)
        self.weights = ObjectiveWeights().active()
        self.opt = torch.optim.Adam([self.values], lr=lr)
        self.delta_on = True

    def _add_delta(self, module, inputs, out):
        if not self.delta_on:
            return None
        x = inputs[0].detach()  # nothing below W_out[L]'s output needs a gradient
        return out.detach().index_add(-1, self.out_idx, x[..., self.in_idx] * self.values.to(x.dtype))

    @contextlib.contextmanager
    def _context(self):
        mode = self.net.training
        self.net.eval()
        handle = self.w_out.register_forward_hook(self._add_delta)
        try:
            with self.fast.active():
                yield
        finally:
            handle.remove()
            self.net.train(mode)

    def _reference(self, neutral):
        self.delta_on = False
        try:
            with torch.no_grad():
                return self.net(**neutral, use_cache=False).logits
        finally:
            self.delta_on = True

    def loss(self, texts):
        from debias.models import hooks
        from debias.models.scoring import real_token_mask
        from debias.sae.ops import encode_features
        from debias.training.objective import feature_term, mean_kl

        bias = tokenize(self.tok, texts["bias"], self.max_length)
        neutral = tokenize(self.tok, texts["neutral"], self.max_length)
        with self._context():
            real = real_token_mask(bias["input_ids"], bias["attention_mask"], self.tok.bos_token_id)
            latents = encode_features(self.sae, hooks.forward_until(self.net, self.site, **bias), self.features)
            terms = {"feature": feature_term(latents, real, self.baseline)}
            ref = self.fast.reference(("kl", tuple(texts["neutral"])), lambda: self._reference(neutral))
            logits = self.net(**neutral, use_cache=False).logits
            terms["kl"] = mean_kl(ref, logits, neutral["attention_mask"].bool())
        return sum(self.weights[k] * v for k, v in terms.items())

    def step(self, texts):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(texts)
        loss.backward()
        self.opt.step()
        return loss.item()


def make_module(args, sae_path, feature, mask_path, cache):
    from debias.training.args import EditArgs, SAEArgs, TrainArgs
    from debias.training.module import DebiasModule

    return DebiasModule(base_model=args.model, sae=SAEArgs(spec=str(sae_path), features=[feature]),
                        edit=EditArgs(fraction=args.fraction, mask_path=mask_path and str(mask_path)),
                        train=TrainArgs(max_length=args.max_length, cache_activations=cache))


def timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - start, out


# ----- (c) one path in its own process -----
def measure(args) -> None:
    workdir = Path(args.workdir)
    meta = json.loads((workdir / "meta.json").read_text())
    dm, batches = data(args)
    if args.measure in ("load", "mask_naive", "mask_debias"):
        net, tok = load_plain(args)
        site, parameter, sae = mask_setup(net, workdir, meta["hook"], args.d_sae)
        if args.measure != "load":
            fn = mask_naive if args.measure == "mask_naive" else mask_debias
            fn(net, sae, site, parameter, mask_batches(tok, dm, args.max_length), [args.feature], tok.bos_token_id)
    elif args.measure == "train_naive":
        net, tok = load_plain(args)
        net.train()
        site, parameter, sae = mask_setup(net, workdir, meta["hook"], args.d_sae)
        trainer = NaiveTrainer(net, tok, sae, site, parameter, _load_mask(meta), [args.feature],
                               torch.tensor(meta["baseline"]), args.max_length)
    else:
        module = make_module(args, meta["sae_path"], args.feature, meta["mask_path"], cache=True)
        module.prepare(dm)
        module.train()
        trainer = DebiasTrainer(module, plain=args.measure == "train_plain")
    if args.measure.startswith("train"):
        for texts in batches + batches[:2]:  # one pass fills the fast path's cache, then cached steps
            trainer.step(texts)
    print(json.dumps({"measure": args.measure, "peak_mb": peak_rss_mb(),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss_mb() -> float:
    """This process's peak resident set size, MB.

    `ru_maxrss` is the portable measure, but on Linux it keeps the parent's peak across fork + exec, so a child of
    the (large) timing process would report at least the parent's size; `VmHWM` (/proc/self/status) is the peak of
    this process's own address space. Use it where it exists.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_mask(meta):
    from debias.edits.mask import InstabilityMask

    return InstabilityMask.load(meta["mask_path"])


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def peak(args, which: str) -> float | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", which, "--workdir", args.workdir,
           "--feature", str(args.feature), "--model", args.model, "--d-sae", str(args.d_sae),
           "--fraction", str(args.fraction), "--batch-size", str(args.batch_size), "--eval-batch-size",
           str(args.eval_batch_size), "--max-length", str(args.max_length), "--batches", str(args.batches)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        print(f"[{which}] failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


# ----- (d) a whole `debias eval`, fast path vs full path -----
def eval_config(args, workdir: Path, sae_path: str, feature: int) -> Path:
    """A `debias fit` config naming the bench's model, SAE, feature and data settings (JSON is YAML)."""
    config = {"model": {"base_model": args.model, "sae": {"spec": sae_path, "features": [feature]},
                        "edit": {"fraction": args.fraction}, "train": {"max_length": args.max_length}},
              "data": {"batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size},
              "trainer": {"accelerator": "cpu", "devices": 1, "logger": False}}
    path = workdir / "eval-config.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


def time_eval(args, workdir: Path, edited: Path, config: Path) -> dict[str, tuple[float, dict] | None]:
    """{"fast" | "full": (wall seconds of `debias eval edited`, its JSON result)}, None for a run that failed.

    The evaluation cache is off, so both runs compute the base model's numbers too.
    """
    out: dict[str, tuple[float, dict] | None] = {}
    for path in ("full", "fast"):
        result = workdir / f"eval-{path}.json"
        cmd = [sys.executable, "-m", "debias", "eval", str(edited), "--fit_config", str(config), "--suites",
               str(args.eval_export == "suites").lower(), "--out", str(result)]
        if path == "full":
            cmd += ["--overrides", '["--model.train.cache_activations=false"]']
        seconds, done = timed(subprocess.run, cmd, capture_output=True, text=True, cwd=workdir,
                              env={**_env(), "DEBIAS_EVAL_CACHE": "0"})
        if done.returncode != 0:
            print(f"[debias eval, {path} path] failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        out[path] = (seconds, json.loads(result.read_text())) if done.returncode == 0 else None
    return out


def same_eval(a: dict, b: dict) -> bool:
    """Whether two `debias eval` results hold the same held-out numbers, before and after (float tolerance)."""
    from debias.evaluation.heldout import BASE_ROWS

    return all(math.isclose(a[side][row], b[side][row], rel_tol=1e-4, abs_tol=1e-6)
               for side in ("before", "after") for row in BASE_ROWS)


# ----- the timing process -----
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def run(args) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    load_start = os.getloadavg()
    workdir = Path(args.workdir)
    dm, batches = data(args)
    net, tok = load_plain(args)
    n_layers = net.config.num_hidden_layers
    hook = args.hook or default_hook(n_layers)
    mid = args.mid_layer if args.mid_layer is not None else n_layers // 2
    bos = tok.bos_token_id
    mbatches = mask_batches(tok, dm, args.max_length)

    # (a) mask at the SAE's layer and at the middle layer
    mask_rows, mask_times = [], {}
    for label, h in (("sae layer", hook), ("mid layer", f"blocks.{mid}.hook_mlp_out")):
        site, parameter, sae = mask_setup(net, workdir, h, args.d_sae)
        feature = pick_feature(net, sae, site, mbatches, bos)
        if h == hook:
            args.feature, main_site, main_parameter, main_sae = feature, site, parameter, sae
        # per batch, naive and debias interleaved, `repeats` times; a pass = sum over batches of the medians
        naive_t, debias_t = [[] for _ in mbatches], [[] for _ in mbatches]
        g_naive = g_debias = 0
        for r in range(args.repeats):
            for i, batch in enumerate(mbatches):
                t, g = timed(mask_naive, net, sae, site, parameter, [batch], [feature], bos)
                naive_t[i].append(t)
                g_naive = g_naive + g if r == 0 else g_naive
                t, g = timed(mask_debias, net, sae, site, parameter, [batch], [feature], bos)
                debias_t[i].append(t)
                g_debias = g_debias + g if r == 0 else g_debias
        same = torch.allclose(g_naive, g_debias, rtol=1e-4, atol=1e-6 * float(g_naive.abs().max()))
        mask_times[label] = (sum(map(median, naive_t)), sum(map(median, debias_t)))
        mask_rows.append((f"mask, {label} ({h})", *mask_times[label], same))

    # the mask and feature every training path uses
    from debias.edits.mask import compute_mask

    _, sae_path = make_sae(workdir, hook, net.config.hidden_size, args.d_sae)
    from debias.edits.mask import resolve_k

    k = resolve_k(net.get_parameter(main_parameter).numel(), args.fraction)
    mask = compute_mask(net, main_sae, main_site, main_parameter, mbatches, [args.feature], k, bos_token_id=bos,
                        progress=False, model_id=args.model)
    mask_path = str(workdir / "mask.safetensors")
    mask.save(mask_path)

    # (b) training steps
    module = make_module(args, sae_path, args.feature, mask_path, cache=True)
    module.prepare(dm)
    (workdir / "meta.json").write_text(json.dumps({"hook": hook, "sae_path": sae_path, "mask_path": mask_path,
                                                   "baseline": module.feature_baseline.tolist()}))
    module.train()
    net.train()
    naive = NaiveTrainer(net, tok, main_sae, main_site, main_parameter, mask, [args.feature],
                         module.feature_baseline.clone(), args.max_length)
    debias = DebiasTrainer(module)
    floor = FloorStep(net, tok, main_sae, main_site, mask, [args.feature], module.feature_baseline.clone(),
                      args.max_length, module.train_args.cache_budget_mb)
    plain_module = module  # the plain path is the same module with its cache bypassed, on its own optimizer
    loss0_naive = naive.loss(batches[0]).item()
    loss0_debias = sum(debias.weights[k] * v for k, v in module.loss_terms(batches[0]).items()).item()
    loss0_floor = floor.loss(batches[0]).item()
    module.fastpath.clear()
    cold = [timed(debias.step, b)[0] for b in batches]  # fills the cache (first epoch)
    for b in batches:  # the floor's cache too: it is timed in the state of every epoch after the first
        floor.step(b)
    plain = DebiasTrainer(plain_module, plain=True)
    times: dict[str, list[float]] = {"naive": [], "debias": [], "plain": [], "floor": []}
    for i in range(args.steps):
        texts = batches[i % len(batches)]
        times["naive"].append(timed(naive.step, texts)[0])
        times["debias"].append(timed(debias.step, texts)[0])
        times["plain"].append(timed(plain.step, texts)[0])
        times["floor"].append(timed(floor.step, texts)[0])
    med = {k: median(v) for k, v in times.items()}
    stats, floor_stats = dict(module.fastpath.stats), dict(floor.fast.stats)
    cache_mb = module.fastpath.cached_bytes() / 2**20
    state = debias.state_bytes()
    state_full = debias.state_bytes(with_grad_and_indices=True)
    naive_state = naive.state_bytes()
    edited = workdir / "edited"  # the naively trained network: the base model with k entries of W_out[L] changed
    if args.eval_export != "none":
        net.save_pretrained(edited)
        tok.save_pretrained(edited)
    del naive, debias, plain, floor, module, plain_module, net

    # (c) peak memory, one subprocess per path
    wanted = [] if args.memory == "none" else args.memory.split(",")
    unknown = set(wanted) - set(MEASURES)
    if unknown:
        raise SystemExit(f"unknown --memory paths {sorted(unknown)}; expected some of {MEASURES}")
    peaks = {m: (peak(args, m) if m in wanted else None) for m in MEASURES}
    evals = (time_eval(args, workdir, edited, eval_config(args, workdir, sae_path, args.feature))
             if args.eval_export != "none" else {})
    load_end = os.getloadavg()

    def same_loss(a, b):
        return abs(a - b) <= 1e-5 * abs(a) + 1e-7

    rows = [*mask_rows,
            ("train step (feature + KL)", med["naive"], med["debias"], same_loss(loss0_naive, loss0_debias)),
            ("train step floor (layers L..N cached, no W grads)", med["naive"], med["floor"],
             same_loss(loss0_naive, loss0_floor)),
            ("train step, debias plain path (no cache)", med["naive"], med["plain"], None),
            ("train step, debias first pass (cache filling)", med["naive"], median(cold), None)]
    full_eval, fast_eval = evals.get("full"), evals.get("fast")
    eval_same = same_eval(full_eval[1], fast_eval[1]) if full_eval and fast_eval else None
    if full_eval and fast_eval:
        rows.append((f"debias eval, whole command ({args.eval_export}): full/fast", full_eval[0], fast_eval[0],
                     eval_same))
    print(f"\nmodel {args.model}: {n_layers} layers, SAE {hook} (random TopK, d_sae {args.d_sae}), feature "
          f"{args.feature}, k = {k} of {mask.numel} ({args.fraction:.2%}), batch {args.batch_size} texts/set, "
          f"max_length {args.max_length}; torch threads {torch.get_num_threads()}, load average "
          f"{load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(f"{'':<52}{'naive s':>10}{'debias s':>10}{'speed-up':>10}  same result")
    for name, a, b, same in rows:
        print(f"{name:<52}{a:>10.3f}{b:>10.3f}{a / b:>9.2f}x  {'' if same is None else ('yes' if same else 'NO')}")
    print(f"{'state bytes (trainable + optimizer)':<52}{naive_state:>10}{state:>10}   "
          f"k x 12 = {12 * k}; with grad and indices {state_full}")
    print(f"{'peak RSS, MB (own subprocess, VmHWM)':<52}" + "  ".join(
        f"{m}={peaks[m]:.0f}" if peaks[m] is not None else f"{m}=n/a" for m in MEASURES))
    print(f"debias train step / floor: {med['debias'] / med['floor']:.2f}x (1.00x: nothing left to gain)")
    print(f"fast path cache: {cache_mb:.1f} MB, {stats}; floor's: {floor_stats}")
    return {
        "model": args.model, "hook": hook, "mid_layer": mid, "n_layers": n_layers, "k": k, "feature": args.feature,
        "train_step_speedup": med["naive"] / med["debias"],
        "train_step_speedup_vs_plain_path": med["plain"] / med["debias"],
        "train_step_speedup_first_pass": med["naive"] / median(cold),
        "train_step_vs_floor": med["debias"] / med["floor"], "floor_cache_stats": floor_stats,
        "mask_speedup": mask_times["sae layer"][0] / mask_times["sae layer"][1],
        "mask_speedup_mid_layer": mask_times["mid layer"][0] / mask_times["mid layer"][1],
        "state_bytes": state, "state_bytes_ratio": state / (12 * k),
        "state_bytes_with_grad_and_indices_ratio": state_full / (12 * k), "naive_state_bytes": naive_state,
        "train_step_s": {**med, "debias_first_pass": median(cold)},
        "mask_s": {label: {"naive": a, "debias": b} for label, (a, b) in mask_times.items()},
        "peak_rss_mb": peaks, "cache_mb": cache_mb,
        "same_result": all(same is not False for *_, same in rows),
        "eval_s": {p: e[0] if e else None for p, e in evals.items()} or None,
        "eval_fast_path_speedup": full_eval[0] / fast_eval[0] if full_eval and fast_eval else None,
        "eval_same_result": eval_same,
        "loadavg_start": load_start[0], "loadavg_end": load_end[0], "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    args = parse(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="debias-bench-") as tmp:
        args.workdir = tmp
        result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
