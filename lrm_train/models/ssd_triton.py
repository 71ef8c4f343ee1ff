"""The SSD scan of ``models.ssd`` as Triton kernels, forward and backward, registered as one opaque torch op.

Same inputs, outputs and chunked algorithm as ``ssd.ssd_chunked_scan`` (the reference), in the structure of
mamba_ssm's kernels. Per chunk of ``chunk_size`` steps and head, with ``s`` the cumulative log decay inside the chunk:

    chunk state    S_c       = sum_s exp(s_last - s_s) dt_s x_s B_s^T
    state passing  S_in(c+1) = exp(s_last(c)) S_in(c) + S_c            (sequential over chunks, S_in(0) = 0)
    chunk scan     y_l       = sum_{s<=l} (C_l . B_s) exp(s_l - s_s) dt_s x_s + exp(s_l) S_in C_l + D x_l

The backward recomputes the states instead of storing them, then runs the same three steps in reverse. Matmul
operands are in the inputs' dtype (bf16 under autocast: tensor cores) and every sum accumulates in float32; the
states between chunks are float32. The heads of a group share one B and one C: kernels index B/C by group, and the
B/C gradients are summed over the group's heads inside one program, so nothing is repeated per head. Sequences of
any length are masked, never padded.

The kernels need CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set before this module is imported
(how the tests run them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = triton.knobs.runtime.interpret
_HALF_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# float32 matmuls on tensor cores keep float32 accuracy with three tf32 products (bf16/fp16 operands ignore this).
FP32_PRECISION = tl.constexpr("tf32x3")


def _block(size: int, cap: int | None = None) -> int:
    """A power-of-two tile covering ``size`` (up to ``cap``); at least 16, the smallest ``tl.dot`` accepts."""
    block = max(16, triton.next_power_of_2(size))
    return min(block, cap) if cap else block


@triton.jit
def _load_group_rows(ptr, b, g, t, offs_n, stride_b, stride_t, stride_g, stride_n, mask):
    """The rows t (positions of a chunk) of a group's B or C, [positions, d_state block]."""
    return tl.load(
        ptr + b * stride_b + g * stride_g + t[:, None] * stride_t + offs_n[None, :] * stride_n, mask=mask, other=0.0
    )


@triton.jit
def _decay_weights(s_ptr, offs_l, chunk_size, FROM_END: tl.constexpr, dt_ptr, dt_offs, valid):
    """Per position of a chunk: ``exp(s_last - s_l) * dt_l`` (what reaches the chunk's end) or ``exp(s_l)``
    (what the chunk's entering state keeps at l); zero off the sequence."""
    s = tl.load(s_ptr + offs_l, mask=offs_l < chunk_size, other=0.0)
    if FROM_END:
        s_last = tl.load(s_ptr + chunk_size - 1)
        dt = tl.load(dt_ptr + dt_offs, mask=valid, other=0.0).to(tl.float32)
        weights = tl.exp(s_last - s) * dt
    else:
        weights = tl.exp(s)
    return tl.where(valid, weights, 0.0)


