"""Compile the Triton SSD kernels for an H100 (sm_90) on any machine, and report what the GPU would allot them.

    python -m lrm_train.models.ssd_triton_check [--dtype bf16|fp32] [--chunk-size 128] [--head-dim 64] [--d-state 128]

Per kernel: shared memory, registers per thread and the bytes spilled to local memory (stack), read from the cubin
with the cuobjdump that ships with triton. No GPU is needed: this is how the kernels' tiles were sized without one.
Spills are marked (they cost speed); a kernel that needs more shared memory than an H100 has (it would not launch)
makes the exit status 1. Do not set TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lrm_train.models import ssd_triton

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# The pointers to tensors in the inputs' dtype; every other one is float32.
_INPUTS = (
    ("x_ptr", "B_ptr", "C_ptr", "dy_ptr", "dx_ptr", "y_ptr", "u_ptr", "v_ptr")
    + ("states_ptr", "grads_ptr", "leaving_grads_ptr")  # the passed states and their gradients
)


def kernel_launches(shape: ssd_triton._Shape) -> list[tuple[str, dict, int]]:
    """(kernel name, its constexprs, num_warps) as ``ssd_scan`` and its backward launch them for this shape."""
    tiles = dict(DOT_DTYPE=shape.dot_dtype, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n)
    grad_rows_tiles = tiles | dict(DOT_DTYPE=ssd_triton.GRAD_ROWS_DOT_DTYPE)  # the backward's GRAD_ROWS pass
    chunk = dict(DOT_DTYPE=shape.dot_dtype, BLOCK_L=shape.block_l, BLOCK_P=ssd_triton._block(shape.head_dim, cap=64))
    state_block = dict(BLOCK=shape.state_block)
    warps = ssd_triton.SCAN_WARPS
    return [
        ("_chunk_outer_sum_kernel", dict(FROM_END=True, BLOCK_N=shape.block_n, **chunk), shape.chunk_warps),
        ("_chunk_outer_sum_kernel", dict(FROM_END=False, BLOCK_N=shape.block_n, **chunk), shape.chunk_warps),
        ("_state_passing_kernel", state_block, 4),
        ("_state_passing_backward_kernel", state_block, 4),
        ("_group_scores_kernel", dict(DOT_DTYPE=shape.dot_dtype, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n), warps),
        ("_chunk_scan_kernel", dict(GRAD_ROWS=False, BLOCK_P=chunk["BLOCK_P"], **tiles), warps),
        ("_chunk_scan_kernel", dict(GRAD_ROWS=True, BLOCK_P=shape.block_p, **grad_rows_tiles), warps),
        ("_chunk_scan_backward_x_kernel", dict(BLOCK_P=shape.block_p, **tiles), warps),
        ("_chunk_scan_backward_c_kernel", dict(BLOCK_P=shape.block_p, **tiles), warps),
        ("_chunk_scan_backward_b_kernel", dict(BLOCK_P=shape.block_p, **tiles), warps),
    ]


def resources(name: str, constexprs: dict, num_warps: int, input_type: str) -> dict[str, int]:
    """Shared memory, registers and spilled bytes of one kernel compiled for the H100."""
    kernel = getattr(ssd_triton, name)
    signature = {
        arg: "constexpr" if arg in constexprs else (input_type if arg in _INPUTS else "*fp32") if arg.endswith("_ptr") else "i32"
        for arg in kernel.arg_names
    }  # fmt: skip
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=H100, options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage.stdout).group(1)) for key in ("REG", "STACK"))
    return {"shared": compiled.metadata.shared, "registers": registers, "spilled": stack}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="x, B, C (and dy) dtype")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--d-state", type=int, default=128)
    args = parser.parse_args(argv)
    if ssd_triton.INTERPRETED:
        sys.exit("ssd_triton_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.empty(1, args.chunk_size, 1, args.head_dim, dtype=dtype, device="meta")
    shape = ssd_triton._Shape(x, torch.empty(1, args.chunk_size, 1, args.d_state, device="meta"), args.chunk_size)
    too_large = False
    for name, constexprs, num_warps in kernel_launches(shape):
        used = resources(name, constexprs, num_warps, f"*{args.dtype}")
        over = used["shared"] > H100_SHARED_BYTES
        too_large |= over
        notes = ("  <- spills" if used["spilled"] else "") + ("  <- too much shared memory" if over else "")
        settings = " ".join(f"{k}={v}" for k, v in constexprs.items() if k != "DOT_DTYPE")
        print(f"{name:32s} {settings:46s} " + " ".join(f"{k}={v}" for k, v in used.items()) + notes)
    return 1 if too_large else 0


if __name__ == "__main__":
    sys.exit(main())
