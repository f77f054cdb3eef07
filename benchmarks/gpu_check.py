"""GPU check: mixlab's loop at GPT-2-small size on one GPU, in one script (<= 8 minutes on an H100/H200).

What it runs, all through mixlab's own config (``load_config`` overrides) and ``Trainer``:

1. data: the built-in corpus prepared once into ``$MIXLAB_CACHE/builtin-v50257`` (default cache
   ``./data``, as ``mixlab demo`` does), or ``--data DIR`` (a prepared data dir, e.g. one carried
   to a machine that lacks the corpus packages), or ``--data synthetic``. When the built-in
   corpus cannot be read (its packages are not installed) the script says so in the table and
   uses a synthetic data dir of the same vocabulary: throughput, memory and resume do not depend
   on what the text says.
2. a GPT of GPT-2 small's shape (12 layers, d 768, 12 heads, context 1024, the data tokenizer's
   vocabulary: 50,257 ids for the built-in corpus, ~124M parameters) under bf16 autocast
   (``train.precision = "bf16"``), every attention call restricted to the fused SDPA kernels
   (``torch.nn.attention.sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])``: a fall-back to
   the math kernel would raise instead of running slowly), for ``--steps`` (300) steps each of:
   plain training (stratified), DGA with finite-difference alignments, DWM, Aioli. For each:
   training tokens/s of the loop (``Trainer.state.tokens / elapsed_s``: probe steps and signal
   computations included, the final summary evaluation and checkpoint not) and peak GPU memory
   (``torch.cuda.max_memory_allocated``, reset before each run). A short unreported run first
   loads the CUDA kernels, so the first row does not pay for them.
3. ``torchrun --standalone --nproc_per_node 1`` (NCCL): the script's worker mode initialises an
   NCCL process group and all-reduces on the GPU, then trains an Aioli run that checkpoints
   every few steps: (a) uninterrupted, (b) uninterrupted again (determinism control), (c) killed
   with SIGKILL in the middle of a step after the last checkpoint, then (d) resumed with
   ``resume=True``. (d) must equal (a) byte for byte: model.safetensors, summary.json and
   metrics.jsonl (timings aside). The torchrun runs set ``torch.use_deterministic_algorithms(True)``
   and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (``--determinism strict``, the default) so that (b)
   can equal (a): with ``warn_only=True`` PyTorch's flash-attention backward stays
   non-deterministic (it only warns), so 'strict' is what makes a byte comparison possible on
   the GPU. If an op refuses strict mode, the runs are repeated with ``warn_only=True`` and the
   report says so; the control row says whether (b) equals (a). With one process
   (``WORLD_SIZE=1``) mixlab trains without DDP; ``--nproc N`` runs N ranks where N GPUs exist
   (NCCL refuses two ranks on one GPU).

It prints one Markdown report (a table per part) and writes it to ``--out``. Exit status 0
when every run finished and the resume comparison passed, 1 otherwise, 2 on a usage error.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu.md      # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-dry.md      # CPU, tiny model, seconds
    python benchmarks/gpu_check.py --prepare-only                       # only build the data dir

``--dry-run`` runs every part on the CPU with a 2-layer d32 model, context 32, a few steps and
a synthetic data dir (``--data builtin`` to read the built-in corpus, capped small), with gloo
instead of NCCL; the numbers mean nothing, the code paths are the GPU run's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("mixlab") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from mixlab.errors import MixlabError  # noqa: E402

BUILTIN_DOMAINS = ["code", "legal", "literature", "medical", "news"]
GIB = 1024**3


@dataclass(frozen=True)
class Sizes:
    """Model, budget and evaluation sizes of one mode (the GPU run or the CPU dry run)."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab: int
    """Tokenizer size when the script builds the data dir (a given dir keeps its own)."""
    batch: int
    steps: int
    """Steps of each throughput run."""
    warmup_run_steps: int
    """Steps of the unreported run that loads the kernels."""
    lr: float
    warmup_steps: int
    eval_windows: int
    signal_windows: int
    test_windows: int
    eval_batch: int
    resume_steps: int
    """Steps of each torchrun run."""
    ckpt_every: int
    die_after: int
    """The cut run is killed during step die_after + 1 (after the checkpoint of step
    ckpt_every * floor(die_after / ckpt_every))."""
    target_docs: int
    dga: dict[str, Any] = field(default_factory=dict)
    dwm: dict[str, Any] = field(default_factory=dict)
    aioli: dict[str, Any] = field(default_factory=dict)
    aioli_resume: dict[str, Any] = field(default_factory=dict)
    synthetic_docs: int = 300
    synthetic_doc_len: int = 1100
    builtin_max_bytes: int = 0
    """Cap per built-in domain (0 = prepare's default, 6 MB)."""


