"""Bit reinterpretations for the compiled kernels (numba intrinsics), so that their loops vectorize: bf16 bits
become a float32 by a shift and a cast instead of a table lookup (a gather), and maxima of non-negative float64
values are taken over their int64 bits (same order), which LLVM vectorizes where it leaves a float maximum scalar."""

from __future__ import annotations

import functools


@functools.cache
def intrinsics():
    """numba intrinsics that reinterpret bits, so that the loops around them vectorize (a table lookup would be
    a gather, a float maximum a loop LLVM leaves scalar): bf16 bits -> the float32 whose top half they are (exact);
    float64 <-> int64 bits (for |d| >= 0, the int64 bits order like the values, and their maximum vectorizes)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def bf16_value(typingctx, bits):
        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def float64_bits(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(64))
        return types.int64(types.float64), codegen

    @intrinsic
    def bits_float64(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.int64), codegen

    return bf16_value, float64_bits, bits_float64
