"""grad_weight of the fused linear cross-entropy, accumulated over token
chunks in float32 held as two 16-bit halves.

A float32's upper 16 bits are a bfloat16 (truncated); its lower 16 bits are
the rest.  The weight gradient's own bf16 buffer holds the upper halves while
the chunks accumulate, a second ``V x H`` buffer of 16-bit integers the lower
halves: the sum is exactly the float32 one, at ``V x H x 2`` bytes of extra
memory instead of ``V x H x 4`` for a float32 accumulator.

``split_acc_matmul_kernel``: ``acc[V, H] += dz[n, V]^T @ h[n, H]`` for one
chunk, the product in float32 (``tl.dot``), added to the float32 rebuilt
from the two halves in the epilogue and split again: per element one read
and one write of 4 bytes, as a float32 accumulator's.  ``FIRST`` skips the
read (the buffers hold nothing yet).

``split_acc_finish_kernel``: the float32 sum times the reduction's scale
(a device scalar: "mean"'s 1 / divisor, NaN where torch gives NaN), rounded
once to bfloat16 (round to nearest even), written over the upper halves.
"""
import triton
import triton.language as tl


@triton.jit
def _rebuild(hi, lo):
    """The float32 whose upper/lower 16 bits are ``hi``/``lo`` (int16 bits)."""
    bits = (hi.to(tl.int32) << 16) | (lo.to(tl.int32) & 0xFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _add_split(acc, Hi_ptr, Lo_ptr, offs_v, offs_h, acc_stride_v, n_v, n_h, FIRST: tl.constexpr):
    """acc plus the float32 held in (Hi, Lo) at these offsets, split back."""
    idx = offs_v[:, None] * acc_stride_v + offs_h[None, :]
    inside = (offs_v[:, None] < n_v) & (offs_h[None, :] < n_h)
    if not FIRST:
        acc += _rebuild(tl.load(Hi_ptr + idx, mask=inside, other=0), tl.load(Lo_ptr + idx, mask=inside, other=0))
    bits = acc.to(tl.int32, bitcast=True)
    tl.store(Hi_ptr + idx, (bits >> 16).to(tl.int16), mask=inside)
    tl.store(Lo_ptr + idx, (bits & 0xFFFF).to(tl.int16), mask=inside)


@triton.jit
def split_acc_matmul_kernel(
    DZ_ptr, dz_stride_n, dz_stride_v, H_ptr, h_stride_n, h_stride_h, Hi_ptr, Lo_ptr, acc_stride_v,
    n_tok, n_v, n_h,
    FIRST: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_V: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_v = tl.cdiv(n_v, BLOCK_V)
    tiles_h = tl.cdiv(n_h, BLOCK_H)
    # grouped order: GROUP_V row tiles share the columns of h in L2
    per_group = GROUP_V * tiles_h
    group = pid // per_group
    first_v = group * GROUP_V
    size_v = min(tiles_v - first_v, GROUP_V)
    pid_v = first_v + (pid % per_group) % size_v
    pid_h = (pid % per_group) // size_v

    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/columns past the end read valid memory (wrapped) and are never
    # stored: the loads need a mask along k only, which keeps them pipelined
    a_ptrs = DZ_ptr + offs_k[None, :] * dz_stride_n + (offs_v % n_v)[:, None] * dz_stride_v
    b_ptrs = H_ptr + offs_k[:, None] * h_stride_n + (offs_h % n_h)[None, :] * h_stride_h
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for kb in range(0, tl.cdiv(n_tok, BLOCK_K)):
        rest = n_tok - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < rest, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < rest, other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly: exact float32 copies there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * dz_stride_n
        b_ptrs += BLOCK_K * h_stride_n

    # the epilogue in two column halves: half the registers of the whole tile
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_V, 2, BLOCK_H // 2)), (0, 2, 1)))
    half = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H // 2)
    _add_split(acc0, Hi_ptr, Lo_ptr, offs_v, half, acc_stride_v, n_v, n_h, FIRST)
    _add_split(acc1, Hi_ptr, Lo_ptr, offs_v, half + BLOCK_H // 2, acc_stride_v, n_v, n_h, FIRST)


@triton.jit
def split_acc_finish_kernel(Hi_ptr, Lo_ptr, Scale_ptr, n, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Written as bits (``Hi_ptr`` is the bf16 buffer viewed as int16):
    round to nearest even by hand, the same on a GPU and in Triton's
    interpreter (whose float32 -> bfloat16 cast truncates)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    v = _rebuild(tl.load(Hi_ptr + offs, mask=inside, other=0), tl.load(Lo_ptr + offs, mask=inside, other=0))
    if HAS_SCALE:
        v = v * tl.load(Scale_ptr).to(tl.float32)
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
    tl.store(Hi_ptr + offs, rounded.to(tl.int16), mask=inside)