GPU = Sizes(
    n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab=50257, batch=16, steps=300,
    warmup_run_steps=10, lr=6e-4, warmup_steps=30, eval_windows=8, signal_windows=8,
    test_windows=16, eval_batch=32, resume_steps=30, ckpt_every=10, die_after=15, target_docs=20,
    # As in configs/demo.toml, scaled to 300 steps: DGA updates every 10 steps from 8 target
    # windows; DWM trains in 5 stages of 10 updates; Aioli runs 3 rounds of 100 steps, each
    # probing 5 domains x 2 sweeps x 2 steps.
    dga={"method": "fd", "update_every": 10, "target_windows": 8},
    dwm={"stages": 5, "updates_per_stage": 10},
    aioli={"round_steps": 100, "lp_rounds": 2, "lp_steps": 2},
    aioli_resume={"round_steps": 15, "lp_rounds": 1, "lp_steps": 1},
)
DRY = Sizes(
    n_layer=2, n_head=2, d_model=32, seq_len=32, vocab=512, batch=8, steps=12,
    warmup_run_steps=2, lr=3e-3, warmup_steps=2, eval_windows=4, signal_windows=4,
    test_windows=4, eval_batch=16, resume_steps=12, ckpt_every=4, die_after=6, target_docs=6,
    dga={"method": "fd", "update_every": 3, "target_windows": 3},
    dwm={"stages": 2, "updates_per_stage": 2},
    aioli={"round_steps": 6, "lp_rounds": 1, "lp_steps": 1},
    aioli_resume={"round_steps": 6, "lp_rounds": 1, "lp_steps": 1},
    synthetic_docs=40, synthetic_doc_len=80, builtin_max_bytes=600_000,
)

# The rows of the throughput table: label -> (what it runs, in words).
METHODS = {
    "plain (stratified)": "mixer stratified",
    "DGA (fd alignments)": "mixer dga, method fd",
    "DWM": "mixer stratified + weighting dwm",
    "Aioli": "mixer aioli",
}
RESUME_ROWS = ("process group", "uninterrupted run, twice", "killed, then resumed")


def _say(text: str) -> None:
    print(f"[gpu_check] {text}", file=sys.stderr, flush=True)


def _toml(value: Any) -> str:
    """A TOML value for a ``key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def _options(prefix: str, options: dict[str, Any]) -> list[str]:
    return [f"{prefix}.{k}={_toml(v)}" for k, v in options.items()]


# ---------------------------------------------------------------------------------------------
# Attention kernel


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Only the fused SDPA kernels may run: a shape or dtype they refuse raises instead of
    falling back to the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        yield


def attention_kernel(device: torch.device, sizes: Sizes) -> str:
    """Which fused kernel serves the model's attention (its shapes, bf16 autocast, causal,
    forward and backward): 'flash', else 'efficient'; raises if neither does."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    head = sizes.d_model // sizes.n_head
    shape = (2, sizes.n_head, sizes.seq_len, head)
    errors = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        try:
            with sdpa_kernel([backend]), torch.autocast(device.type, dtype=torch.bfloat16):
                y = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                   is_causal=True)
            y.float().sum().backward()
            return name
        except RuntimeError as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0]}")
    raise MixlabError(f"no fused attention kernel runs the model's attention here: {errors}")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Data:
    path: Path
    note: str


