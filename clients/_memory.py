"""Training-memory estimate of a torch zoo model: what a device must hold to train it on one batch.

Private to ``clients``: call ``clients.models.estimate_training_memory_bytes``. The
estimate is float32 throughout (autocast stores most activations in 16 bits, so it
runs high there) and counts tensors only: a CUDA context (some hundreds of MB), cuDNN
workspaces and the allocator's slack come on top. With B the batch size and P the
bytes of the parameters:

    parameters P + gradients P + optimizer state (Adam 2P, SGD momentum P)
    + activations: what autograd saves for backward (parameters excluded, each storage
      once), counted on CPU forwards of 1 and 2 examples and extrapolated to B
    + backward workspace: 2 x the largest saved tensor (the gradients in flight)
    + DP-SGD only: Opacus's summed gradient and noise (2P), per-sample gradients:
      ghost mode keeps none for Linear layers (norms from activations and backprops) and
      builds one other layer's at a time (Conv2d: its unfolded input and 2 copies of its
      per-sample gradient); hooks/functorch/ew keep all of them (B x P) until the step and
      build one copy more of one layer's at a time.

No Flower or Prefect import; torch is imported by the caller's first estimate.
"""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from clients._torch_models import build_network

OPTIMIZER_STATES = {"adam": 2, "sgd": 1}  # float32 tensors of state per parameter: Adam's two moments, SGD's momentum


def saved_activation_bytes(network: nn.Module, *, input_shape: tuple[int, ...], batch_size: int) -> tuple[int, int]:
    """Return the bytes autograd saves for one forward and loss on ``batch_size`` examples, and the largest tensor."""
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes: views and repeated saves count once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        """Record the storage of a tensor autograd saves, unless it is a parameter."""
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.zeros((batch_size, *input_shape))
    saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()  # the batch itself is on the device
    network.train()  # dropout saves its masks only in training mode
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = network(x)
        F.cross_entropy(logits.float(), torch.zeros(batch_size, dtype=torch.int64))
    return sum(saved.values()), max(saved.values())


def per_sample_bytes(network: nn.Module, *, input_shape: tuple[int, ...], grad_sample_mode: str) -> tuple[int, int]:
    """Return DP-SGD's per-example bytes: the largest transient layer, and the per-sample gradients kept to the step."""
    inputs: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, tuple(args[0].shape[1:])))
             for m in network.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            network(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    transient = 0
    for module in network.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if not own or (grad_sample_mode == "ghost" and isinstance(module, nn.Linear)):
            continue  # ghost clipping: a Linear layer's norms come from activations and backprops
        unfolded = 0
        if isinstance(module, nn.Conv2d):  # Opacus unfolds the input: C_in*kh*kw values per output position
            channels, height, width = inputs[module]
            out_h, out_w = (
                (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
                for size, pad, dil, k, stride in zip((height, width), module.padding, module.dilation,
                                                      module.kernel_size, module.stride)
            )
            unfolded = channels // module.groups * prod(module.kernel_size) * out_h * out_w
        # ghost: the einsum result and its contiguous copy, freed after the norm; otherwise one copy more than kept
        transient = max(transient, 4 * (unfolded + (2 if grad_sample_mode == "ghost" else 1) * own))
    kept = 0 if grad_sample_mode == "ghost" else 4 * sum(p.numel() for p in network.parameters() if p.requires_grad)
    return transient, kept


def training_memory_breakdown(
    model_name: str, *, input_shape: tuple[int, ...], num_classes: int, batch_size: int, private: bool,
    optimizer: str = "adam", grad_sample_mode: str = "ghost",
) -> dict[str, int]:
    """Return the estimate's parts in bytes: parameters, gradients, optimizer, activations, workspace, dp."""
    with torch.random.fork_rng(devices=[]):  # weights do not matter; the caller's RNG stays untouched
        if model_name in ("transformer", "bilstm"):  # text: fed all-padding rows, read as word ids
            from clients._text_models import build_text_network

            network = build_text_network(model_name, input_shape=input_shape, num_classes=num_classes)
        else:
            network = build_network(model_name, input_shape=input_shape, num_classes=num_classes)
    params = 4 * sum(p.numel() for p in network.parameters() if p.requires_grad)
    one, largest_one = saved_activation_bytes(network, input_shape=input_shape, batch_size=1)
    two, largest_two = saved_activation_bytes(network, input_shape=input_shape, batch_size=2)
    parts = {
        "parameters": params,
        "gradients": params,
        "optimizer": OPTIMIZER_STATES[optimizer] * params,
        "activations": one + (batch_size - 1) * (two - one),  # linear in the batch, whatever does not scale kept
        "workspace": 2 * (largest_one + (batch_size - 1) * (largest_two - largest_one)),
        "dp": 0,
    }
    if private:
        transient, kept = per_sample_bytes(network, input_shape=input_shape, grad_sample_mode=grad_sample_mode)
        parts["dp"] = 2 * params + batch_size * (transient + kept)
    return parts