@triton.jit
def _chunk_outer_sum_kernel(
    u_ptr, v_ptr, dt_ptr, s_ptr, out_ptr,
    length, heads, heads_per_group, chunks, chunk_size, head_dim, d_state,
    su_b, su_t, su_h, su_p, sv_b, sv_t, sv_g, sv_n, sdt_b, sdt_t, sdt_h,
    FROM_END: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``out[b, h, c] = sum_l w_l u_l v_l^T`` over chunk c: the chunk states (u = x, v = B, w = exp(s_last - s) dt)
    or, in the backward, the state gradients the chunk's outputs give (u = dy, v = C, w = exp(s))."""
    pid_bh, c, pid_pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // heads, pid_bh % heads
    g = h // heads_per_group
    p_blocks = tl.cdiv(head_dim, BLOCK_P)
    offs_p = (pid_pn % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    t = c * chunk_size + offs_l
    valid = (offs_l < chunk_size) & (t < length)

    s_chunk = s_ptr + (pid_bh * chunks + c) * chunk_size
    weights = _decay_weights(s_chunk, offs_l, chunk_size, FROM_END, dt_ptr + b * sdt_b + h * sdt_h, t * sdt_t, valid)
    u = tl.load(
        u_ptr + b * su_b + h * su_h + t[:, None] * su_t + offs_p[None, :] * su_p,
        mask=valid[:, None] & (offs_p[None, :] < head_dim),
        other=0.0,
    )
    v = _load_group_rows(v_ptr, b, g, t, offs_n, sv_b, sv_t, sv_g, sv_n, valid[:, None] & (offs_n[None, :] < d_state))
    weighted = (u.to(tl.float32) * weights[:, None]).to(DOT_DTYPE)
    out = tl.dot(tl.trans(weighted), v.to(DOT_DTYPE), input_precision=FP32_PRECISION)
    out_chunk = out_ptr + (pid_bh * chunks + c) * head_dim * d_state
    tl.store(
        out_chunk + offs_p[:, None] * d_state + offs_n[None, :],
        out,
        mask=(offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state),
    )


@triton.jit
def _state_passing_kernel(states_ptr, s_ptr, chunks, chunk_size, state_size, BLOCK: tl.constexpr):
    """In place, chunk after chunk: each chunk's own state becomes the state entering it."""
    pid_bh, pid = tl.program_id(0), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    state = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(chunks):
        ptrs = states_ptr + (pid_bh * chunks + c) * state_size + offs
        own = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, state, mask=mask)
        chunk_decay = tl.exp(tl.load(s_ptr + (pid_bh * chunks + c) * chunk_size + chunk_size - 1))
        state = chunk_decay * state + own


@triton.jit
def _state_passing_backward_kernel(
    grads_ptr, states_ptr, s_ptr, d_s_last_ptr, chunks, chunk_size, state_size, BLOCK: tl.constexpr
):
    """In place, chunk after chunk from the last: the state gradient each chunk's outputs give becomes the gradient
    of the state leaving that chunk (``dS_in(c+1)``); also each block's part of the gradient of ``s_last(c)``."""
    pid_bh, pid = tl.program_id(0), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    leaving = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(chunks):
        c = chunks - 1 - i
        ptrs = grads_ptr + (pid_bh * chunks + c) * state_size + offs
        from_outputs = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, leaving, mask=mask)
        entering_state = tl.load(states_ptr + (pid_bh * chunks + c) * state_size + offs, mask=mask, other=0.0)
        chunk_decay = tl.exp(tl.load(s_ptr + (pid_bh * chunks + c) * chunk_size + chunk_size - 1))
        tl.store(
            d_s_last_ptr + (pid * tl.num_programs(0) + pid_bh) * chunks + c,
            chunk_decay * tl.sum(leaving * entering_state),
        )
        leaving = from_outputs + chunk_decay * leaving


@triton.jit
def _causal_decay(s_ptr, offs_l, chunk_size):
    """``exp(s_l - s_s)`` for s <= l < chunk_size, else 0: masked before the exp, which would overflow above the
    diagonal and in the rows past a chunk size that is not a power of two."""
    s = tl.load(s_ptr + offs_l, mask=offs_l < chunk_size, other=0.0)
    causal = (offs_l[:, None] >= offs_l[None, :]) & (offs_l[:, None] < chunk_size)
    return s, tl.exp(tl.where(causal, s[:, None] - s[None, :], -float("inf")))