def build_data(choice: str, sizes: Sizes, work: Path, fallback: bool = True) -> Data:
    """The data dir to train on: 'builtin' (prepared once into the cache; a synthetic one when
    that fails and ``fallback``), 'synthetic', or the path of a prepared data dir."""
    from mixlab.data.format import DataDir

    if choice not in ("builtin", "synthetic"):
        data = DataDir.open(choice)
        return Data(Path(choice), f"the prepared data dir `{choice}` ({data.manifest.source})")
    if choice == "builtin":
        from mixlab.data.prepare import PrepareConfig, prepare
        from mixlab.orchestrate.demo import cache_dir

        cap = sizes.builtin_max_bytes or None
        name = f"builtin-v{sizes.vocab}" + (f"-cap{cap}" if cap else "")
        out = cache_dir() / name
        _say(f"data: the built-in corpus -> {out} (built once, then reused)")
        try:
            prepare(PrepareConfig(source="builtin", out=str(out), vocab_size=sizes.vocab,
                                  max_bytes_per_domain=cap, workers=0),
                    log=lambda msg: _say(f"  {msg}"))
            return Data(out, f"the built-in corpus, tokenizer of {sizes.vocab:,} ids (`{out}`)")
        except (MixlabError, ImportError) as exc:
            if not fallback:
                raise MixlabError(f"the built-in corpus cannot be prepared here: {exc}") from exc
            reason = str(exc).splitlines()[0]
            _say(f"data: the built-in corpus cannot be prepared here ({reason}); using a "
                 "synthetic data dir of the same vocabulary")
            fallback = f"synthetic (the built-in corpus could not be prepared here: {reason})"
    else:
        fallback = "synthetic"
    from mixlab.data.synthetic import make_synthetic_datadir

    out = make_synthetic_datadir(
        work / "data", dict.fromkeys(BUILTIN_DOMAINS, sizes.synthetic_docs),
        vocab_size=sizes.vocab, doc_len=sizes.synthetic_doc_len,
        split_docs={"val": 3 * sizes.target_docs, "test": 3 * sizes.target_docs},
    )
    return Data(out, f"{fallback}: 5 domains of patterned token streams, {sizes.vocab:,} ids")


# ---------------------------------------------------------------------------------------------
# Configs


def base_overrides(data_dir: Path, sizes: Sizes, device: str) -> list[str]:
    return [
        f"data.dir={_toml(str(data_dir))}", f"data.seq_len={sizes.seq_len}",
        "model.kind='gpt'", f"model.n_layer={sizes.n_layer}", f"model.n_head={sizes.n_head}",
        f"model.d_model={sizes.d_model}", "model.attention='sdpa'",
        f"train.batch_size={sizes.batch}", "train.precision='bf16'", f"train.device='{device}'",
        "train.progress=false", "train.log_every=10", "train.seed=0",
        f"optim.lr={sizes.lr}", f"optim.warmup_steps={sizes.warmup_steps}",
        "eval.every=0", f"eval.windows={sizes.eval_windows}",
        f"eval.signal_windows={sizes.signal_windows}", f"eval.test_windows={sizes.test_windows}",
        f"eval.batch_size={sizes.eval_batch}", "checkpoint.every=0", "checkpoint.minutes=0",
    ]


def method_overrides(label: str, sizes: Sizes, target_domain: str) -> list[str]:
    if label == "plain (stratified)":
        return ["mixer.name='stratified'"]
    if label == "DGA (fd alignments)":
        return ["mixer.name='dga'", *_options("mixer.options", sizes.dga),
                f"target.domain={_toml(target_domain)}", f"target.docs={sizes.target_docs}"]
    if label == "DWM":
        return ["mixer.name='stratified'", "weighting.name='dwm'",
                *_options("weighting.options", sizes.dwm)]
    if label == "Aioli":
        return ["mixer.name='aioli'", *_options("mixer.options", sizes.aioli)]
    raise ValueError(label)


# ---------------------------------------------------------------------------------------------
# Part 2: throughput and memory, in this process


@dataclass
class Row:
    label: str
    steps: int = 0
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    wall_s: float = 0.0
    loss: float | None = None
    avg_ppl: float | None = None
    error: str = ""


def _last_train_loss(run: Path) -> float | None:
    loss = None
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train" and rec.get("loss") is not None:
            loss = float(rec["loss"])
    return loss


OVER_BUDGET = "skipped: the time budget (--budget-s) was used up"


