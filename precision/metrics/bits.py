"""Bit reinterpretations for the compiled kernels (numba intrinsics), so that their loops vectorize: bf16 bits
become a float32 by a shift and a cast instead of a table lookup (a gather), and maxima of non-negative float64
values are taken over their int64 bits (same order), which LLVM vectorizes where it leaves a float maximum scalar.

numba's on-disk cache of a kernel is keyed on the kernel's own file: after changing an intrinsic here, change
fused.py and logits_kernel.py too (or remove their __pycache__/*.nbi), or the cached kernels keep the old code."""

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


BLOCK_COUNT_LIMIT = (1 << 15) - 1
"""Most elements a kernel block may hold when its counts are kept in 16 bits (narrow_intrinsics)."""


@functools.cache
def narrow_intrinsics():
    """numba intrinsics that keep the bf16 bit work in 16-bit integers, so that a loop of them vectorizes 16 lanes
    to a 256-bit register (numba's own typing widens every small integer operation to 64 bits, 4 lanes):

    - ordered_key(bits) -> int16: the bf16 value's +-magnitude (bits & 0x7FFF, negated when the sign bit is set):
      integers ordered like the values, one apart per bf16 ULP, with -0 and +0 both 0;
    - magnitude(bits) -> int16: bits & 0x7FFF (at least 0x7F80: Inf or NaN);
    - larger(x, y) -> int16: max(x, y);
    - distance(ke, ka) -> int16: |ka - ke| of two keys with the difference wrapped to 16 bits. It is 0, 1 or 2
      exactly when the true distance is: keys of finite values lie within +-0x7F7F, so a true distance is at most
      0xFEFE and wraps onto -2..2 only if it lies there;
    - count_equal(count, x, c) -> int16: count + (x == c); a block's counts fit while it holds at most
      BLOCK_COUNT_LIMIT elements."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    i16 = ir.IntType(16)

    @intrinsic
    def ordered_key(typingctx, bits):
        def codegen(context, builder, signature, args):
            magnitude = builder.and_(args[0], ir.Constant(i16, 0x7FFF))
            sign = builder.ashr(args[0], ir.Constant(i16, 15))  # 0 or -1
            return builder.sub(builder.xor(magnitude, sign), sign)
        return types.int16(types.uint16), codegen

    @intrinsic
    def magnitude(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.and_(args[0], ir.Constant(i16, 0x7FFF))
        return types.int16(types.uint16), codegen

    @intrinsic
    def larger(typingctx, x, y):
        def codegen(context, builder, signature, args):
            return builder.select(builder.icmp_signed(">", args[0], args[1]), args[0], args[1])
        return types.int16(types.int16, types.int16), codegen

    @intrinsic
    def distance(typingctx, ke, ka):
        def codegen(context, builder, signature, args):
            difference = builder.sub(args[1], args[0])
            negated = builder.sub(ir.Constant(i16, 0), difference)
            return builder.select(builder.icmp_signed("<", difference, ir.Constant(i16, 0)), negated, difference)
        return types.int16(types.int16, types.int16), codegen

    @intrinsic
    def count_equal(typingctx, count, x, c):
        def codegen(context, builder, signature, args):
            equal = builder.icmp_signed("==", args[1], builder.trunc(args[2], i16))
            return builder.add(args[0], builder.zext(equal, i16))
        return types.int16(types.int16, types.int16, types.int64), codegen

    return ordered_key, magnitude, larger, distance, count_equal


@functools.cache
def prefetch_intrinsic():
    """numba intrinsic prefetch(array, index): asks the CPU to bring the cache line holding element ``index``
    (counted in the flat order of a C-contiguous array) towards the L1 cache for reading, without waiting for
    it (llvm.prefetch; it never faults, and callers keep ``index`` inside the array). A kernel that consumes
    memory faster than the hardware prefetcher brings it issues these a block or two ahead."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, array, index):
        if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            byte_pointer = ir.IntType(8).as_pointer()
            address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
            i32 = ir.IntType(32)
            function = builder.module.declare_intrinsic(
                "llvm.prefetch", [byte_pointer], ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
            # read (0), keep in all cache levels (locality 3), data cache (1)
            builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.none(array, index), codegen

    return prefetch
