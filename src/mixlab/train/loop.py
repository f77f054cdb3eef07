"""The reference training loop. It owns the model, the optimizer, the data and the schedule;
the mixer only plans mixtures and observes signals.

One step, in order::

    plan   = mixer.plan(step)                      # mixture (or exact counts) for this step
    batch  = sampler.next_batch(plan)               # the global batch, this rank's slice
    losses = per-sample losses, weighted by w_i / q_i when the plan re-weights the loss
    skip the update if the loss is NaN/inf (counted; the mixer never sees it)
    clip, AdamW step at lr_at(step)
    mixer.observe(step, signals)                    # signals computed only when asked for
    log / evaluate / checkpoint
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab import __version__
from mixlab.config import to_dict
from mixlab.data.budget import RepetitionBudget
from mixlab.data.format import DataDir, write_json_atomic
from mixlab.data.sampler import MixtureSampler
from mixlab.errors import CheckpointError, ConfigError, MixlabError, Stopped
from mixlab.mixers.base import (
    MixerContext,
    Plan,
    build_mixer,
    check_distribution,
    loss_factors,
    resolve_plan,
)
from mixlab.model import build_model, count_parameters, per_sample_loss, token_losses
from mixlab.report.runs import with_input_steps
from mixlab.train import fsdp
from mixlab.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from mixlab.train.config import TrainConfig, load_config
from mixlab.train.distributed import (
    DistInfo,
    all_gather_array,
    all_reduce_max,
    all_reduce_sum,
    any_rank,
    average_gradients,
    barrier,
    check_same_on_all_ranks,
    gather_objects,
    init_from_env,
)
from mixlab.train.evaluate import EvalSet, loss_report, mean_losses
from mixlab.train.memory import check_memory
from mixlab.train.preempt import StopRequests
from mixlab.train.schedule import lr_at
from mixlab.train.signals import StepSignals
from mixlab.train.target import TargetSet, load_target
from mixlab.train.weighting import RunWeighting

AUX_SEED_OFFSET = 1_000_003

# Fields of summary.json that measure time and so differ between otherwise identical runs.
TIMING_KEYS = ("wall_time_s", "tokens_per_s")


@dataclass
class LoopState:
    """Counters of the loop, saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    extra_steps: int = 0
    elapsed_s: float = 0.0
    weights_sum: list[float] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = '{name}' but CUDA is not available; use 'cpu' or 'auto'.")
    return dev


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms and 1-D params are not decayed)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )


