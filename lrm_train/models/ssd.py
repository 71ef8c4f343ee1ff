"""The Mamba2 state-space scan in its chunked "state-space duality" (SSD) form, in plain PyTorch.

Per head h, with a scalar decay ``a_t = exp(dt_t * A_h)``, the recurrence is

    state_t = a_t * state_{t-1} + dt_t * x_t B_t^T        ([head_dim, d_state])
    y_t     = state_t C_t + D_h * x_t

The chunked form computes the same thing with matmuls: inside each chunk of ``chunk_size`` steps an attention-like
masked product (``C B^T`` weighted by the decays), across chunks a short recurrence over the chunk-final states.
A sequence whose length is not a multiple of the chunk is padded at the end with ``dt = 0`` steps; by causality
the padding never reaches a real position, and it is cut off before returning.

Heads are grouped: the ``heads // groups`` heads of a group share one B and one C, and B/C are never repeated per head.
The scan runs in float32 whatever the autocast state: its cumulative decays are too sensitive for bf16.

This is the CPU scan and the reference; ``models.ssd_triton`` is the GPU one. ``ssd_scan_function`` gives the scan
that ``model.ssd_backend`` names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lrm_train.nn.kernels import KernelBackend, kernel_function

ScanFunction = Callable[..., torch.Tensor]  # (x, dt, A, B, C, D, chunk_size) -> y, as ssd_chunked_scan


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for i >= j, ``-inf`` above the diagonal.

    Summing the masked terms directly (instead of differencing one long cumulative sum) keeps the decays exact
    when the cumulative sum grows large.
    """
    n = a.size(-1)
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    terms = a[..., :, None].expand(*a.shape, n).masked_fill(~strictly_lower, 0.0)
    sums = terms.cumsum(dim=-2)
    return sums.masked_fill(~strictly_lower.logical_or(torch.eye(n, dtype=torch.bool, device=a.device)), -torch.inf)


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """x [b, T, heads, p]; dt [b, T, heads] (after softplus); A, D [heads]; B, C [b, T, groups, n] -> y like x."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = x.dtype
        x, dt, A, B, C, D = (t.float() for t in (x, dt, A, B, C, D))
        batch, length, heads, head_dim = x.shape
        groups = B.shape[2]
        pad = -length % chunk_size
        skip = D[:, None] * x
        x = x * dt[..., None]
        decay = dt * A  # log of the per-step decay, <= 0
        if pad:
            x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
            decay = F.pad(decay, (0, 0, 0, pad))
        chunks = (length + pad) // chunk_size

        # b=batch, c=chunk, l/s=position in chunk, g=group, e=head within group, p=head_dim, n=d_state
        x = x.reshape(batch, chunks, chunk_size, groups, heads // groups, head_dim)
        B = B.reshape(batch, chunks, chunk_size, groups, -1)
        C = C.reshape(batch, chunks, chunk_size, groups, -1)
        decay = decay.reshape(batch, chunks, chunk_size, groups, heads // groups).permute(0, 3, 4, 1, 2)  # bgecl
        decay_cum = decay.cumsum(dim=-1)

        # 1. Within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(decay_{s+1..l}) x_s.
        scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)
        weights = scores[:, :, :, None] * torch.exp(_segment_sum(decay)).permute(0, 3, 1, 2, 4, 5)  # bcgels
        y = torch.einsum("bcgels,bcsgep->bclgep", weights, x)

        # 2. Each chunk's own contribution to the state at its end.
        to_chunk_end = torch.exp(decay_cum[..., -1:] - decay_cum).permute(0, 3, 4, 1, 2)  # bclge
        chunk_states = torch.einsum("bclgn,bclgep->bcgepn", B, x * to_chunk_end[..., None])

        # 3. Across chunks: the state entering each chunk (the first one starts from zero).
        chunk_decay = F.pad(decay_cum[..., -1], (1, 0))  # bge(c+1)
        across = torch.exp(_segment_sum(chunk_decay))  # bgezc: from the end of chunk c-1 to the start of chunk z
        chunk_states = F.pad(chunk_states, (0, 0, 0, 0, 0, 0, 0, 0, 1, 0))
        entering = torch.einsum("bgezc,bcgepn->bzgepn", across, chunk_states)[:, :-1]

        # 4. What the entering state adds to every position of its chunk.
        from_chunk_start = torch.exp(decay_cum).permute(0, 3, 4, 1, 2)  # bclge
        y = y + torch.einsum("bclgn,bcgepn->bclgep", C, entering) * from_chunk_start[..., None]

        y = y.reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
        return (y + skip).to(dtype)


def ssd_scan_function(backend: KernelBackend | str) -> ScanFunction:
    """The scan ``model.ssd_backend`` names (``nn.kernels``): this module's, or ``models.ssd_triton``'s on CUDA."""
    return kernel_function(backend, "model.ssd_backend", ssd_chunked_scan, _triton_scan, "the Triton scan")


def _triton_scan() -> ScanFunction:
    from lrm_train.models.ssd_triton import ssd_scan

    return ssd_scan