def measure(label: str, overrides: list[str], out: Path, device: torch.device,
            deadline: float) -> Row:
    """Train one run in this process; its tokens/s and peak memory (skipped past deadline,
    a ``time.perf_counter`` value)."""
    from mixlab.train.config import load_config
    from mixlab.train.loop import Trainer

    row = Row(label)
    if time.perf_counter() > deadline:
        row.error = OVER_BUDGET
        return row
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(load_config(None, overrides), out)
        with fused_attention():
            summary = trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row.peak_bytes = torch.cuda.max_memory_allocated(device)
        row.steps = trainer.state.step
        row.tokens_per_s = trainer.state.tokens / max(trainer.state.elapsed_s, 1e-9)
        row.loss = _last_train_loss(out)
        row.avg_ppl = float(summary["test"]["avg_ppl"])
        del trainer
    except Exception as exc:  # a failed row is reported, the other rows still run
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _say(f"{label}: FAILED: {row.error}")
    row.wall_s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)  # a 124M run dir holds ~2 GB of checkpoint
    return row


# ---------------------------------------------------------------------------------------------
# Part 3: torchrun, checkpoint and resume


def worker(spec_path: str) -> int:
    """One rank of a torchrun run (``--worker SPEC.json``): join the process group, check one
    all-reduce, train (or resume), optionally die by SIGKILL in the middle of a step."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec["determinism"] != "off":
        torch.use_deterministic_algorithms(True, warn_only=spec["determinism"] == "warn")
    import torch.distributed as dist

    from mixlab.train.config import load_config
    from mixlab.train.loop import Trainer

    cfg = load_config(None, spec["overrides"])
    cuda = cfg.train.device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    report: dict[str, Any] = {"world_size": world}
    if "WORLD_SIZE" in os.environ:
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        one = torch.ones(1, device=torch.device("cuda", local) if cuda else "cpu")
        dist.all_reduce(one)
        dist.barrier()
        report.update(backend=dist.get_backend(), all_reduce=float(one.item()))
    trainer = Trainer(cfg, spec["out"])
    die_after = int(spec.get("die_after", 0))
    if die_after:
        real, calls = trainer.train_step, {"n": 0}

        def dying_step(plan):  # kill -9 in the middle of step die_after + 1: no handler runs
            calls["n"] += 1
            if calls["n"] > die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(plan)

        trainer.train_step = dying_step
    with fused_attention():
        trainer.run(resume=bool(spec["resume"]))
    if rank == 0:
        Path(spec["report"]).write_text(json.dumps(report), encoding="utf-8")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _mixlab_path() -> str:
    import mixlab

    return str(Path(mixlab.__file__).resolve().parents[1])


def torchrun(name: str, overrides: list[str], work: Path, nproc: int, determinism: str,
             deadline: float, resume: bool = False, die_after: int = 0) -> tuple[int, Path]:
    """Run the worker under ``torchrun --standalone``, stopped (its whole process group) at
    ``deadline``; returns (exit status, 124 when stopped or skipped; log path)."""
    spec = work / f"{name}{'-resume' if resume else ''}.json"
    log = spec.with_suffix(".log")
    remaining = deadline - time.perf_counter()
    if remaining < 5:
        log.write_text(OVER_BUDGET + "\n", encoding="utf-8")
        return 124, log
    spec.write_text(json.dumps({
        "overrides": overrides, "out": str(work / name), "resume": resume,
        "die_after": die_after, "determinism": determinism,
        "report": str(spec.with_suffix(".report.json")),
    }), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_mixlab_path(), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("OMP_NUM_THREADS", "1")
    if determinism != "off":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS workspaces
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--worker", str(spec)]
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: their own group
            proc.wait()
            fh.write(f"\n{OVER_BUDGET}: stopped\n")
            rc = 124
    return rc, log


def _strip_metrics(run: Path) -> list[dict[str, Any]]:
    out = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        rec.pop("tokens_per_s", None)
        rec.pop("elapsed_s", None)
        out.append(rec)
    return out


def compare_runs(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two run dirs hold the same run: bytes of model.safetensors (and dwm.safetensors),
    summary.json and metrics.jsonl without the fields that measure time."""
    from mixlab.train.loop import TIMING_KEYS

    for run in (a, b):
        if not (run / "summary.json").is_file():
            return False, f"{run.name} did not finish (no summary.json)"
    same, what = [], []
    for name in ("model.safetensors", "dwm.safetensors"):
        if (a / name).exists() or (b / name).exists():
            ok = (a / name).read_bytes() == (b / name).read_bytes()
            same.append(ok)
            what.append(f"{name} bytes {'equal' if ok else 'differ'}")
            if not ok and name == "model.safetensors":
                what[-1] += f" (max |Δθ| = {_max_param_diff(a / name, b / name):.3g})"

    def strip(s: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k not in TIMING_KEYS}

    ok = strip(json.loads((a / "summary.json").read_text())) == strip(
        json.loads((b / "summary.json").read_text()))
    same.append(ok)
    what.append(f"summary.json {'equal' if ok else 'differs'}")
    ok = _strip_metrics(a) == _strip_metrics(b)
    same.append(ok)
    what.append(f"metrics.jsonl {'equal' if ok else 'differs'}")
    return all(same), ", ".join(what)


