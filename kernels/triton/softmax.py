"""softmax / log_softmax over the last axis: forward and backward, two designs each.

Rows are ``(R, C)`` with unit column stride and any row stride; offsets are
int64 from the first line so R * C > 2**31 is fine.

Forward designs (the launcher picks one per shape, see
``gpuloss.backends.triton_backend.launch_config``):

* ``softmax_fwd_twopass_kernel``: one program per row, an online max/sum pass
  over the row in BLOCK pieces, then a second pass that re-reads the row and
  writes y.  Works for any C.  Bytes: read 2 R C, write R C (the second read
  is served by device memory for rows larger than what L2 keeps per SM).
* ``softmax_fwd_onchip_kernel``: each element is read once.  A row is cut into
  SPLIT chunks of CHUNK elements, one program per chunk; the chunk stays in
  registers while the SPLIT programs of the row exchange their partial
  (max, sum) through ``split_row_combine``.  Bytes: read R C, write R C, plus
  32 SPLIT bytes of scratch per row.  SPLIT == 1 is the whole row in one
  program and needs no rendezvous (the only case the interpreter can run).
  The launcher's "onchip" and "packed" designs both use it; "packed" sizes it
  for 2-byte rows (elements per thread, warps, a register cap) so that
  nothing spills and several programs share an SM.

Backward: ``softmax_bwd_kernel`` (y and dy in registers when one BLOCK holds
the row: read 2 R C, write R C; else a reduction pass and a second pass:
read 4 R C) and ``softmax_bwd_onchip_kernel`` (any row: y and dy read once,
SPLIT programs per row adding their partial sums through the same
rendezvous: read 2 R C, write R C).
"""
import triton
import triton.language as tl

from .common import online_update, pass2_block_start, split_row_combine, split_row_id, unpack


