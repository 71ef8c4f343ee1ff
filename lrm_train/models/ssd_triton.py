"""The SSD scan of ``models.ssd`` as Triton kernels, forward and backward, registered as one opaque torch op.

Same inputs, outputs and chunked algorithm as ``ssd.ssd_chunked_scan`` (the reference), in the structure of
mamba_ssm's kernels. Per chunk of ``chunk_size`` steps and head, with ``s`` the cumulative log decay inside the chunk:

    chunk state    S_c       = sum_s exp(s_last - s_s) dt_s x_s B_s^T
    state passing  S_in(c+1) = exp(s_last(c)) S_in(c) + S_c            (sequential over chunks, S_in(0) = 0)
    chunk scan     y_l       = sum_{s<=l} (C_l . B_s) exp(s_l - s_s) dt_s x_s + exp(s_l) S_in C_l + D x_l

The scans work on blocks of 64 positions of a chunk and skip the blocks above its diagonal. The backward recomputes
the states instead of storing them, then runs the same three steps in reverse. Matmul operands are in the inputs'
dtype (bf16 under autocast: tensor cores; float32 in the backward's GRAD_ROWS pass, see ``GRAD_ROWS_DOT_DTYPE``) and
every sum accumulates in float32. The heads of a group share one B and one C: kernels index B/C by group, C.B^T is
computed once per group and chunk for all its heads, and the B/C gradients are summed over shares of the group's heads
inside a program, then over the shares. Sequences of any length are masked, never padded.

The chunks' own states and state gradients are float32; the states passed between chunks and the gradients of the
states leaving them are stored in the inputs' dtype, as mamba_ssm's: bf16 under autocast, half the traffic of the
largest buffers. Most kernels round them to bf16 for their dots anyway; the two that read them in float32 (the
GRAD_ROWS pass and the state passing's backward) use them in no difference of terms that should cancel, so their
rounding stays at bf16's relative 2^-9.

The kernels need CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set before this module is imported
(how the tests run them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = triton.knobs.runtime.interpret
# Under the interpreter matmul operands are float32: triton 3.9's interpreter multiplies bf16 as raw integers (and
# truncates float32 -> bf16). tests/models/bf16_interpreter.py patches it to a GPU's bf16 arithmetic and sets this,
# so that the CPU tests also run the bf16 operands the kernels use on CUDA.
INTERPRETER_HALF_DOTS = False
_HALF_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# float32 matmuls on tensor cores keep float32 accuracy with three tf32 products (bf16/fp16 operands ignore this).
FP32_PRECISION = tl.constexpr("tf32x3")
# The backward's GRAD_ROWS pass multiplies in float32 whatever the inputs. The gradient of a cumulative decay s_l is
# its row terms (dy_l . y_l, this pass) minus its column terms (backward_x, from float32 weights), which cancel
# pairwise; rounding only the row side's weights to bf16 leaves a residue that the reverse cumsum over the chunk sums
# up: dA and the summed ddt came out 5-30% off with CUDA's bf16 arithmetic (emulated: tests/models/bf16_interpreter.py).
# Both sides weight by the same float32 scores C.B^T (_group_scores_kernel). On tensor cores float32 dots are tf32x3
# (FP32_PRECISION), as accurate as float32 here; the pass then spills a few dozen bytes on sm_90 (ssd_triton_check).
GRAD_ROWS_DOT_DTYPE = tl.float32
# The scans (and the group scores) work on 64-position blocks: with 8 warps their bf16 kernels compile for sm_90 with
# few register spills.
SCAN_WARPS = 8
# dB and dC are sums over a group's heads. One program per batch, group and block looping over all of them (24 at
# 0.5B) makes few, long programs (1024 at 0.5B, one per SM at a time); shares of at most this many heads run as
# separate programs instead, each writing a float32 partial sum that the launcher adds up.
BC_GRAD_HEADS = 8


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
def _state_passing_kernel(own_ptr, states_ptr, s_ptr, chunks, chunk_size, state_size, BLOCK: tl.constexpr):
    """Chunk after chunk: the state entering each chunk, from the chunks' own (float32) states; summed in float32,
    stored in the states' dtype."""
    pid_bh, pid = tl.program_id(0), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    state = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(chunks):
        chunk_offs = (pid_bh * chunks + c) * state_size + offs
        own = tl.load(own_ptr + chunk_offs, mask=mask, other=0.0)
        tl.store(states_ptr + chunk_offs, state.to(states_ptr.dtype.element_ty), mask=mask)
        chunk_decay = tl.exp(tl.load(s_ptr + (pid_bh * chunks + c) * chunk_size + chunk_size - 1))
        state = chunk_decay * state + own