@triton.jit
def _chunk_scan_kernel(
    x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, s_ptr, states_ptr, y_ptr,
    length, heads, heads_per_group, chunks, chunk_size, head_dim, d_state,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n,
    sy_b, sy_t, sy_h, sy_p,
    DOT_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y of one chunk, head and block of head_dim."""
    pid_bh, c, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // heads, pid_bh % heads
    g = h // heads_per_group
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    t = c * chunk_size + offs_l
    valid = (offs_l < chunk_size) & (t < length)

    scores = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)  # C_l . B_s
    from_state = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)  # S_in C_l
    state_chunk = states_ptr + (pid_bh * chunks + c) * head_dim * d_state
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        bc_mask = valid[:, None] & (offs_n[None, :] < d_state)
        C = _load_group_rows(C_ptr, b, g, t, offs_n, sc_b, sc_t, sc_g, sc_n, bc_mask).to(DOT_DTYPE)
        B = _load_group_rows(B_ptr, b, g, t, offs_n, sb_b, sb_t, sb_g, sb_n, bc_mask).to(DOT_DTYPE)
        scores = tl.dot(C, tl.trans(B), scores, input_precision=FP32_PRECISION)
        state = tl.load(
            state_chunk + offs_p[:, None] * d_state + offs_n[None, :],
            mask=(offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state),
            other=0.0,
        )
        from_state = tl.dot(C, tl.trans(state.to(DOT_DTYPE)), from_state, input_precision=FP32_PRECISION)

    s, decay = _causal_decay(s_ptr + (pid_bh * chunks + c) * chunk_size, offs_l, chunk_size)
    dt = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t * sdt_t, mask=valid, other=0.0).to(tl.float32)
    x_mask = valid[:, None] & (offs_p[None, :] < head_dim)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t + offs_p[None, :] * sx_p, mask=x_mask, other=0.0)
    weights = (scores * decay * dt[None, :]).to(DOT_DTYPE)
    y = tl.dot(weights, x.to(DOT_DTYPE), input_precision=FP32_PRECISION) + tl.exp(s)[:, None] * from_state
    y += tl.load(D_ptr + h).to(tl.float32) * x.to(tl.float32)
    tl.store(y_ptr + b * sy_b + h * sy_h + t[:, None] * sy_t + offs_p[None, :] * sy_p, y, mask=x_mask)


@triton.jit
def _chunk_scan_backward_x_kernel(
    x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, s_ptr, states_ptr, leaving_grads_ptr, dx_ptr, ddt_ptr, ds_ptr,
    length, heads, heads_per_group, chunks, chunk_size, head_dim, d_state,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n,
    sdy_b, sdy_t, sdy_h, sdy_p, sdx_b, sdx_t, sdx_h, sdx_p, sddt_b, sddt_t, sddt_h,
    DOT_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Of one chunk and head: dx, dt's gradient through ``dt x``, and the gradient of the cumulative decays ``s``
    (all but the state passing's part)."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // heads, pid_bh % heads
    g = h // heads_per_group
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    t = c * chunk_size + offs_l
    valid = (offs_l < chunk_size) & (t < length)

    scores = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)  # C_l . B_s
    from_state = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)  # S_in C_l
    to_leaving = tl.zeros([BLOCK_L, BLOCK_P], dtype=tl.float32)  # dS_in(c+1) B_s
    state_offs = (pid_bh * chunks + c) * head_dim * d_state
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        bc_mask = valid[:, None] & (offs_n[None, :] < d_state)
        C = _load_group_rows(C_ptr, b, g, t, offs_n, sc_b, sc_t, sc_g, sc_n, bc_mask).to(DOT_DTYPE)
        B = _load_group_rows(B_ptr, b, g, t, offs_n, sb_b, sb_t, sb_g, sb_n, bc_mask).to(DOT_DTYPE)
        scores = tl.dot(C, tl.trans(B), scores, input_precision=FP32_PRECISION)
        pn_offs = offs_p[:, None] * d_state + offs_n[None, :]
        pn_mask = (offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state)
        state = tl.load(states_ptr + state_offs + pn_offs, mask=pn_mask, other=0.0).to(DOT_DTYPE)
        from_state = tl.dot(C, tl.trans(state), from_state, input_precision=FP32_PRECISION)
        leaving_grad = tl.load(leaving_grads_ptr + state_offs + pn_offs, mask=pn_mask, other=0.0).to(DOT_DTYPE)
        to_leaving = tl.dot(B, tl.trans(leaving_grad), to_leaving, input_precision=FP32_PRECISION)

    s_chunk = s_ptr + (pid_bh * chunks + c) * chunk_size
    s, decay = _causal_decay(s_chunk, offs_l, chunk_size)
    s_last = tl.load(s_chunk + chunk_size - 1)
    dt = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t * sdt_t, mask=valid, other=0.0).to(tl.float32)
    lp_mask = valid[:, None] & (offs_p[None, :] < head_dim)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t + offs_p[None, :] * sx_p, mask=lp_mask, other=0.0)
    dy = tl.load(dy_ptr + b * sdy_b + h * sdy_h + t[:, None] * sdy_t + offs_p[None, :] * sdy_p, mask=lp_mask, other=0.0)
    x32, dy32 = x.to(tl.float32), dy.to(tl.float32)
    x, dy = x.to(DOT_DTYPE), dy.to(DOT_DTYPE)
    to_end = tl.where(valid, tl.exp(s_last - s), 0.0)

    decayed_scores = scores * decay
    d_xdt = tl.dot(tl.trans(decayed_scores.to(DOT_DTYPE)), dy, input_precision=FP32_PRECISION)
    d_xdt += to_end[:, None] * to_leaving
    dx = d_xdt * dt[:, None] + tl.load(D_ptr + h).to(tl.float32) * dy32
    tl.store(dx_ptr + b * sdx_b + h * sdx_h + t[:, None] * sdx_t + offs_p[None, :] * sdx_p, dx, mask=lp_mask)
    tl.store(ddt_ptr + b * sddt_b + h * sddt_h + t * sddt_t, tl.sum(d_xdt * x32, axis=1), mask=valid)

    # d/ds: each weight exp(s_l - s_s) pulls s_l up and s_s down; exp(s_l) and exp(s_last - s_s) likewise.
    outputs_by_inputs = tl.dot(dy, tl.trans(x), input_precision=FP32_PRECISION)  # dy_l . x_s
    intra = decayed_scores * outputs_by_inputs * dt[None, :]
    ds = tl.sum(intra, axis=1) - tl.sum(intra, axis=0)
    ds += tl.exp(s) * tl.sum(dy32 * from_state, axis=1)
    into_state = to_end * dt * tl.sum(x32 * to_leaving, axis=1)
    ds += tl.where(offs_l == chunk_size - 1, tl.sum(into_state), 0.0) - into_state
    tl.store(ds_ptr + (pid_bh * chunks + c) * chunk_size + offs_l, ds, mask=offs_l < chunk_size)


@triton.jit
def _chunk_scan_backward_bc_kernel(
    x_ptr, dt_ptr, B_ptr, C_ptr, dy_ptr, s_ptr, states_ptr, leaving_grads_ptr, dB_ptr, dC_ptr,
    length, groups, heads_per_group, chunks, chunk_size, head_dim, d_state,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n,
    sdy_b, sdy_t, sdy_h, sdy_p, sd_b, sd_t, sd_g, sd_n,
    DOT_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dB and dC of one chunk, group and block of d_state, summed over the group's heads in this program."""
    pid_bg, c, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, g = pid_bg // groups, pid_bg % groups
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t = c * chunk_size + offs_l
    valid = (offs_l < chunk_size) & (t < length)

    bc_mask = valid[:, None] & (offs_n[None, :] < d_state)
    C = _load_group_rows(C_ptr, b, g, t, offs_n, sc_b, sc_t, sc_g, sc_n, bc_mask).to(DOT_DTYPE)
    B = _load_group_rows(B_ptr, b, g, t, offs_n, sb_b, sb_t, sb_g, sb_n, bc_mask).to(DOT_DTYPE)
    lp_mask = valid[:, None] & (offs_p[None, :] < head_dim)
    pn_offs = offs_p[:, None] * d_state + offs_n[None, :]
    pn_mask = (offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state)
    dB = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    dC = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    for e in range(heads_per_group):
        h = g * heads_per_group + e
        bh = b * (groups * heads_per_group) + h
        s_chunk = s_ptr + (bh * chunks + c) * chunk_size
        s, decay = _causal_decay(s_chunk, offs_l, chunk_size)
        s_last = tl.load(s_chunk + chunk_size - 1)
        dt = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t * sdt_t, mask=valid, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t + offs_p[None, :] * sx_p, mask=lp_mask, other=0.0)
        dy = tl.load(
            dy_ptr + b * sdy_b + h * sdy_h + t[:, None] * sdy_t + offs_p[None, :] * sdy_p, mask=lp_mask, other=0.0
        )
        x, dy = x.to(DOT_DTYPE), dy.to(DOT_DTYPE)
        outputs_by_inputs = tl.dot(dy, tl.trans(x), input_precision=FP32_PRECISION)  # dy_l . x_s
        d_scores = (outputs_by_inputs * decay * dt[None, :]).to(DOT_DTYPE)
        dC = tl.dot(d_scores, B, dC, input_precision=FP32_PRECISION)
        dB = tl.dot(tl.trans(d_scores), C, dB, input_precision=FP32_PRECISION)

        state_offs = (bh * chunks + c) * head_dim * d_state
        state = tl.load(states_ptr + state_offs + pn_offs, mask=pn_mask, other=0.0).to(DOT_DTYPE)
        dC += tl.exp(s)[:, None] * tl.dot(dy, state, input_precision=FP32_PRECISION)
        leaving_grad = tl.load(leaving_grads_ptr + state_offs + pn_offs, mask=pn_mask, other=0.0).to(DOT_DTYPE)
        to_end = tl.where(valid, tl.exp(s_last - s) * dt, 0.0)
        dB += to_end[:, None] * tl.dot(x, leaving_grad, input_precision=FP32_PRECISION)

    d_offs = b * sd_b + g * sd_g + t[:, None] * sd_t + offs_n[None, :] * sd_n
    tl.store(dB_ptr + d_offs, dB, mask=bc_mask)
    tl.store(dC_ptr + d_offs, dC, mask=bc_mask)


