"""Fully sharded data parallel training (``train.parallel = "fsdp"``) with PyTorch's FSDP2.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block (GPT
``blocks``; the decoder layers of a Hugging Face model, the classes it lists in
``_no_split_modules``) and then to the root, which keeps the embeddings, final norm and the
(tied) output layer. ``fully_shard`` works in place: the model's parameters become ``DTensor``
shards (dim 0 split over the ranks), each block all-gathers its full weights for its forward
and backward and reduce-scatters (averages) the gradients, so each rank stores 1/world of the
parameters, gradients and AdamW state. It runs under NCCL on GPUs and under gloo on the CPU.

What the loop needs besides the wrap lives here too:

- ``no_sync``: gradient accumulation without a reduce-scatter per micro-batch, and
  ``drop_unsynced_grads`` for a step skipped half-way through accumulation (FSDP2 keeps the
  accumulated, unsharded gradients outside ``.grad``, where ``zero_grad`` does not reach).
- ``mean_losses``: evaluation through the sharded module, where every rank must run the same
  number of forwards (each forward is a collective).
- ``full_model_state``/``full_optimizer_state`` gather full, unsharded tensors to rank 0 in
  exactly the layout a one-process run saves (tied weights stored once, optimizer state keyed by
  parameter index), so an FSDP checkpoint is an ordinary mixlab checkpoint; ``load_full_*``
  shard such a checkpoint back onto the ranks.

Unchanged from DDP: ``torch.nn.utils.clip_grad_norm_`` handles the DTensor gradients (its norm
is a replicated DTensor, the same on every rank) and AdamW steps the shards elementwise.
Mixers whose signals need the whole model on one rank are refused (``check_mixer``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from mixlab.errors import CheckpointError, ConfigError
from mixlab.train import evaluate
from mixlab.train.distributed import DistInfo

PROVIDES: frozenset[str] = frozenset()
"""Capabilities a sharded run gives the mixing session (``train.session.CAPABILITIES``): none,
since each rank holds only a shard of the parameters."""

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_mixer(name: str, options: dict[str, Any] | None = None) -> None:
    """Raise ``ConfigError`` when mixer ``name`` with ``options`` (its ``[mixer.options]``)
    needs a capability a sharded model lacks (``Mixer.needs_for``: e.g. Aioli only with
    ``probes = "branch"``)."""
    from mixlab.config import from_dict
    from mixlab.mixers.base import mixer_class

    cls = mixer_class(name)
    if cls.needs_for(from_dict(cls.Config, dict(options or {}), where="mixer.options")) - PROVIDES:
        raise ConfigError(
            f"mixer '{name}' needs the whole, unsharded parameters on every rank (its signals "
            "are per-sample alignments, per-domain gradients or branch copies of the model), "
            "and under train.parallel = 'fsdp' each rank holds only a shard. Use "
            "train.parallel = 'ddp' (the default) for this mixer."
        )


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become their own FSDP unit: the transformer blocks, in order."""
    from mixlab.model.gpt import GPT

    if isinstance(model, GPT):
        return list(model.blocks)
    hf = getattr(model, "hf", None)
    names = set(getattr(hf, "_no_split_modules", None) or ())
    units = [m for m in hf.modules() if type(m).__name__ in names] if hf is not None else []
    if not units:
        raise ConfigError(
            f"train.parallel = 'fsdp' cannot find the transformer blocks of {type(model).__name__}"
            + (f" ({type(hf).__name__} lists no _no_split_modules)" if hf is not None else "")
            + "; use train.parallel = 'ddp'."
        )
    return units


def shard_model(model: nn.Module, dist_info: DistInfo, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place over all ranks of ``dist_info`` (one FSDP unit per block, then
    the root) and return it. ``reshard_after_forward`` frees each block's gathered weights
    after its forward (gathering them again for the backward): less memory, more traffic."""
    device_type = torch.device(dist_info.device).type
    mesh = init_device_mesh(device_type, (dist_info.world_size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside the block; FSDP's ``no_sync``."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def drop_unsynced_grads(model: nn.Module) -> None:
    """Forget gradients accumulated under ``no_sync`` that were never reduced (a skipped step).

    FSDP2 keeps them on its unsharded parameters, which ``optimizer.zero_grad`` does not see;
    left there they would be added to the next step's gradient. There is no public API for
    this (torch 2.13), so it reaches into FSDP's parameter groups."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            if hasattr(fsdp_param, "_unsharded_param"):
                fsdp_param._unsharded_param.grad = None
            if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
                fsdp_param.unsharded_accumulated_grad = None


def mean_losses(
    model: nn.Module,
    windows: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """``evaluate.mean_losses`` for a sharded model: the same numbers, with every rank running
    the same number of forwards, each of which is a collective."""
    return evaluate.mean_losses(model, windows, batch_size, device, autocast, dist_info,
                                same_forwards=True)


# ------------------------------------------------------------------------------- checkpoints


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they name, first name first (tied weights such
    as GPT's ``head.weight is tok_emb.weight`` form one group)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded model weights on the CPU of rank 0 (an empty dict on other ranks),
    each tied tensor under its first name only, as ``checkpoint.save_model`` stores a
    one-process model. A collective: every rank must call it."""
    full = get_model_state_dict(model, options=_GATHER)
    if not full:
        return {}
    first = {names[0] for names in _tied_groups(model)}
    return {k: v for k, v in full.items() if k in first}


def load_full_model_state(model: nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` written by any run (one process, DDP or FSDP) into the sharded
    ``model``; every rank reads the file and keeps its own shard."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"cannot read model weights {path}: {exc}") from None
    full: dict[str, torch.Tensor] = {}
    missing = []
    for names in _tied_groups(model):
        found = next((n for n in names if n in tensors), None)
        if found is None:
            missing.append(names[0])
            continue
        full.update(dict.fromkeys(names, tensors[found]))
    unexpected = sorted(set(tensors) - set(full))
    if missing or unexpected:
        raise CheckpointError(
            f"model weights {path} do not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); was it written with another model config?"
        )
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter of ``optimizer``, in the order ``state_dict`` numbers them."""
    name_of = {}
    for name, p in model.named_parameters():
        name_of.setdefault(id(p), name)
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full, unsharded state on the CPU of rank 0 in ``optimizer.state_dict()``
    layout (state keyed by parameter index); an empty dict on other ranks. A collective."""
    full = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an ``optimizer.state_dict()``-layout state (from any run) into the sharded optimizer."""
    names = _param_names(model, optimizer)
    if sum(len(g["params"]) for g in state["param_groups"]) != len(names):
        raise CheckpointError("the checkpoint's optimizer state does not fit this model.")
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

