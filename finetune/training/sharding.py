"""fsdp on CPU: torch's FSDP2 over the gloo processes of a run, owned by finetune because accelerate (1.x) shards
only GPU process groups. The training loop (`training/loop.py`) asks `shards_on_cpu`, trains `CpuShards.model`
and checkpoints through `ShardedOptimizerState`."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("finetune")


def shards_on_cpu(accelerator: Accelerator, strategy: str) -> bool:
    """Whether this process trains a model sharded by finetune itself: the recipe's `distributed.strategy: fsdp`
    on several CPU processes. The recipe decides, not the launcher's environment (ACCELERATE_USE_FSDP): every rule
    about fsdp (flows/resolve.py: no GRPO sampling through shards, no learned watermark) is keyed on the recipe,
    and a recipe run under torchrun shards without an exported variable. On GPU process groups accelerate wraps
    the model in FSDP itself (`finetune run` launches with `--use_fsdp`); accelerate (1.x) does that for GPU
    groups only, so on gloo (CPU) groups `CpuShards` shards it with torch's own FSDP2."""
    from accelerate.utils import DistributedType

    return (
        strategy == "fsdp"
        and accelerator.distributed_type == DistributedType.MULTI_CPU
        and accelerator.num_processes > 1
    )


class CpuShards:
    """torch's FSDP2 (`fully_shard`) over the gloo processes of a run, for `distributed.strategy: fsdp` on CPU.

    The model trained (`model`) is a copy of the caller's `plain` model that shares its tensors, sharded per
    transformer block (the classes the transformers model names in `_no_split_modules`, as accelerate's FSDP wraps
    on GPUs) and then as a whole (the embeddings, the head, what is outside the blocks). `plain`'s parameters are
    then let go (the meta device), so each process holds 1/N of the weights, gradients and optimizer state.

    Whatever needs whole weights outside the training step (evaluation during training, the adapter in a
    checkpoint, everything after training) gets `plain` back from `gather`: the full state dict, all-gathered on
    every process (a collective: every process calls it at the same point) and assigned into `plain`'s modules,
    tied weights kept tied. `release` lets the gathered weights go again while training goes on. The sharded copy
    is only ever used by the training step, so generation (a different number of forwards on each process) never
    runs through it.
    """

    def __init__(self, plain: torch.nn.Module, accelerator: Accelerator):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.plain = plain
        # The copy shares every parameter and buffer (the memo): no second set of weights before sharding. It
        # shares the configurations too: what a forward pass writes there (a classifier's problem_type) is the
        # plain model's, as under ddp, for the adapter's saved base config.
        shared: list[Any] = [*plain.parameters(), *plain.buffers()]
        shared += [
            value
            for module in plain.modules()
            for name in ("config", "generation_config", "peft_config")
            if (value := module.__dict__.get(name)) is not None
        ]
        self.model = copy.deepcopy(plain, memo={id(value): value for value in shared})
        mesh = init_device_mesh("cpu", (accelerator.num_processes,))
        blocks = {name for module in plain.modules() for name in getattr(module, "_no_split_modules", None) or ()}
        # Innermost first: a module sharded later takes only the parameters no sharded child holds.
        sharded = [module for module in reversed(list(self.model.modules())[1:]) if type(module).__name__ in blocks]
        for module in sharded:
            fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        log.info(
            "fsdp on CPU: %d blocks and the rest of the model sharded over %d processes (torch FSDP2, gloo)",
            len(sharded),
            accelerator.num_processes,
        )
        if accelerator.native_amp:  # the autocast accelerate.prepare puts around a model's forward, as under ddp
            from accelerate.utils import convert_outputs_to_fp32
            from accelerate.utils.modeling import get_mixed_precision_context_manager

            autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
            forward = self.model.forward
            wrapped = convert_outputs_to_fp32(autocast(getattr(forward, "__func__", forward)))
            self.model.forward = MethodType(wrapped, self.model) if hasattr(forward, "__func__") else wrapped
        self.release()

    def gather(self, frozen: bool = True) -> torch.nn.Module:
        """`plain` with the trained weights, whole, on every process; `frozen=False`: the trained parameters only
        (the frozen base stays let go), enough for a checkpoint's state and adapter."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole: dict[str, Any] = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=not frozen)
        )
        self._replace(lambda name, old: whole.get(name))
        return self.plain

    def release(self) -> None:
        """`plain`'s parameters back on the meta device (no memory), until the next `gather`."""
        self._replace(lambda name, old: None if old.is_meta else torch.empty_like(old, device="meta"))

    def _replace(self, new_value: Callable[[str, torch.nn.Parameter], torch.Tensor | None]) -> None:
        """Each parameter of `plain` whose `new_value` is not None becomes a parameter of that value (the same
        requires_grad); a parameter shared by several modules (tied embeddings) stays one parameter."""
        done: dict[int, torch.nn.Parameter] = {}
        for prefix, module in self.plain.named_modules(remove_duplicate=False):
            for name, old in list(module._parameters.items()):
                if old is None:
                    continue
                if id(old) not in done:
                    value = new_value(f"{prefix}.{name}" if prefix else name, old)
                    if value is None:
                        continue
                    done[id(old)] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
                module._parameters[name] = done[id(old)]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> ShardedOptimizerState:
        return ShardedOptimizerState(self.model, optimizer)


class ShardedOptimizerState:
    """The optimizer state of a sharded model as a checkpoint keeps it: whole (gathered from every process: call
    `state_dict` on all of them) and keyed as torch keys an unsharded optimizer's (each parameter's place in the
    parameter groups), so a checkpoint holds the same files under fsdp as under ddp. Loading scatters it back."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's
        names = {id(p): name for name, p in model.named_parameters()}
        self.order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if not self.optimizer.state:
            # No update yet (a checkpoint at a skipped first step): torch's getter would initialise the state with
            # a real step at lr 0 (AdamW's step count 1), and the run would then differ from ddp's. An empty
            # state is keyed by index already, as under ddp; every process agrees it is empty (skips are agreed).
            return self.optimizer.state_dict()
        state: dict[str, Any] = dict(
            get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        )
        index = {name: i for i, name in enumerate(self.order)}
        return {
            "state": {index[name]: values for name, values in state["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not state_dict["state"]:  # saved before any update: nothing to scatter (and no state to initialise)
            self.optimizer.load_state_dict(state_dict)
            return
        named: dict[str, Any] = {
            "state": {self.order[int(i)]: values for i, values in state_dict["state"].items()},
            "param_groups": [
                {**g, "params": [self.order[int(i)] for i in g["params"]]} for g in state_dict["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.model, self.optimizer, named, options=StateDictOptions(full_state_dict=True))