class _Shape:
    """Sizes, tiles and launch settings shared by the forward and the backward."""

    def __init__(self, x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> None:
        self.batch, self.length, self.heads, self.head_dim = x.shape
        self.groups, self.d_state = B.shape[2], B.shape[3]
        self.heads_per_group = self.heads // self.groups
        self.chunk_size = chunk_size
        self.chunks = triton.cdiv(self.length, chunk_size)
        self.block_l = _block(chunk_size)
        self.block_p = _block(self.head_dim)
        self.block_n = _block(self.d_state, cap=64)
        self.num_warps = 8 if self.block_l >= 128 else 4
        # Matmul operands: bf16/fp16 as given; anything else, and everything under the interpreter (whose tl.dot
        # multiplies bf16 as raw integers in triton 3.9), as float32.
        self.dot_dtype = tl.float32 if INTERPRETED else _HALF_DTYPES.get(x.dtype, tl.float32)
        self.sizes = (self.chunks, chunk_size, self.head_dim, self.d_state)

    def states_buffer(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.batch, self.heads, self.chunks, self.head_dim, self.d_state, device=device)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"model.ssd_backend=triton runs on CUDA tensors, got {x.device.type} ones (use ssd_backend=auto or torch)"
        )


def _cumulative_decay(dt: torch.Tensor, A: torch.Tensor, shape: _Shape) -> torch.Tensor:
    """``s`` [batch, heads, chunks, chunk_size] (float32): the log decay summed from each chunk's start. The steps
    past the sequence's end add 0, so a partial last chunk's final entry is its real total."""
    decay = dt.float() * A.float()
    decay = torch.nn.functional.pad(decay, (0, 0, 0, shape.chunks * shape.chunk_size - shape.length))
    return (
        decay.view(shape.batch, shape.chunks, shape.chunk_size, shape.heads).cumsum(2).permute(0, 3, 1, 2).contiguous()
    )