@triton.jit
def _state_passing_backward_kernel(
    from_outputs_ptr, grads_ptr, states_ptr, s_ptr, d_s_last_ptr, chunks, chunk_size, state_size, BLOCK: tl.constexpr
):
    """Chunk after chunk from the last: from the (float32) state gradient each chunk's outputs give, the gradient of
    the state leaving each chunk (``dS_in(c+1)``, in the states' dtype); also each block's part of the gradient of
    ``s_last(c)``."""
    pid_bh, pid = tl.program_id(0), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    leaving = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(chunks):
        c = chunks - 1 - i
        chunk_offs = (pid_bh * chunks + c) * state_size + offs
        from_outputs = tl.load(from_outputs_ptr + chunk_offs, mask=mask, other=0.0)
        tl.store(grads_ptr + chunk_offs, leaving.to(grads_ptr.dtype.element_ty), mask=mask)
        entering_state = tl.load(states_ptr + chunk_offs, mask=mask, other=0.0).to(tl.float32)
        chunk_decay = tl.exp(tl.load(s_ptr + (pid_bh * chunks + c) * chunk_size + chunk_size - 1))
        tl.store(
            d_s_last_ptr + (pid * tl.num_programs(0) + pid_bh) * chunks + c,
            chunk_decay * tl.sum(leaving * entering_state),
        )
        leaving = from_outputs + chunk_decay * leaving