def _max_param_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if k in tb)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


NOT_DETERMINISTIC = "does not have a deterministic implementation"


def resume_check(base: list[str], sizes: Sizes, work: Path, nproc: int, determinism: str,
                 device: str, deadline: float) -> tuple[list[Check], str]:
    """Uninterrupted, again, killed + resumed, each under torchrun: the three checks, and the
    determinism mode they ran under ('strict' falls back to 'warn' when an op refuses it)."""
    overrides = [
        *base, "mixer.name='aioli'", *_options("mixer.options", sizes.aioli_resume),
        f"train.steps={sizes.resume_steps}", "train.log_every=1",
        f"eval.every={sizes.ckpt_every}", f"checkpoint.every={sizes.ckpt_every}",
        "checkpoint.keep=2",
    ]
    backend = "NCCL" if device == "cuda" else "gloo"
    checks: list[Check] = []
    _say(f"torchrun: uninterrupted run ({sizes.resume_steps} steps, {nproc} process(es))")
    rc, log = torchrun("full", overrides, work, nproc, determinism, deadline)
    if rc != 0 and determinism == "strict" and NOT_DETERMINISTIC in log.read_text(errors="replace"):
        _say("torchrun: an op has no deterministic implementation; again with warn_only=True")
        shutil.rmtree(work / "full", ignore_errors=True)
        determinism = "warn"
        rc, log = torchrun("full", overrides, work, nproc, determinism, deadline)
    report_path = work / "full.report.json"
    if rc == 0 and report_path.is_file():
        rep = json.loads(report_path.read_text(encoding="utf-8"))
        ok = rep.get("all_reduce") == float(nproc) and rep.get("backend", "").upper() == backend.upper()
        checks.append(Check(RESUME_ROWS[0], ok, f"{rep.get('backend')} process group of "
                            f"{rep['world_size']} rank(s); all_reduce(1) = {rep.get('all_reduce')}"))
    else:
        checks.append(Check(RESUME_ROWS[0], False, f"torchrun exited {rc}: {_tail(log)}"))
        return checks, determinism
    _say("torchrun: the same run again (determinism control)")
    rc, log = torchrun("again", overrides, work, nproc, determinism, deadline)
    ok, detail = compare_runs(work / "full", work / "again") if rc == 0 else (
        False, f"torchrun exited {rc}: {_tail(log)}")
    checks.append(Check(RESUME_ROWS[1], ok, detail))

    last_ckpt = sizes.ckpt_every * (sizes.die_after // sizes.ckpt_every)
    _say(f"torchrun: a run killed (SIGKILL) during step {sizes.die_after + 1}, then resumed")
    rc_cut, log_cut = torchrun("cut", overrides, work, nproc, determinism, deadline,
                               die_after=sizes.die_after)
    cut = work / "cut"
    ckpts = sorted(p.name for p in (cut / "checkpoints").glob("step-*")) if cut.exists() else []
    if rc_cut == 0 or (cut / "summary.json").exists() or not ckpts:
        checks.append(Check(RESUME_ROWS[2], False, f"the cut run did not die as planned (exit "
                            f"{rc_cut}, checkpoints {ckpts}): {_tail(log_cut)}"))
        return checks, determinism
    rc, log = torchrun("cut", overrides, work, nproc, determinism, deadline, resume=True)
    if rc != 0:
        checks.append(Check(RESUME_ROWS[2], False, f"the resume exited {rc}: {_tail(log)}"))
        return checks, determinism
    ok, detail = compare_runs(work / "full", cut)
    checks.append(Check(
        RESUME_ROWS[2], ok,
        f"SIGKILL during step {sizes.die_after + 1} (torchrun exit {rc_cut}), resumed from "
        f"{ckpts[-1]} (expected step-{last_ckpt:07d}); vs the uninterrupted run: {detail}",
    ))
    return checks, determinism


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-600:]


