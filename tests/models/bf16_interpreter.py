"""Triton's interpreter with a GPU's bf16 arithmetic, so that CPU tests see the rounding the compiled kernels do.

Under ``TRITON_INTERPRET=1`` the SSD scan multiplies in float32 (``ssd_triton`` picks float32 dot operands there),
because triton 3.9's interpreter gets bf16 wrong in two ways:

* it casts float32 to bf16 by truncating the mantissa, where a GPU rounds to nearest even;
* its ``tl.dot`` hands bf16 operands, which it stores as uint16 bit patterns, to ``np.matmul`` as integers.

``emulate_gpu_bf16`` patches both as a GPU computes them (tensor cores multiply bf16 exactly and add in float32), and
float32 dots with ``input_precision="tf32x3"`` as triton lowers them on tensor cores (three tf32 products). Then it
lets ``ssd_triton`` use bf16 dot operands for bf16 inputs, as on CUDA. Every patch goes through ``monkeypatch``, so it
is undone after the test.
"""

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

_TF32_MASK = np.uint32(0xFFFFE000)  # sign, exponent and the 10 mantissa bits of tf32, kept in a float32


def _round_to_bf16(data: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16, the interpreter's bf16 storage), rounded to nearest even by torch."""
    rounded = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def _widen_bf16(data: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> the same values as float32 (exact: bf16 is float32's upper half)."""
    return (data.astype(np.uint32) << 16).view(np.float32)


def _tf32(data: np.ndarray, round_nearest: bool) -> np.ndarray:
    """float32 values cut to tf32: rounded half away from zero (cvt.rna.tf32.f32, how triton splits an operand into
    its big part) or truncated (what the tensor core reads of a float32 register, the small part)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    if round_nearest:
        bits = bits + np.uint32(0x1000)
    return (bits & _TF32_MASK).view(np.float32)


def _tf32x3_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b as triton's tf32x3: big.big + (big.small + small.big), each product exact and summed in float32."""
    a_big, b_big = _tf32(a, True), _tf32(b, True)
    a_small, b_small = _tf32(a - a_big, False), _tf32(b - b_big, False)
    small = np.matmul(a_big, b_small, dtype=np.float32) + np.matmul(a_small, b_big, dtype=np.float32)
    return np.matmul(a_big, b_big, dtype=np.float32) + small


def emulate_gpu_bf16(monkeypatch, ssd_triton) -> None:
    """Patch the interpreter to a GPU's bf16 and tf32x3 arithmetic and make ``ssd_triton`` use bf16 dots."""
    cast_impl, create_dot = InterpreterBuilder.cast_impl, InterpreterBuilder.create_dot

    def rounding_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_round_to_bf16(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def tensor_core_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
            product = np.matmul(_widen_bf16(a.data), _widen_bf16(b.data), dtype=np.float32)
        elif a.dtype == tl.float32 and input_precision == interpreter._ir.INPUT_PRECISION.TF32x3:
            product = _tf32x3_matmul(a.data, b.data)
        else:
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return TensorHandle((product + d.data).astype(np.float32), d.dtype.scalar)

    # The builder's create_fp_trunc/create_fp_ext call self.cast_impl, so patching the class covers every cast.
    monkeypatch.setattr(InterpreterBuilder, "cast_impl", rounding_cast)
    monkeypatch.setattr(InterpreterBuilder, "create_dot", tensor_core_dot)
    monkeypatch.setattr(ssd_triton, "INTERPRETER_HALF_DOTS", True)
