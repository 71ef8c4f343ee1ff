"""How an op with two implementations runs, chosen once: its PyTorch code (any device; the CPU path and the
reference) or its Triton kernel (CUDA). The SSD scan (``model.ssd_backend``) and the LM head's cross-entropy
(``model.lm_loss_backend``) are chosen here, by ``kernel_function``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum

import torch


class KernelBackend(StrEnum):
    """How a kernel of the model runs, not what it computes."""

    torch = "torch"  # the PyTorch code, any device
    triton = "triton"  # the Triton kernel, CUDA only
    auto = "auto"  # Triton on CUDA tensors when triton imports, PyTorch elsewhere


def kernel_function(
    backend: KernelBackend | str, key: str, torch_function: Callable, load_triton: Callable[[], Callable], what: str
) -> Callable:
    """The function ``key`` (``backend``) names. ``load_triton`` imports the Triton one (``what`` it is, for the
    message when that fails). Models are built on the CPU and moved afterwards, so ``auto`` cannot know their device
    here: where CUDA and triton exist it returns a function that picks by its first argument's device type (a check
    torch.compile resolves once)."""
    if backend not in set(KernelBackend):  # a plain string too: an unknown one fails here, not as ``auto``
        raise ValueError(f"{key}={backend!r} must be one of {', '.join(KernelBackend)}")
    backend = KernelBackend(backend)
    if backend is KernelBackend.torch or (backend is KernelBackend.auto and not torch.cuda.is_available()):
        return torch_function
    try:
        triton_function = load_triton()
    except ImportError as e:
        if backend is KernelBackend.triton:
            raise ValueError(f"{key}=triton: {what} does not import ({e})") from None
        return torch_function
    if backend is KernelBackend.triton:
        return triton_function
    return functools.partial(_by_device, triton_function, torch_function)


def _by_device(triton_function: Callable, torch_function: Callable, first: torch.Tensor, *args):
    return (triton_function if first.device.type == "cuda" else torch_function)(first, *args)