def _chunk_outer_sums(u, v, dt, s, shape: _Shape, from_end: bool) -> torch.Tensor:
    out = shape.states_buffer(u.device)
    block_p = _block(shape.head_dim, cap=64)
    grid = (
        shape.batch * shape.heads,
        shape.chunks,
        triton.cdiv(shape.head_dim, block_p) * triton.cdiv(shape.d_state, shape.block_n),
    )
    _chunk_outer_sum_kernel[grid](
        u, v, dt, s, out, shape.length, shape.heads, shape.heads_per_group, *shape.sizes,
        *u.stride(), *v.stride(), *dt.stride(),
        FROM_END=from_end, DOT_DTYPE=shape.dot_dtype,
        BLOCK_L=shape.block_l, BLOCK_P=block_p, BLOCK_N=shape.block_n, num_warps=shape.num_warps,
    )  # fmt: skip
    return out


def _entering_states(x, dt, B, s, shape: _Shape) -> torch.Tensor:
    """The float32 state entering every chunk, [batch, heads, chunks, head_dim, d_state]."""
    states = _chunk_outer_sums(x, B, dt, s, shape, from_end=True)
    state_size = shape.head_dim * shape.d_state
    block = min(1024, triton.next_power_of_2(state_size))
    grid = (shape.batch * shape.heads, triton.cdiv(state_size, block))
    _state_passing_kernel[grid](states, s, shape.chunks, shape.chunk_size, state_size, BLOCK=block)
    return states