@triton.jit
def softmax_fwd_twopass_kernel(
    X_ptr, X_row_stride, Y_ptr, Y_row_stride,
    n_cols,
    BLOCK: tl.constexpr, LOG: tl.constexpr, ACC: tl.constexpr, REVERSE: tl.constexpr = False,
):
    """Pass 1 (read C): online max / sum; pass 2 (read C, write C): y.
    REVERSE walks pass 2 from the end of the row back (see cross_entropy)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * X_row_stride
    y_row = Y_ptr + row * Y_row_stride
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    # pass 1: online max / sum of exp, reads C elements
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
        m, s = online_update(m, s, x)
    # y from (x - max) and the sum, never from x - lse: with |max| >> log(sum)
    # the fp32 lse would swallow log(sum)
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    inv_s = 1.0 / s
    # pass 2: re-read, write y; reads C, writes C elements
    n_blocks = tl.cdiv(n_cols, BLOCK)
    for i in range(0, n_blocks):
        start = pass2_block_start(i, n_blocks, BLOCK, REVERSE)
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
        if LOG:
            y = (x - shift) - log_s
        else:
            y = tl.exp(x - shift) * inv_s
        tl.store(y_row + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_fwd_onchip_kernel(
    X_ptr, X_row_stride, Y_ptr, Y_row_stride, Scratch_ptr, Counter_ptr,
    n_cols,
    CHUNK: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
    LOG: tl.constexpr, ACC: tl.constexpr, PACKED: tl.constexpr = False,
):
    """Read C, write C.  PACKED keeps the chunk in registers in its 2-byte
    storage dtype and upcasts it afresh for each phase (max, sum, output):
    half the registers of an fp32 copy (``common.unpack``)."""
    row, part = split_row_id(Counter_ptr, SPLIT)
    cols = part * CHUNK + tl.arange(0, CHUNK)
    mask = cols < n_cols
    # the only read of x: CHUNK elements kept in registers until the store
    xs = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=float("-inf"))
    key = n_cols >> 31  # a runtime 0 for unpack
    m = tl.max(unpack(xs, ACC, key, 0, PACKED), 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(unpack(xs, ACC, key, 1, PACKED) - shift), 0)
    if SPLIT > 1:
        m, s, _a, _b = split_row_combine(Scratch_ptr, Counter_ptr + 1, row, part, m, s, s, s,
                                         SPLIT, SPLIT_P2, 2)
    shift = tl.where(m == float("-inf"), 0.0, m)
    x = unpack(xs, ACC, key, 2, PACKED)
    if LOG:
        y = (x - shift) - tl.log(s)
    else:
        y = tl.exp(x - shift) / s
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_kernel(
    Y_ptr, Y_row_stride, DY_ptr, DY_row_stride, DX_ptr, DX_row_stride,
    n_cols,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, LOG: tl.constexpr, ACC: tl.constexpr,
):
    """softmax:     dx = y * (dy - sum(dy * y))
    log_softmax: dx = dy - exp(y) * sum(dy)

    SINGLE_BLOCK (BLOCK >= C): y and dy are read once and kept in registers:
    read 2 R C, write R C (the floor).  Otherwise a reduction pass and a
    second pass that re-reads both: read 4 R C, write R C."""
    row = tl.program_id(0).to(tl.int64)
    y_row = Y_ptr + row * Y_row_stride
    dy_row = DY_ptr + row * DY_row_stride
    dx_row = DX_ptr + row * DX_row_stride
    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = offs < n_cols
        y = tl.load(y_row + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_row + offs, mask=mask, other=0.0).to(ACC)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, 0)
        else:
            dx = y * (dy - tl.sum(dy * y, 0))
        tl.store(dx_row + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK,), ACC)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(ACC)
            if LOG:
                acc += dy
            else:
                y = tl.load(y_row + cols, mask=mask, other=0.0).to(ACC)
                acc += dy * y
        total = tl.sum(acc, 0)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(ACC)
            if LOG:
                dx = dy - tl.exp(y) * total
            else:
                dx = y * (dy - total)
            tl.store(dx_row + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_onchip_kernel(
    Y_ptr, Y_row_stride, DY_ptr, DY_row_stride, DX_ptr, DX_row_stride, Scratch_ptr, Counter_ptr,
    n_cols,
    CHUNK: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
    LOG: tl.constexpr, ACC: tl.constexpr, PACKED: tl.constexpr = False,
):
    """softmax / log_softmax backward with y and dy read once: read 2 R C,
    write R C (the floor), for rows of any length.  Program (row, part) keeps
    its CHUNK of y and dy in registers (in their storage dtype when PACKED),
    the SPLIT programs of a row add their partial sums sum(dy y) (softmax) or
    sum(dy) (log_softmax) through ``split_row_combine`` (published as
    (m, s) = (0, partial): the combined S is the plain sum), and each writes
    its chunk of dx."""
    row, part = split_row_id(Counter_ptr, SPLIT)
    cols = part * CHUNK + tl.arange(0, CHUNK)
    mask = cols < n_cols
    ys = tl.load(Y_ptr + row * Y_row_stride + cols, mask=mask, other=0.0)
    dys = tl.load(DY_ptr + row * DY_row_stride + cols, mask=mask, other=0.0)
    key = n_cols >> 31  # a runtime 0 for unpack
    if LOG:
        part_sum = tl.sum(unpack(dys, ACC, key, 1, PACKED), 0)
    else:
        part_sum = tl.sum(unpack(dys, ACC, key, 1, PACKED) * unpack(ys, ACC, key, 1, PACKED), 0)
    total = part_sum
    if SPLIT > 1:
        zero = tl.zeros((), ACC)
        _m, total, _a, _b = split_row_combine(Scratch_ptr, Counter_ptr + 1, row, part, zero, part_sum,
                                              zero, zero, SPLIT, SPLIT_P2, 2)
        total = total + _m  # _m is 0, or nan when the rendezvous timed out
    y = unpack(ys, ACC, key, 2, PACKED)
    dy = unpack(dys, ACC, key, 2, PACKED)
    if LOG:
        dx = dy - tl.exp(y) * total
    else:
        dx = y * (dy - total)
    tl.store(DX_ptr + row * DX_row_stride + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)