# ---------------------------------------------------------------------------------------------
# Report


def _failed(error: str) -> str:
    return error if error == OVER_BUDGET else f"FAILED: {error}"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(facts: list[str], rows: list[Row], checks: list[Check], passed: bool,
             note: str) -> str:
    plain = next((r.tokens_per_s for r in rows if r.label == "plain (stratified)"), None)
    lines = ["# mixlab GPU check", "", *(f"- {f}" for f in facts), ""]
    lines += ["## Training throughput and peak memory", "",
              "| run | what it trains | steps | tokens/s | vs plain | peak memory (GiB) | "
              "wall time (s) | last train loss | avg test PPL |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.label} | {METHODS[r.label]} | {_failed(r.error)} "
                         "| – | – | – | – | – | – |")
            continue
        ratio = f"{r.tokens_per_s / plain:.2f}×" if plain and r.tokens_per_s else "–"
        peak = _fmt(r.peak_bytes / GIB, ".2f") if r.peak_bytes is not None else "n/a (CPU)"
        lines.append(
            f"| {r.label} | {METHODS[r.label]} | {r.steps} | {_fmt(r.tokens_per_s, ',.0f')} | "
            f"{ratio} | {peak} | {r.wall_s:.1f} | {_fmt(r.loss, '.4f')} | "
            f"{_fmt(r.avg_ppl, '.2f')} |")
    lines += ["", "## Checkpoint and resume under torchrun", "",
              "| check | result | detail |", "| --- | --- | --- |"]
    for c in checks:
        result = ("identical" if c.ok else "DIFFERENT") if c.name != RESUME_ROWS[0] else (
            "ok" if c.ok else "FAILED")
        lines.append(f"| {c.name} | {result} | {c.detail} |")
    lines += ["", f"Resume comparison: {'PASSED' if passed else 'FAILED'}", ""]
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the report to this Markdown file")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny model, a few steps, synthetic data (seconds)")
    ap.add_argument("--data", help="'builtin' (default on the GPU), 'synthetic' (default with "
                    "--dry-run), or a prepared data dir")
    ap.add_argument("--steps", type=int, help="steps of each throughput run (default: 300; dry 12)")
    ap.add_argument("--batch", type=int, help="batch size in samples (default: 16; dry 8)")
    ap.add_argument("--nproc", type=int, default=1, help="torchrun ranks (one GPU each)")
    ap.add_argument("--determinism", choices=["strict", "warn", "off"], default="strict",
                    help="torch.use_deterministic_algorithms in the torchrun runs: True "
                    "(strict), True with warn_only (warn), not set (off); default %(default)s")
    ap.add_argument("--budget-s", type=float, help="stop starting runs after this many seconds "
                    "from the start (default: 450 on the GPU, 1200 with --dry-run)")
    ap.add_argument("--work", help="scratch dir for run dirs (default: a temporary dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--prepare-only", action="store_true", help="build the data dir and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    start = time.perf_counter()
    sizes = DRY if args.dry_run else GPU
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.dry_run else 450.0
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    if args.batch:
        sizes = replace(sizes, batch=args.batch)
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    elif not args.prepare_only:
        print("gpu_check: error: no CUDA device; run with --dry-run on a CPU.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mixlab-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, sizes, device, work, start)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, sizes: Sizes, device: torch.device, work: Path,
         start: float) -> int:
    from mixlab.data.format import DataDir
    from mixlab.model import build_model, count_parameters

    try:
        data = build_data(args.data or ("synthetic" if args.dry_run else "builtin"), sizes, work,
                          fallback=not args.prepare_only)
    except MixlabError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if args.prepare_only:
        print(f"data dir: {data.path} ({data.note})")
        return 0
    dd = DataDir.open(data.path)
    domains = dd.domains
    target = "medical" if "medical" in domains else domains[0]
    base = base_overrides(data.path, sizes, device.type)
    from mixlab.train.config import load_config

    cfg = load_config(None, base)
    n_params = count_parameters(build_model(cfg.model, dd.vocab_size, sizes.seq_len))
    kernel = attention_kernel(device, sizes)
    _say(f"model: {n_params / 1e6:.2f}M parameters; attention kernel: {kernel}; device {device}")

    warm = base + method_overrides("plain (stratified)", sizes, target) + [
        f"train.steps={sizes.warmup_run_steps}"]
    _say(f"warm-up run ({sizes.warmup_run_steps} steps, not reported)")
    deadline = start + args.budget_s
    measure("plain (stratified)", warm, work / "warmup", device, deadline)
    rows = []
    for label in METHODS:
        _say(f"{label}: {sizes.steps} steps")
        over = base + method_overrides(label, sizes, target) + [f"train.steps={sizes.steps}"]
        rows.append(measure(label, over, work / label.split()[0].lower(), device, deadline))
        r = rows[-1]
        if not r.error:
            _say(f"  {r.tokens_per_s:,.0f} tokens/s, {r.wall_s:.1f} s")

    checks, determinism = resume_check(base, sizes, work, args.nproc, args.determinism,
                                       device.type, deadline)
    resume_ok = len(checks) == 3 and checks[0].ok and checks[2].ok
    passed = resume_ok and not any(r.error for r in rows)

    took = time.perf_counter() - start
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}, "
                 f"torch {torch.__version__}")
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    command = "python benchmarks/gpu_check.py " + " ".join(argv_for_report(sys.argv[1:]))
    tokens_per_step = sizes.batch * sizes.seq_len
    facts = [
        f"command: `{command.strip()}`" + (" — **dry run on the CPU: the numbers mean nothing**"
                                           if args.dry_run else ""),
        f"device: {where}; total wall time {took / 60:.1f} min",
        f"model: GPT, {sizes.n_layer} layers, d {sizes.d_model}, {sizes.n_head} heads, context "
        f"{sizes.seq_len}, vocabulary {dd.vocab_size:,}: {n_params / 1e6:.2f}M parameters",
        "precision: bf16 autocast (train.precision = 'bf16'); attention: SDPA restricted to the "
        f"fused kernels (flash, efficient); the model's attention runs on: {kernel}",
        f"data: {data.note}; domains {', '.join(domains)}; DGA's target: {sizes.target_docs} "
        f"held-out '{target}' documents",
        f"budget: {sizes.steps} steps × {sizes.batch} × {sizes.seq_len} = "
        f"{sizes.steps * tokens_per_step:,} training tokens per run; tokens/s counts the loop "
        "(probe steps and signals included, the final evaluation and checkpoint not)",
        f"torchrun: {args.nproc} process(es), {sizes.resume_steps} steps of Aioli, a "
        f"checkpoint every {sizes.ckpt_every} steps; torch.use_deterministic_algorithms: "
        + {"strict": "True", "warn": "True, warn_only=True", "off": "not set"}[determinism]
        + (" (strict mode was refused by an op)" if determinism != args.determinism else ""),
    ]
    note = ""
    if not resume_ok and len(checks) >= 2 and not checks[1].ok:
        note = ("The uninterrupted run was not reproduced by a second one either: the GPU run is "
                "not deterministic here, so a resumed run cannot be compared byte for byte.")
    report = markdown(facts, rows, checks, passed, note)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report, encoding="utf-8")
        _say(f"wrote {args.out}")
    return 0 if passed else 1


def argv_for_report(argv: list[str]) -> list[str]:
    """The command line as given, without --work/--keep (scratch details)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--work":
            skip = True
            continue
        if a.startswith("--work=") or a == "--keep":
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