@torch.library.custom_op("lrm_train::ssd_scan", mutates_args=())
def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``ssd.ssd_chunked_scan`` in Triton: x [b, T, heads, p]; dt [b, T, heads]; A, D [heads]; B, C [b, T, groups, n]."""
    _check_device(x)
    shape = _Shape(x, B, chunk_size)
    s = _cumulative_decay(dt, A, shape)
    states = _entering_states(x, dt, B, s, shape)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_p = _block(shape.head_dim, cap=64)
    grid = (shape.batch * shape.heads, shape.chunks, triton.cdiv(shape.head_dim, block_p))
    _chunk_scan_kernel[grid](
        x, dt, B, C, D, s, states, y, shape.length, shape.heads, shape.heads_per_group, *shape.sizes,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_L=shape.block_l, BLOCK_P=block_p, BLOCK_N=shape.block_n,
        num_warps=shape.num_warps,
    )  # fmt: skip
    return y


@ssd_scan.register_fake
def _(x, dt, A, B, C, D, chunk_size):
    return x.new_empty(x.shape)


@torch.library.custom_op("lrm_train::ssd_scan_backward", mutates_args=())
def ssd_scan_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``ssd_scan`` for x, dt, A, B, C, D, recomputing its states."""
    _check_device(x)
    shape = _Shape(x, B, chunk_size)
    s = _cumulative_decay(dt, A, shape)
    states = _entering_states(x, dt, B, s, shape)

    leaving_grads = _chunk_outer_sums(dy, C, dt, s, shape, from_end=False)
    state_size = shape.head_dim * shape.d_state
    block = min(1024, triton.next_power_of_2(state_size))
    state_blocks = triton.cdiv(state_size, block)
    d_s_last = torch.empty(state_blocks, shape.batch, shape.heads, shape.chunks, device=x.device)
    _state_passing_backward_kernel[(shape.batch * shape.heads, state_blocks)](
        leaving_grads, states, s, d_s_last, shape.chunks, shape.chunk_size, state_size, BLOCK=block
    )

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ddt = torch.empty(dt.shape, dtype=torch.float32, device=x.device)
    ds = torch.empty_like(s)
    _chunk_scan_backward_x_kernel[(shape.batch * shape.heads, shape.chunks)](
        x, dt, B, C, D, dy, s, states, leaving_grads, dx, ddt, ds,
        shape.length, shape.heads, shape.heads_per_group, *shape.sizes,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), *ddt.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_L=shape.block_l, BLOCK_P=shape.block_p, BLOCK_N=shape.block_n,
        num_warps=shape.num_warps,
    )  # fmt: skip
    dB = torch.empty(B.shape, dtype=B.dtype, device=x.device)
    dC = torch.empty(C.shape, dtype=C.dtype, device=x.device)
    grid = (shape.batch * shape.groups, shape.chunks, triton.cdiv(shape.d_state, shape.block_n))
    _chunk_scan_backward_bc_kernel[grid](
        x, dt, B, C, dy, s, states, leaving_grads, dB, dC,
        shape.length, shape.groups, shape.heads_per_group, *shape.sizes,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), *dB.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_L=shape.block_l, BLOCK_P=shape.block_p, BLOCK_N=shape.block_n,
        num_warps=shape.num_warps,
    )  # fmt: skip

    # From the cumulative decays s to each step's log decay dt * A: every step counts in all later s of its chunk.
    ds[..., -1] += d_s_last.sum(0)
    d_decay = ds.flip(-1).cumsum(-1).flip(-1).permute(0, 2, 3, 1).reshape(shape.batch, -1, shape.heads)
    d_decay = d_decay[:, : shape.length]
    ddt += d_decay * A.float()
    dA = (d_decay * dt.float()).sum((0, 1))
    dD = (dy.float() * x.float()).sum((0, 1, 3))
    return dx, ddt.to(dt.dtype), dA.to(A.dtype), dB, dC, dD.to(D.dtype)


@ssd_scan_backward.register_fake
def _(dy, x, dt, A, B, C, D, chunk_size):
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C, D))


def _save_inputs(ctx, inputs, output) -> None:
    *tensors, ctx.chunk_size = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy):
    return *ssd_scan_backward(dy, *ctx.saved_tensors, ctx.chunk_size), None


ssd_scan.register_autograd(_backward, setup_context=_save_inputs)