@triton.jit
def _group_scores_kernel(
    C_ptr, B_ptr, scores_ptr,
    length, groups, chunks, chunk_size, d_state, row_blocks,
    sc_b, sc_t, sc_g, sc_n, sb_b, sb_t, sb_g, sb_n,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``C_l . B_s`` over d_state (float32) for one block of rows l and one of columns s of a chunk and group, at or
    below the chunk's diagonal: computed once here and read by every head of the group (zero off the sequence)."""
    pid_bg, pid_cm, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, g = pid_bg // groups, pid_bg % groups
    c, m = pid_cm // row_blocks, pid_cm % row_blocks
    if k <= m:
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = k * BLOCK_M + tl.arange(0, BLOCK_M)
        t_m, t_k = c * chunk_size + offs_m, c * chunk_size + offs_k
        valid_m = (offs_m < chunk_size) & (t_m < length)
        valid_k = (offs_k < chunk_size) & (t_k < length)
        scores = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        for n0 in range(0, d_state, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_state = offs_n[None, :] < d_state
            C = _load_group_rows(C_ptr, b, g, t_m, offs_n, sc_b, sc_t, sc_g, sc_n, valid_m[:, None] & in_state)
            B = _load_group_rows(B_ptr, b, g, t_k, offs_n, sb_b, sb_t, sb_g, sb_n, valid_k[:, None] & in_state)
            scores = tl.dot(C.to(DOT_DTYPE), tl.trans(B.to(DOT_DTYPE)), scores, input_precision=FP32_PRECISION)
        chunk_scores = scores_ptr + (pid_bg * chunks + c) * chunk_size * chunk_size
        tl.store(
            chunk_scores + offs_m[:, None] * chunk_size + offs_k[None, :],
            scores,
            mask=(offs_m[:, None] < chunk_size) & (offs_k[None, :] < chunk_size),
        )


@triton.jit
def _load_scores(scores_ptr, b, g, groups, chunks, c, chunk_size, rows, cols):
    """The group's ``C_l . B_s`` at rows l and columns s of chunk c (broadcast to one block; [s, l] gives B.C^T)."""
    chunk_scores = scores_ptr + ((b * groups + g) * chunks + c) * chunk_size * chunk_size
    return tl.load(chunk_scores + rows * chunk_size + cols, mask=(rows < chunk_size) & (cols < chunk_size), other=0.0)


@triton.jit
def _causal_decay(s_later, s_earlier, later, earlier, chunk_size):
    """``exp(s_l - s_s)`` for s <= l < chunk_size, else 0 (``later``/``earlier``: positions l and s, broadcast to one
    block). Masked before the exp, which would overflow above the diagonal and in the rows past a chunk size that
    is not a power of two."""
    causal = (later >= earlier) & (later < chunk_size)
    return tl.exp(tl.where(causal, s_later - s_earlier, -float("inf")))


@triton.jit
def _load_head_rows(ptr, b, h, t, offs_p, stride_b, stride_t, stride_h, stride_p, mask):
    """The rows t (positions of a chunk) of a head's x (or dy), [positions, head_dim block]."""
    return tl.load(
        ptr + b * stride_b + h * stride_h + t[:, None] * stride_t + offs_p[None, :] * stride_p, mask=mask, other=0.0
    )


@triton.jit
def _chunk_scan_kernel(
    x_ptr, dt_ptr, C_ptr, scores_ptr, D_ptr, s_ptr, states_ptr, y_ptr, dy_ptr, ds_ptr,
    length, heads, heads_per_group, chunks, chunk_size, head_dim, d_state, row_blocks,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sc_b, sc_t, sc_g, sc_n, sy_b, sy_t, sy_h, sy_p,
    GRAD_ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y of one block of rows (positions) of a chunk, for one head and block of head_dim.

    With ``GRAD_ROWS`` (the backward; head_dim in one block) it stores ``dy_l . (y_l - D x_l)`` instead: what each
    row's own decays exp(s_l - s_s) and exp(s_l) give the gradient of s_l.
    """
    pid_bh, pid_cm, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // heads, pid_bh % heads
    g = h // heads_per_group
    c, m = pid_cm // row_blocks, pid_cm % row_blocks
    s_chunk = s_ptr + (pid_bh * chunks + c) * chunk_size
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_m = c * chunk_size + offs_m
    valid_m = (offs_m < chunk_size) & (t_m < length)
    s_m = tl.load(s_chunk + offs_m, mask=offs_m < chunk_size, other=0.0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_head = offs_p[None, :] < head_dim

    # What the state entering the chunk gives: exp(s_l) S_in C_l.
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    state_chunk = states_ptr + (pid_bh * chunks + c) * head_dim * d_state
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        C = _load_group_rows(
            C_ptr, b, g, t_m, offs_n, sc_b, sc_t, sc_g, sc_n, valid_m[:, None] & (offs_n[None, :] < d_state)
        )
        state = tl.load(
            state_chunk + offs_p[:, None] * d_state + offs_n[None, :],
            mask=(offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state),
            other=0.0,
        )
        acc = tl.dot(C.to(DOT_DTYPE), tl.trans(state.to(DOT_DTYPE)), acc, input_precision=FP32_PRECISION)
    acc *= tl.exp(s_m)[:, None]

    # The chunk's own inputs up to each row: blocks of columns s <= the block's last row.
    for k0 in range(0, (m + 1) * BLOCK_M, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        t_k = c * chunk_size + offs_k
        valid_k = (offs_k < chunk_size) & (t_k < length)
        scores = _load_scores(
            scores_ptr, b, g, heads // heads_per_group, chunks, c, chunk_size, offs_m[:, None], offs_k[None, :]
        )
        s_k = tl.load(s_chunk + offs_k, mask=offs_k < chunk_size, other=0.0)
        decay = _causal_decay(s_m[:, None], s_k[None, :], offs_m[:, None], offs_k[None, :], chunk_size)
        dt_k = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t_k * sdt_t, mask=valid_k, other=0.0).to(tl.float32)
        x_k = _load_head_rows(x_ptr, b, h, t_k, offs_p, sx_b, sx_t, sx_h, sx_p, valid_k[:, None] & in_head)
        weights = (scores * decay * dt_k[None, :]).to(DOT_DTYPE)
        acc = tl.dot(weights, x_k.to(DOT_DTYPE), acc, input_precision=FP32_PRECISION)

    if GRAD_ROWS:
        dy = _load_head_rows(dy_ptr, b, h, t_m, offs_p, sy_b, sy_t, sy_h, sy_p, valid_m[:, None] & in_head)
        tl.store(
            ds_ptr + (pid_bh * chunks + c) * chunk_size + offs_m,
            tl.sum(dy.to(tl.float32) * acc, axis=1),
            mask=offs_m < chunk_size,
        )
    else:
        x_m = _load_head_rows(x_ptr, b, h, t_m, offs_p, sx_b, sx_t, sx_h, sx_p, valid_m[:, None] & in_head)
        y = acc + tl.load(D_ptr + h).to(tl.float32) * x_m.to(tl.float32)
        y_offs = b * sy_b + h * sy_h + t_m[:, None] * sy_t + offs_p[None, :] * sy_p
        tl.store(y_ptr + y_offs, y, mask=valid_m[:, None] & in_head)


@triton.jit
def _chunk_scan_backward_x_kernel(
    x_ptr, dt_ptr, B_ptr, scores_ptr, D_ptr, dy_ptr, s_ptr, leaving_grads_ptr,
    dx_ptr, ddt_ptr, ds_ptr, into_state_ptr, dD_ptr,
    length, heads, heads_per_group, chunks, chunk_size, head_dim, d_state, row_blocks,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sb_b, sb_t, sb_g, sb_n,
    sdy_b, sdy_t, sdy_h, sdy_p, sdx_b, sdx_t, sdx_h, sdx_p, sddt_b, sddt_t, sddt_h,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Of one block of positions s of a chunk and one head: dx, dt's gradient through ``dt x``, the gradient of s_s
    from the decays that start at s (exp(s_l - s_s) and exp(s_last - s_s), this last also in ``into_state``), and the
    block's part of D's gradient (``sum dy_s . x_s``)."""
    pid_bh, pid_ck = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // heads, pid_bh % heads
    g = h // heads_per_group
    c, k = pid_ck // row_blocks, pid_ck % row_blocks
    s_chunk = s_ptr + (pid_bh * chunks + c) * chunk_size
    offs_k = k * BLOCK_M + tl.arange(0, BLOCK_M)
    t_k = c * chunk_size + offs_k
    valid_k = (offs_k < chunk_size) & (t_k < length)
    s_k = tl.load(s_chunk + offs_k, mask=offs_k < chunk_size, other=0.0)
    dt_k = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t_k * sdt_t, mask=valid_k, other=0.0).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    kp_mask = valid_k[:, None] & (offs_p[None, :] < head_dim)
    x_k = _load_head_rows(x_ptr, b, h, t_k, offs_p, sx_b, sx_t, sx_h, sx_p, kp_mask).to(DOT_DTYPE)

    # dS_in(c+1) B_s: the gradient that reaches x_s through the state leaving the chunk.
    to_leaving = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    state_chunk = leaving_grads_ptr + (pid_bh * chunks + c) * head_dim * d_state
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        B = _load_group_rows(
            B_ptr, b, g, t_k, offs_n, sb_b, sb_t, sb_g, sb_n, valid_k[:, None] & (offs_n[None, :] < d_state)
        )
        leaving_grad = tl.load(
            state_chunk + offs_p[:, None] * d_state + offs_n[None, :],
            mask=(offs_p[:, None] < head_dim) & (offs_n[None, :] < d_state),
            other=0.0,
        )
        to_leaving = tl.dot(
            B.to(DOT_DTYPE), tl.trans(leaving_grad.to(DOT_DTYPE)), to_leaving, input_precision=FP32_PRECISION
        )

    d_xdt = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(k * BLOCK_M, chunk_size, BLOCK_M):  # the rows l >= s
        offs_m = m0 + tl.arange(0, BLOCK_M)
        t_m = c * chunk_size + offs_m
        valid_m = (offs_m < chunk_size) & (t_m < length)
        scores_t = _load_scores(
            scores_ptr, b, g, heads // heads_per_group, chunks, c, chunk_size, offs_m[None, :], offs_k[:, None]
        )
        s_m = tl.load(s_chunk + offs_m, mask=offs_m < chunk_size, other=0.0)
        weights_t = scores_t * _causal_decay(s_m[None, :], s_k[:, None], offs_m[None, :], offs_k[:, None], chunk_size)
        dy_m = _load_head_rows(
            dy_ptr, b, h, t_m, offs_p, sdy_b, sdy_t, sdy_h, sdy_p, valid_m[:, None] & (offs_p[None, :] < head_dim)
        ).to(DOT_DTYPE)
        d_xdt = tl.dot(weights_t.to(DOT_DTYPE), dy_m, d_xdt, input_precision=FP32_PRECISION)
        inputs_by_outputs = tl.dot(x_k, tl.trans(dy_m), input_precision=FP32_PRECISION)  # x_s . dy_l
        ds -= tl.sum(weights_t * inputs_by_outputs, axis=1)
    ds *= dt_k

    to_end = tl.where(valid_k, tl.exp(tl.load(s_chunk + chunk_size - 1) - s_k), 0.0)
    d_xdt += to_end[:, None] * to_leaving
    x32 = x_k.to(tl.float32)
    into_state = to_end * dt_k * tl.sum(x32 * to_leaving, axis=1)
    dy_k = _load_head_rows(dy_ptr, b, h, t_k, offs_p, sdy_b, sdy_t, sdy_h, sdy_p, kp_mask).to(tl.float32)
    dx = d_xdt * dt_k[:, None] + tl.load(D_ptr + h).to(tl.float32) * dy_k
    tl.store(dx_ptr + b * sdx_b + h * sdx_h + t_k[:, None] * sdx_t + offs_p[None, :] * sdx_p, dx, mask=kp_mask)
    tl.store(ddt_ptr + b * sddt_b + h * sddt_h + t_k * sddt_t, tl.sum(d_xdt * x32, axis=1), mask=valid_k)
    chunk_offs = (pid_bh * chunks + c) * chunk_size + offs_k
    tl.store(ds_ptr + chunk_offs, ds - into_state, mask=offs_k < chunk_size)
    tl.store(into_state_ptr + chunk_offs, into_state, mask=offs_k < chunk_size)
    tl.store(dD_ptr + pid_bh * tl.num_programs(1) + pid_ck, tl.sum(dy_k * x32))


@triton.jit
def _head_share(pid, groups, heads_per_group, head_shares, heads_per_share):
    """Of a dB/dC program: its batch, group, share of the group's heads, and that share's heads [first, end)."""
    bg, share = pid // head_shares, pid % head_shares
    first = share * heads_per_share
    return bg // groups, bg % groups, share, first, tl.minimum(first + heads_per_share, heads_per_group)


@triton.jit
def _chunk_scan_backward_c_kernel(
    x_ptr, dt_ptr, B_ptr, dy_ptr, s_ptr, states_ptr, dC_ptr,
    length, groups, heads_per_group, head_shares, heads_per_share, chunks, chunk_size, head_dim, d_state, row_blocks,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sb_b, sb_t, sb_g, sb_n, sdy_b, sdy_t, sdy_h, sdy_p,
    sd_s, sd_b, sd_t, sd_g, sd_n,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dC of one block of rows l of a chunk, group and block of d_state, summed over one share of the group's heads
    (float32, into that share's slice of ``dC_ptr``)."""
    pid_bgs, pid_cm, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, g, share, first_head, end_head = _head_share(pid_bgs, groups, heads_per_group, head_shares, heads_per_share)
    c, m = pid_cm // row_blocks, pid_cm % row_blocks
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_m = c * chunk_size + offs_m
    valid_m = (offs_m < chunk_size) & (t_m < length)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_head = offs_p[None, :] < head_dim
    in_state = offs_n[None, :] < d_state
    dC = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e in range(first_head, end_head):
        h = g * heads_per_group + e
        bh = b * (groups * heads_per_group) + h
        s_chunk = s_ptr + (bh * chunks + c) * chunk_size
        s_m = tl.load(s_chunk + offs_m, mask=offs_m < chunk_size, other=0.0)
        dy_m = _load_head_rows(dy_ptr, b, h, t_m, offs_p, sdy_b, sdy_t, sdy_h, sdy_p, valid_m[:, None] & in_head)
        dy_m = dy_m.to(DOT_DTYPE)
        state = tl.load(
            states_ptr + (bh * chunks + c) * head_dim * d_state + offs_p[:, None] * d_state + offs_n[None, :],
            mask=(offs_p[:, None] < head_dim) & in_state,
            other=0.0,
        )
        dC += tl.exp(s_m)[:, None] * tl.dot(dy_m, state.to(DOT_DTYPE), input_precision=FP32_PRECISION)
        for k0 in range(0, (m + 1) * BLOCK_M, BLOCK_M):  # the columns s <= l
            offs_k = k0 + tl.arange(0, BLOCK_M)
            t_k = c * chunk_size + offs_k
            valid_k = (offs_k < chunk_size) & (t_k < length)
            s_k = tl.load(s_chunk + offs_k, mask=offs_k < chunk_size, other=0.0)
            dt_k = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t_k * sdt_t, mask=valid_k, other=0.0).to(tl.float32)
            x_k = _load_head_rows(x_ptr, b, h, t_k, offs_p, sx_b, sx_t, sx_h, sx_p, valid_k[:, None] & in_head)
            outputs_by_inputs = tl.dot(dy_m, tl.trans(x_k.to(DOT_DTYPE)), input_precision=FP32_PRECISION)  # dy_l . x_s
            decay = _causal_decay(s_m[:, None], s_k[None, :], offs_m[:, None], offs_k[None, :], chunk_size)
            d_scores = (outputs_by_inputs * decay * dt_k[None, :]).to(DOT_DTYPE)
            B = _load_group_rows(B_ptr, b, g, t_k, offs_n, sb_b, sb_t, sb_g, sb_n, valid_k[:, None] & in_state)
            dC = tl.dot(d_scores, B.to(DOT_DTYPE), dC, input_precision=FP32_PRECISION)
    d_offs = share * sd_s + b * sd_b + g * sd_g + t_m[:, None] * sd_t + offs_n[None, :] * sd_n
    tl.store(dC_ptr + d_offs, dC, mask=valid_m[:, None] & in_state)


@triton.jit
def _chunk_scan_backward_b_kernel(
    x_ptr, dt_ptr, C_ptr, dy_ptr, s_ptr, leaving_grads_ptr, dB_ptr,
    length, groups, heads_per_group, head_shares, heads_per_share, chunks, chunk_size, head_dim, d_state, row_blocks,
    sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sc_b, sc_t, sc_g, sc_n, sdy_b, sdy_t, sdy_h, sdy_p,
    sd_s, sd_b, sd_t, sd_g, sd_n,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dB of one block of positions s of a chunk, group and block of d_state, summed over one share of the group's
    heads (float32, into that share's slice of ``dB_ptr``)."""
    pid_bgs, pid_ck, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, g, share, first_head, end_head = _head_share(pid_bgs, groups, heads_per_group, head_shares, heads_per_share)
    c, k = pid_ck // row_blocks, pid_ck % row_blocks
    offs_k = k * BLOCK_M + tl.arange(0, BLOCK_M)
    t_k = c * chunk_size + offs_k
    valid_k = (offs_k < chunk_size) & (t_k < length)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_head = offs_p[None, :] < head_dim
    in_state = offs_n[None, :] < d_state
    dB = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e in range(first_head, end_head):
        h = g * heads_per_group + e
        bh = b * (groups * heads_per_group) + h
        s_chunk = s_ptr + (bh * chunks + c) * chunk_size
        s_k = tl.load(s_chunk + offs_k, mask=offs_k < chunk_size, other=0.0)
        dt_k = tl.load(dt_ptr + b * sdt_b + h * sdt_h + t_k * sdt_t, mask=valid_k, other=0.0).to(tl.float32)
        x_k = _load_head_rows(x_ptr, b, h, t_k, offs_p, sx_b, sx_t, sx_h, sx_p, valid_k[:, None] & in_head)
        x_k = x_k.to(DOT_DTYPE)
        leaving_grad = tl.load(
            leaving_grads_ptr + (bh * chunks + c) * head_dim * d_state + offs_p[:, None] * d_state + offs_n[None, :],
            mask=(offs_p[:, None] < head_dim) & in_state,
            other=0.0,
        )
        to_end = tl.where(valid_k, tl.exp(tl.load(s_chunk + chunk_size - 1) - s_k) * dt_k, 0.0)
        dB += to_end[:, None] * tl.dot(x_k, leaving_grad.to(DOT_DTYPE), input_precision=FP32_PRECISION)
        for m0 in range(k * BLOCK_M, chunk_size, BLOCK_M):  # the rows l >= s
            offs_m = m0 + tl.arange(0, BLOCK_M)
            t_m = c * chunk_size + offs_m
            valid_m = (offs_m < chunk_size) & (t_m < length)
            s_m = tl.load(s_chunk + offs_m, mask=offs_m < chunk_size, other=0.0)
            dy_m = _load_head_rows(dy_ptr, b, h, t_m, offs_p, sdy_b, sdy_t, sdy_h, sdy_p, valid_m[:, None] & in_head)
            inputs_by_outputs = tl.dot(x_k, tl.trans(dy_m.to(DOT_DTYPE)), input_precision=FP32_PRECISION)  # x_s . dy_l
            decay_t = _causal_decay(s_m[None, :], s_k[:, None], offs_m[None, :], offs_k[:, None], chunk_size)
            d_scores_t = (inputs_by_outputs * decay_t * dt_k[:, None]).to(DOT_DTYPE)
            C = _load_group_rows(C_ptr, b, g, t_m, offs_n, sc_b, sc_t, sc_g, sc_n, valid_m[:, None] & in_state)
            dB = tl.dot(d_scores_t, C.to(DOT_DTYPE), dB, input_precision=FP32_PRECISION)
    d_offs = share * sd_s + b * sd_b + g * sd_g + t_k[:, None] * sd_t + offs_n[None, :] * sd_n
    tl.store(dB_ptr + d_offs, dB, mask=valid_k[:, None] & in_state)


class _Shape:
    """Sizes, tiles and launch settings shared by the forward and the backward."""

    def __init__(self, x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> None:
        self.batch, self.length, self.heads, self.head_dim = x.shape
        self.groups, self.d_state = B.shape[2], B.shape[3]
        self.heads_per_group = self.heads // self.groups
        self.chunk_size = chunk_size
        self.chunks = triton.cdiv(self.length, chunk_size)
        # The chunk states take a whole chunk per program; the scans take blocks of its positions, causal blocks only.
        self.block_l = _block(chunk_size)
        self.chunk_warps = 8 if self.block_l >= 128 else 4
        self.block_m = min(self.block_l, 64)
        self.row_blocks = triton.cdiv(chunk_size, self.block_m)
        self.block_p = _block(self.head_dim)
        self.block_n = _block(self.d_state, cap=64)
        # dB and dC sum over a group's heads in (nearly) equal shares of at most BC_GRAD_HEADS heads.
        self.head_shares = triton.cdiv(self.heads_per_group, BC_GRAD_HEADS)
        self.heads_per_share = triton.cdiv(self.heads_per_group, self.head_shares)
        # The state passing takes blocks of a head's flattened [head_dim, d_state] state, all chunks per program.
        self.state_size = self.head_dim * self.d_state
        self.state_block = min(1024, triton.next_power_of_2(self.state_size))
        self.state_grid = (self.batch * self.heads, triton.cdiv(self.state_size, self.state_block))
        # Matmul operands: bf16/fp16 as given; anything else, and everything under the plain interpreter (see
        # INTERPRETER_HALF_DOTS), as float32.
        half_dots = not INTERPRETED or INTERPRETER_HALF_DOTS
        self.dot_dtype = _HALF_DTYPES.get(x.dtype, tl.float32) if half_dots else tl.float32
        self.sizes = (self.chunks, chunk_size, self.head_dim, self.d_state)

    def states_buffer(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(self.batch, self.heads, self.chunks, self.head_dim, self.d_state, device=device, dtype=dtype)


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
        BLOCK_L=shape.block_l, BLOCK_P=block_p, BLOCK_N=shape.block_n, num_warps=shape.chunk_warps,
    )  # fmt: skip
    return out


def _entering_states(x, dt, B, s, shape: _Shape) -> torch.Tensor:
    """The state entering every chunk, [batch, heads, chunks, head_dim, d_state], in x's dtype."""
    own = _chunk_outer_sums(x, B, dt, s, shape, from_end=True)
    states = shape.states_buffer(x.device, x.dtype)
    _state_passing_kernel[shape.state_grid](
        own, states, s, shape.chunks, shape.chunk_size, shape.state_size, BLOCK=shape.state_block
    )
    return states


def _group_scores(C, B, shape: _Shape) -> torch.Tensor:
    """``C_l . B_s`` of every chunk and group, [batch, groups, chunks, chunk_size, chunk_size] (float32; the blocks
    above a chunk's diagonal are left unset: no kernel reads them)."""
    scores = torch.empty(shape.batch, shape.groups, shape.chunks, shape.chunk_size, shape.chunk_size, device=C.device)
    _group_scores_kernel[(shape.batch * shape.groups, shape.chunks * shape.row_blocks, shape.row_blocks)](
        C, B, scores, shape.length, shape.groups, shape.chunks, shape.chunk_size, shape.d_state, shape.row_blocks,
        *C.stride(), *B.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n, num_warps=SCAN_WARPS,
    )  # fmt: skip
    return scores


def _chunk_scan(x, dt, C, scores, D, s, states, shape: _Shape, out, out_strides, grad_rows) -> None:
    """y into ``out``; or, given ``grad_rows`` (a buffer like s), ``dy_l . (y_l - D x_l)`` with dy as ``out``."""
    block_p = shape.block_p if grad_rows is not None else _block(shape.head_dim, cap=64)
    grid = (shape.batch * shape.heads, shape.chunks * shape.row_blocks, triton.cdiv(shape.head_dim, block_p))
    _chunk_scan_kernel[grid](
        x, dt, C, scores, D, s, states, out, out, grad_rows,
        shape.length, shape.heads, shape.heads_per_group, *shape.sizes, shape.row_blocks,
        *x.stride(), *dt.stride(), *C.stride(), *out_strides,
        GRAD_ROWS=grad_rows is not None, DOT_DTYPE=shape.dot_dtype if grad_rows is None else GRAD_ROWS_DOT_DTYPE,
        BLOCK_M=shape.block_m, BLOCK_P=block_p, BLOCK_N=shape.block_n, num_warps=SCAN_WARPS,
    )  # fmt: skip


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
    """``ssd.ssd_chunked_scan`` in Triton: x [b, T, heads, p]; dt [b, T, heads]; A, D [heads]; B, C [b, T, groups, n]
    -> y like x."""
    _check_device(x)
    shape = _Shape(x, B, chunk_size)
    s = _cumulative_decay(dt, A, shape)
    states = _entering_states(x, dt, B, s, shape)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _chunk_scan(x, dt, C, _group_scores(C, B, shape), D, s, states, shape, y, y.stride(), grad_rows=None)
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

    from_outputs = _chunk_outer_sums(dy, C, dt, s, shape, from_end=False)
    leaving_grads = shape.states_buffer(x.device, x.dtype)
    d_s_last = torch.empty(shape.state_grid[1], shape.batch, shape.heads, shape.chunks, device=x.device)
    _state_passing_backward_kernel[shape.state_grid](
        from_outputs, leaving_grads, states, s, d_s_last, shape.chunks, shape.chunk_size, shape.state_size,
        BLOCK=shape.state_block,
    )  # fmt: skip
    del from_outputs  # float32 and as large as the states: not kept through the rest of the backward

    # The gradient of s: each row's own decays (exp(s_l - s_s), exp(s_l)), then each column's (exp(s_l - s_s),
    # exp(s_last - s_s)) with dx, then the state passing's exp(s_last).
    ds_rows = torch.empty_like(s)
    scores = _group_scores(C, B, shape)
    _chunk_scan(x, dt, C, scores, D, s, states, shape, dy, dy.stride(), grad_rows=ds_rows)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ddt = torch.empty(dt.shape, dtype=torch.float32, device=x.device)
    ds, into_state = torch.empty_like(s), torch.empty_like(s)
    dD = torch.empty(shape.batch, shape.heads, shape.chunks * shape.row_blocks, device=x.device)
    _chunk_scan_backward_x_kernel[(shape.batch * shape.heads, shape.chunks * shape.row_blocks)](
        x, dt, B, scores, D, dy, s, leaving_grads, dx, ddt, ds, into_state, dD,
        shape.length, shape.heads, shape.heads_per_group, *shape.sizes, shape.row_blocks,
        *x.stride(), *dt.stride(), *B.stride(), *dy.stride(), *dx.stride(), *ddt.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_M=shape.block_m, BLOCK_P=shape.block_p, BLOCK_N=shape.block_n,
        num_warps=SCAN_WARPS,
    )  # fmt: skip
    ds += ds_rows
    ds[..., -1] += into_state.sum(-1) + d_s_last.sum(0)

    # Each share of a group's heads adds up its own float32 dB and dC; the shares are summed here.
    dB_shares = torch.empty(shape.head_shares, *B.shape, device=x.device)
    dC_shares = torch.empty(shape.head_shares, *C.shape, device=x.device)
    grid = (
        shape.batch * shape.groups * shape.head_shares,
        shape.chunks * shape.row_blocks,
        triton.cdiv(shape.d_state, shape.block_n),
    )
    heads = (shape.groups, shape.heads_per_group, shape.head_shares, shape.heads_per_share)
    _chunk_scan_backward_c_kernel[grid](
        x, dt, B, dy, s, states, dC_shares, shape.length, *heads, *shape.sizes, shape.row_blocks,
        *x.stride(), *dt.stride(), *B.stride(), *dy.stride(), *dC_shares.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_M=shape.block_m, BLOCK_P=shape.block_p, BLOCK_N=shape.block_n,
        num_warps=SCAN_WARPS,
    )  # fmt: skip
    _chunk_scan_backward_b_kernel[grid](
        x, dt, C, dy, s, leaving_grads, dB_shares, shape.length, *heads, *shape.sizes, shape.row_blocks,
        *x.stride(), *dt.stride(), *C.stride(), *dy.stride(), *dB_shares.stride(),
        DOT_DTYPE=shape.dot_dtype, BLOCK_M=shape.block_m, BLOCK_P=shape.block_p, BLOCK_N=shape.block_n,
        num_warps=SCAN_WARPS,
    )  # fmt: skip
    dB, dC = dB_shares.sum(0).to(B.dtype), dC_shares.sum(0).to(C.dtype)

    # From the cumulative decays s to each step's log decay dt * A: every step counts in all later s of its chunk.
    d_decay = ds.flip(-1).cumsum(-1).flip(-1).permute(0, 2, 3, 1).reshape(shape.batch, -1, shape.heads)
    d_decay = d_decay[:, : shape.length]
    ddt += d_decay * A.float()
    dA = (d_decay * dt.float()).sum((0, 1))
    return dx, ddt.to(dt.dtype), dA.to(A.dtype), dB, dC, dD.sum((0, 2)).to(D.dtype)


@ssd_scan_backward.register_fake
def _(dy, x, dt, A, B, C, D, chunk_size):
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C, D))


def _save_inputs(ctx, inputs, output) -> None:
    *tensors, ctx.chunk_size = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy):
    return *ssd_scan_backward(dy, *ctx.saved_tensors, ctx.chunk_size), None


ssd_scan.register_autograd(_backward, setup_context=_save_inputs)