class Trainer:
    """One training run. ``Trainer(cfg, out_dir).run()`` returns the summary dict."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.dist = dist_info or init_from_env(self.device.type)
        rank, world_size = self.dist.rank, self.dist.world_size
        self.rank, self.world = rank, world_size
        self.is_main = self.dist.is_main
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if use_bf16
            else contextlib.nullcontext
        )
        if t.batch_size % (world_size * t.grad_accum):
            raise ConfigError(
                f"train.batch_size {t.batch_size} must be divisible by world size x grad_accum "
                f"= {world_size * t.grad_accum}."
            )

        self.data = DataDir.open(cfg.data.dir)
        self.domains = list(cfg.data.domains) or self.data.domains
        for d in self.domains:
            self.data.manifest.domain(d)  # clear error for an unknown domain
        self.m = len(self.domains)
        seq = cfg.data.seq_len
        # Refuse a config that cannot fit before allocating anything (the kernel would kill it).
        check_memory(cfg, self.data.vocab_size, self.device, world_size, use_bf16)
        self.train_tokens = np.array(
            [self.data.split(d, "train").n_tokens for d in self.domains], dtype=np.int64
        )

        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, self.data.vocab_size, seq).to(self.device)
        # The module that trains: DDP averages gradients over ranks. Everything else (eval,
        # alignment, checkpoints) uses the bare model, identical on every rank.
        self.train_model: torch.nn.Module = self.model
        # FSDP shards the model in place: then self.model *is* the sharded module, every use of
        # it is a collective, and the helpers of mixlab.train.fsdp stand in where that matters.
        self.sharded = self.dist.enabled and t.parallel == "fsdp"
        self._mean_losses = fsdp.mean_losses if self.sharded else mean_losses
        if self.sharded:
            fsdp.shard_model(self.model, self.dist)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = MixtureSampler(
            self.data, "train", seq, t.batch_size, t.seed, rank, world_size, self.domains
        )
        # data.max_epochs: a per-domain repetition budget applied in _resolve_plan (None = none).
        self.budget = RepetitionBudget.from_config(
            cfg.data.max_epochs, cfg.data.budget_pace, self.domains, self.sampler.n_windows,
            t.steps, t.batch_size,
        )
        # A second, independent data stream for batches a method draws to *measure* something
        # (alignment probes, ...): it never moves the training stream, and it is checkpointed.
        self.aux_sampler = MixtureSampler(
            self.data, "train", seq, t.batch_size, t.seed + AUX_SEED_OFFSET, rank, world_size,
            self.domains,
        )
        self.ctx = MixerContext(
            domains=self.domains,
            train_tokens=self.train_tokens,
            total_steps=t.steps,
            batch_size=t.batch_size,
            seq_len=seq,
            seed=t.seed,
        )
        self.mixer = build_mixer(cfg.mixer.name, cfg.mixer.options, self.ctx)

        e = cfg.eval
        self.val_set = EvalSet.from_data(self.data, self.domains, "val", e.windows, seq, t.seed)
        self.signal_set = EvalSet.from_data(
            self.data, self.domains, "val", e.signal_windows, seq, t.seed + 1
        )
        self.target: TargetSet | None = load_target(cfg.target, self.data, seq, t.seed)
        self.reference: torch.nn.Module | None = None
        if cfg.mixer.reference:
            self.reference = load_run_model(cfg.mixer.reference, self.data).to(self.device).eval()

        # Per-sample weighting inside each batch (DWM), on top of the mixer's sampling.
        self.weighting = RunWeighting(self) if cfg.weighting.enabled else None

        self.state = LoopState(weights_sum=[0.0] * self.m)
        self._step_token_losses: torch.Tensor | None = None
        self.window = _LogWindow(self.m)
        self._eval_cache: dict[tuple[str, int], Any] = {}
        self.config_dict = to_dict(cfg)

    # ---------------------------------------------------------------- signals for mixers

    def signal_eval_losses(self, step: int) -> np.ndarray:
        key = ("signal", step)
        if key not in self._eval_cache:
            losses = self._mean_losses(
                self.model, self.signal_set.windows, self.cfg.eval.batch_size, self.device, self.autocast,
                self.dist,
            )
            self._eval_cache = {k: v for k, v in self._eval_cache.items() if k[1] == step}
            self._eval_cache[key] = np.array([losses[d] for d in self.domains])
        return self._eval_cache[key].copy()

    def target_probe_loss(self, step: int) -> float:
        if self.target is None:
            raise ConfigError("this mixer needs a target set: set target.path or target.domain.")
        key = ("target", step)
        if key not in self._eval_cache:
            self._eval_cache[key] = self._mean_losses(
                self.model, {"t": self.target.probe}, self.cfg.eval.batch_size, self.device,
                self.autocast, self.dist,
            )["t"]
        return float(self._eval_cache[key])

    @torch.no_grad()
    def reference_sample_losses(self, tokens: torch.Tensor) -> np.ndarray:
        if self.reference is None:
            raise ConfigError(
                f"mixer '{self.cfg.mixer.name}' needs a reference model: set mixer.reference to a "
                "finished run dir (e.g. a stratified run)."
            )
        with self.autocast():
            local = per_sample_loss(self.reference, tokens.to(self.device)).float().cpu().numpy()
        return all_gather_array(local, self.dist)

    def branch_eval_deltas(self, mixtures: np.ndarray, steps: int, step: int) -> np.ndarray:
        """Train a copy of the model per mixture for ``steps`` steps; return eval-loss drops.

        ``step`` is the signal step asking (its cached eval losses are the baseline)."""
        if self.sharded:  # config refuses the known mixers; this catches any other
            raise ConfigError(
                f"mixer '{self.cfg.mixer.name}' trains branch copies of the model, which "
                "train.parallel = 'fsdp' does not support; use train.parallel = 'ddp'."
            )
        base_losses = self.signal_eval_losses(step)
        out = np.zeros_like(mixtures)
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        for k, mix in enumerate(mixtures):
            branch = copy.deepcopy(self.model)
            opt = build_optimizer(branch, self.cfg)
            opt.load_state_dict(copy.deepcopy(opt_state))
            # A separate data stream, so branches never move the main run's data order.
            sampler = MixtureSampler(
                self.data, "train", self.cfg.data.seq_len, self.cfg.train.batch_size,
                self.cfg.train.seed + 7919 * (k + 1), self.rank, self.world, self.domains,
            )
            lr = lr_at(max(0, step), **self._lr_args())
            for group in opt.param_groups:
                group["lr"] = lr
            for _ in range(steps):
                batch = sampler.next_batch(weights=check_distribution(mix, "branch mixture"))
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = per_sample_loss(branch, batch.tokens.to(self.device)).mean()
                loss.backward()
                average_gradients(branch, self.dist)
                if self.cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(branch.parameters(), self.cfg.optim.grad_clip)
                opt.step()
            after = mean_losses(
                branch, self.signal_set.windows, self.cfg.eval.batch_size, self.device,
                self.autocast, self.dist,
            )
            out[k] = base_losses - np.array([after[d] for d in self.domains])
        self.state.extra_steps += steps * len(mixtures)
        return out

    # ---------------------------------------------------------------- the loop

    def _lr_args(self) -> dict[str, Any]:
        o = self.cfg.optim
        return {
            "lr": o.lr,
            "warmup_steps": o.warmup_steps,
            "total_steps": self.cfg.train.steps,
            "min_lr_ratio": o.min_lr_ratio,
        }

    def _resolve_plan(self, plan: Plan) -> Plan:
        plan = resolve_plan(plan, self.m, self.cfg.mixer.apply, self.cfg.mixer.name)
        if self.budget is None:
            return plan
        # The budgeted plan is what is sampled, logged and summed into weights_avg; its state
        # is the sampler's (checkpointed) drawn counts, so a resumed run projects identically.
        return self.budget.apply(plan, self.sampler.windows_drawn, self.sampler.step)

    def train_step(self, plan: Plan) -> tuple[float, np.ndarray, np.ndarray, torch.Tensor] | None:
        """One optimizer step. Returns (loss, per-sample losses, domains, tokens) or None if skipped."""
        t = self.cfg.train
        if plan.counts is not None:
            batch = self.sampler.next_batch(counts=np.asarray(plan.counts, dtype=np.int64))
        else:
            batch = self.sampler.next_batch(weights=plan.weights)
        per_domain = loss_factors(plan)
        factors = None if per_domain is None else torch.as_tensor(per_domain, dtype=torch.float32)[batch.domains]
        lr = lr_at(self.state.step, **self._lr_args())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        b = batch.tokens.shape[0]
        micro = b // t.grad_accum
        sample_losses = []
        sample_weights = []
        # DoReMi's per-token excess reads the token losses of this very forward (pre-step θ).
        keep_tokens = bool(getattr(self.mixer, "wants_token_losses", False))
        kept: list[torch.Tensor] = []
        self._step_token_losses = None
        total = 0.0
        for k in range(t.grad_accum):
            sl = slice(k * micro, (k + 1) * micro)
            tokens = batch.tokens[sl].to(self.device, non_blocking=True)
            last = k == t.grad_accum - 1
            # Gradients are averaged over ranks once, on the last micro-batch.
            if last or not self.dist.enabled:
                sync: contextlib.AbstractContextManager = contextlib.nullcontext()
            else:
                sync = fsdp.no_sync(self.model) if self.sharded else self.train_model.no_sync()
            with sync:
                with self.autocast():
                    if keep_tokens:  # token_losses(...).mean(1) is per_sample_loss's ops
                        tok = token_losses(self.train_model(tokens[:, :-1]), tokens[:, 1:])
                        losses = tok.mean(dim=1)
                        kept.append(tok.detach().float().cpu())
                    else:
                        losses = per_sample_loss(self.train_model, tokens)
                weighted = losses if factors is None else losses * factors[sl].to(self.device)
                if self.weighting is not None:
                    sw = self.weighting.micro_weights(
                        self.state.step, tokens, batch.domains[sl], losses.detach()
                    )
                    weighted = weighted * sw
                    sample_weights.append(sw.detach().cpu())
                loss = weighted.sum() / b
                # Every rank must take the same branch, or the gradient all-reduce would hang.
                if any_rank(not bool(torch.isfinite(loss)), self.dist):
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.sharded:  # earlier micro-batches' gradients, not yet reduced
                        fsdp.drop_unsynced_grads(self.model)
                    return None
                loss.backward()
            total += float(loss.detach())
            sample_losses.append(losses.detach().float().cpu())
        if self.weighting is not None and self.weighting.weighter.trains_at(self.state.step):
            self.weighting.update(self.state.step, batch, torch.cat(sample_losses), factors, lr, micro)
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return None
        self.optimizer.step()
        if keep_tokens:
            self._step_token_losses = torch.cat(kept)
        # Mixers see the whole global batch: losses and domains gathered in rank order.
        # Each rank's loss is its local mean (DDP/FSDP average the gradients): their mean is the
        # global batch's mean loss.
        total = float(all_reduce_sum(np.array([total]), self.dist)[0]) / self.world
        losses_all = all_gather_array(torch.cat(sample_losses).numpy(), self.dist)
        domains_all = all_gather_array(batch.domains.numpy(), self.dist)
        if self.weighting is not None:
            self.weighting.record(self.state.step, batch, domains_all, torch.cat(sample_weights))
        return total, losses_all, domains_all, batch.tokens

    def evaluate(self, split: str = "val") -> dict[str, Any]:
        e = self.cfg.eval
        if split == "val":
            windows = dict(self.val_set.windows)
        else:
            windows = EvalSet.from_data(
                self.data, self.domains, split, e.test_windows, self.cfg.data.seq_len, self.cfg.train.seed
            ).windows
        if self.target is not None:
            windows["__target__"] = self.target.eval
        losses = self._mean_losses(self.model, windows, e.batch_size, self.device, self.autocast, self.dist)
        return loss_report(losses, self.domains, losses.get("__target__"))

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            # FSDP: the full state gathered to rank 0, in the one-process layout.
            "optimizer": (fsdp.full_optimizer_state(self.model, self.optimizer) if self.sharded
                          else self.optimizer.state_dict()),
            "sampler": self.sampler.state_dict(),
            "aux_sampler": self.aux_sampler.state_dict(),
            "mixer": self.mixer.state_dict(),
            # Dropout streams differ per rank, so every rank's generator state is kept.
            "rng": {"torch": gather_objects(torch.get_rng_state(), self.dist)},
            "log_window": self.window.state_dict(),
            **({"weighting": self.weighting.state_dict()} if self.weighting is not None else {}),
            "loop": {
                "step": s.step,
                "tokens": s.tokens,
                "nonfinite_total": s.nonfinite_total,
                "nonfinite_streak": s.nonfinite_streak,
                "extra_steps": s.extra_steps,
                "elapsed_s": s.elapsed_s,
                "weights_sum": list(s.weights_sum),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded:
            fsdp.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.aux_sampler.load_state_dict(state["aux_sampler"])
        self.mixer.load_state_dict(state["mixer"])
        rng = state["rng"]["torch"]
        if len(rng) != self.world:
            raise CheckpointError(
                f"the checkpoint was written by {len(rng)} processes and this run has "
                f"{self.world}; resume with --nproc_per_node {len(rng)}."
            )
        torch.set_rng_state(rng[self.rank])
        self.window.load_state_dict(state["log_window"])
        if self.weighting is not None:
            if "weighting" not in state:
                raise CheckpointError("the checkpoint has no weighting model state; it was written by a run without weighting.")
            self.weighting.load_state_dict(state["weighting"])
        self.state = LoopState(**state["loop"])

    def checkpoint(self) -> Path | None:
        state = self.state_dict()  # collective under DDP: every rank takes part
        weights = self._model_weights()
        path = None
        if self.is_main:
            path = save_checkpoint(
                self.out / "checkpoints", self.state.step, weights, state,
                self.config_dict, self.cfg.checkpoint.keep,
            )
        barrier(self.dist)
        return path

    def _model_weights(self) -> torch.nn.Module | dict[str, torch.Tensor]:
        """What rank 0 saves as model.safetensors: the model, or under FSDP its full state
        gathered to rank 0 (a collective: every rank calls this)."""
        return fsdp.full_model_state(self.model) if self.sharded else self.model

    def _resume(self) -> bool:
        ckpts = list_checkpoints(self.out / "checkpoints")
        if not ckpts:
            return False
        _, state = load_checkpoint(ckpts[-1], self.config_dict)
        if self.sharded:
            fsdp.load_full_model_state(self.model, ckpts[-1] / "model.safetensors")
        else:
            load_model(self.model, ckpts[-1] / "model.safetensors")
        self.load_state_dict(state)
        if self.is_main:  # one writer: two ranks replacing the same file race (seen in CI)
            _truncate_metrics(self.out / "metrics.jsonl", self.state.step)
        return True

    def _prepare_out_dir(self, resume: bool) -> bool:
        """Create the run dir; returns True when resuming from a checkpoint."""
        self.out.mkdir(parents=True, exist_ok=True)
        has_ckpt = bool(list_checkpoints(self.out / "checkpoints"))
        has_metrics = (self.out / "metrics.jsonl").exists()
        if not resume and (has_ckpt or has_metrics or (self.out / "summary.json").exists()):
            raise MixlabError(
                f"run dir '{self.out}' already holds a run; pass --resume to continue it or "
                "choose another --out."
            )
        barrier(self.dist)  # every rank has looked before rank 0 writes anything
        if self.is_main:
            import tomli_w

            (self.out / "config.toml").write_text(tomli_w.dumps(self.config_dict), encoding="utf-8")
        resumed = self._resume() if resume else False
        if resume and not resumed and has_metrics and self.is_main:
            (self.out / "metrics.jsonl").unlink()  # a killed run with no checkpoint starts over
        return resumed

    def _one_step(self, metrics: _MetricsWriter, bar: Any, t0: float, log: Callable[[str], None]) -> None:
        """Plan, train, observe, log and evaluate one step (checkpoints are the caller's)."""
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        step = self.state.step
        plan = self._resolve_plan(self.mixer.plan(step))
        if t.check_ranks:
            check_same_on_all_ranks(plan.weights, "mixture weights", step, self.dist)
        result = self.train_step(plan)
        self.state.step += 1
        self.state.tokens += tokens_per_step
        self.state.weights_sum = [a + float(b) for a, b in zip(self.state.weights_sum, plan.weights)]
        if result is None:
            self.state.nonfinite_total += 1
            self.state.nonfinite_streak += 1
            log(f"step {step + 1}: non-finite loss, update skipped")
            if self.state.nonfinite_streak >= t.max_nonfinite:
                self.state.elapsed_s = time.perf_counter() - t0
                ckpt = self.checkpoint()
                raise MixlabError(
                    f"{self.state.nonfinite_streak} consecutive steps had a NaN/inf loss "
                    f"(at step {step + 1}); stopped with a checkpoint at {ckpt}. Lower "
                    "optim.lr or check the data, then resume with --resume."
                )
        else:
            self.state.nonfinite_streak = 0
            loss, sample_losses, domains, tokens = result
            self.window.add(loss, sample_losses, domains)
            self.mixer.observe(step, StepSignals(step, self, sample_losses, domains, tokens,
                                                 token_losses=self._step_token_losses))
        done = self.state.step
        elapsed = time.perf_counter() - t0
        if done % t.log_every == 0 or done == t.steps:
            rec = self.window.flush(self.domains)
            rec.update(
                kind="train", step=done, tokens=self.state.tokens,
                lr=lr_at(step, **self._lr_args()),
                weights=dict(zip(self.domains, map(float, plan.weights))),
                phase=plan.phase, nonfinite=self.state.nonfinite_total,
                tokens_per_s=self.state.tokens / max(elapsed, 1e-9), elapsed_s=elapsed,
            )
            if plan.loss_weights is not None:
                rec["loss_weights"] = dict(zip(self.domains, map(float, plan.loss_weights)))
            if mixer_report := self.mixer.report():
                rec["mixer"] = mixer_report
            if self.weighting is not None:
                rec["weighting"] = self.weighting.weighter.report(done)
            metrics.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}" if rec["loss"] is not None else "nan",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        if (self.cfg.eval.every and done % self.cfg.eval.every == 0) or done == t.steps:
            ev = self.evaluate("val")
            metrics.write({"kind": "eval", "step": done, "tokens": self.state.tokens, "split": "val", **ev})
        bar.update(1)

    def run(self, resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Train to the end (or resume) and return the summary; writes the run dir."""
        log = log or (lambda _msg: None)
        summary_path = self.out / "summary.json"
        if resume and summary_path.exists():
            log(f"run '{self.out}' is already finished.")
            return json.loads(summary_path.read_text(encoding="utf-8"))
        resumed = self._prepare_out_dir(resume)
        t = self.cfg.train
        log(
            f"{'resuming' if resumed else 'training'} {self.cfg.model.kind} model with "
            f"{count_parameters(self.model) / 1e6:.2f}M parameters on {self.m} domains, "
            f"mixer '{self.cfg.mixer.name}', {t.steps} steps x {t.batch_size} x "
            f"{self.cfg.data.seq_len} tokens, device {self.device}"
            + (f" (from step {self.state.step})" if resumed else "")
        )
        for note in self.data.notes:
            log(f"note: {note}")
        if not resumed:
            self.mixer.start(StepSignals(-1, self, None, None, None))
        metrics = _MetricsWriter(self.out / "metrics.jsonl", self.is_main, self.cfg.log.tensorboard)
        bar = _progress(t.steps, self.state.step, t.progress and self.is_main)
        t0 = time.perf_counter() - self.state.elapsed_s
        last_ckpt = time.perf_counter()
        with StopRequests("mixlab train") as stops:
            while self.state.step < t.steps:
                self._one_step(metrics, bar, t0, log)
                # Checkpoints and stops happen here, between steps, where the loop's state (model,
                # optimizer, sampler, mixer, log window) is whole: resuming is bit-identical.
                done, now = self.state.step, time.perf_counter()
                every, minutes = self.cfg.checkpoint.every, self.cfg.checkpoint.minutes
                due = bool(every and done % every == 0) or bool(minutes and now - last_ckpt >= 60 * minutes)
                signum = stops.signum or 0
                if self.dist.enabled:  # one rank's clock or signal decides for all
                    due_all, signum = all_reduce_max(np.array([float(due), float(signum)]), self.dist)
                    due, signum = bool(due_all), int(signum)
                if done < t.steps and (due or signum):
                    self.state.elapsed_s = now - t0
                    ckpt = self.checkpoint()
                    last_ckpt = time.perf_counter()
                    if signum:
                        bar.close()
                        metrics.close()
                        name = signal.Signals(signum).name
                        raise Stopped(
                            f"{name}: stopped after step {done} with a checkpoint at {ckpt}; "
                            "continue with the same command and --resume.", signum)
        bar.close()
        metrics.close()
        self.state.elapsed_s = time.perf_counter() - t0
        self.checkpoint()
        # The steps of the runs this one read (DoReMi's reference, Aioli's prior_run) are the
        # method's extra compute: counted here, once, where every caller of train() gets them.
        summary = with_input_steps(self._summary(), self.config_dict)
        weights = self._model_weights()
        if self.is_main:
            save_model(weights, self.out / "model.safetensors")
            if self.weighting is not None:
                self.weighting.save()
            write_json_atomic(summary_path, summary)
        log(f"done: average test perplexity {summary['test']['avg_ppl']:.3f}; run dir {self.out}")
        return summary

    def _summary(self) -> dict[str, Any]:
        s = self.state
        val = self.evaluate("val")
        test = self.evaluate("test")
        avg = np.asarray(s.weights_sum) / max(1, s.step)
        return {
            "mixlab_version": __version__,
            "mixer": self.cfg.mixer.name,
            "seed": self.cfg.train.seed,
            "steps": s.step,
            "tokens": s.tokens,
            "domains": self.domains,
            "parameters": count_parameters(self.model),
            "test": test,
            "val": val,
            "weights_final": dict(zip(self.domains, map(float, self.mixer.plan(s.step).weights))),
            "weights_avg": dict(zip(self.domains, map(float, avg))),
            "tokens_per_domain": dict(zip(self.domains, map(int, self.sampler.tokens_drawn))),
            "epochs_per_domain": dict(zip(self.domains, map(float, self.sampler.epochs))),
            "nonfinite_steps": s.nonfinite_total,
            "extra_steps": s.extra_steps,
            **({"weighting": self.weighting.summary()} if self.weighting is not None else {}),
            "wall_time_s": s.elapsed_s,
            "tokens_per_s": s.tokens / max(s.elapsed_s, 1e-9),
        }


class _LogWindow:
    """Averages of the train loss, overall and per domain, since the last log line."""

    def __init__(self, m: int):
        self.m = m
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.n = 0.0, 0
        self.dom_sum = np.zeros(self.m)
        self.dom_n = np.zeros(self.m)

    def add(self, loss: float, sample_losses: np.ndarray, domains: np.ndarray) -> None:
        self.loss_sum += loss
        self.n += 1
        self.dom_sum += np.bincount(domains, weights=sample_losses, minlength=self.m)
        self.dom_n += np.bincount(domains, minlength=self.m)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "n": self.n, "dom_sum": self.dom_sum.tolist(),
                "dom_n": self.dom_n.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.n = state["loss_sum"], state["n"]
        self.dom_sum = np.asarray(state["dom_sum"], dtype=np.float64)
        self.dom_n = np.asarray(state["dom_n"], dtype=np.float64)

    def flush(self, names: list[str]) -> dict[str, Any]:
        rec = {
            "loss": self.loss_sum / self.n if self.n else None,
            "domain_loss": {
                d: (float(self.dom_sum[i] / self.dom_n[i]) if self.dom_n[i] else None)
                for i, d in enumerate(names)
            },
        }
        self.reset()
        return rec


class _MetricsWriter:
    """Appends records to metrics.jsonl and, optionally, mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "log.tensorboard = true needs TensorBoard: pip install 'mixlab[tensorboard]'."
                ) from None
            self.tb = SummaryWriter(log_dir=str(path.parent / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for tag, value in _scalars(record):
                self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """(tag, value) pairs of a metrics record, for TensorBoard."""
    kind = record["kind"]
    out = []
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out.append((f"{kind}/{key}", float(value)))
        elif isinstance(value, dict) and key in ("domain_loss", "weights", "loss", "ppl"):
            out += [(f"{kind}/{key}/{d}", float(v)) for d, v in value.items() if v is not None]
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after checkpoint ``step`` (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    """The step bar, on a terminal only: in a log file its carriage returns are noise."""
    import sys

    from tqdm.auto import tqdm

    on_tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, initial=initial, disable=not (enabled and on_tty), unit="step",
                dynamic_ncols=True, leave=False)


def load_run_model(run_dir: str | Path, data: DataDir | None = None) -> torch.nn.Module:
    """The final model of a finished run (its ``model.safetensors`` and ``config.toml``)."""
    run = Path(run_dir)
    weights = run / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"'{run}' has no model.safetensors; is it a finished mixlab run?")
    cfg = load_config(run / "config.toml")
    run_data = DataDir.open(cfg.data.dir)
    if data is not None and run_data.manifest.tokenizer_sha256 != data.manifest.tokenizer_sha256:
        raise CheckpointError(f"run '{run}' used a different tokenizer than this run's data dir.")
    model = build_model(cfg.model, run_data.vocab_size, cfg.data.seq_len)
    load_model(model, weights)
    return model


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary written to ``out_dir/summary.json``."""
    return Trainer(cfg, out_dir).run(resume=resume, log=log)
