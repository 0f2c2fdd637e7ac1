"""Device helpers shared by the Triton kernels: stable scalar math and the
split-row rendezvous.

Everything here is a ``@triton.jit`` function called from a kernel; nothing
runs on import.  Arithmetic happens in the accumulation dtype ``ACC`` chosen
by the launcher (float32, or float64 for float64 storage).
"""
import os

import triton
import triton.language as tl

#: how many polls of the row's arrival counter a split-row program makes
#: before it gives up and poisons its row with NaN.  A correct launch never
#: gets near it (the programs of a row start together, see
#: ``split_row_combine``); the bound turns a scheduling bug into NaN results
#: a test can see instead of a hung GPU.
MAX_SPINS = tl.constexpr(1 << 22)


@triton.jit
def log1p(u):
    """log(1 + u) to full precision for small |u| (there is no tl.log1p).

    Goldberg's trick: with v = fl(1 + u), log(v) * u / (v - 1) is accurate
    because the rounding error of v cancels in the ratio."""
    v = 1.0 + u
    d = v - 1.0
    return tl.where(d == 0.0, u, tl.log(v) * (u / tl.where(d == 0.0, 1.0, d)))


#: tanh's Taylor coefficients of u**3, ..., u**11: 2**2n (2**2n - 1) B_2n / (2n)!
_T3 = tl.constexpr(-0.3333333333333333)
_T5 = tl.constexpr(0.13333333333333333)
_T7 = tl.constexpr(-0.05396825396825397)
_T9 = tl.constexpr(0.021869488536155203)
_T11 = tl.constexpr(-0.008863235529902197)


@triton.jit
def tanh(u):
    """tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): never overflows;
    +-inf maps to +-1.  The rounding of e leaves an absolute error of half an
    ulp of 1 in tanh, which 1 - e turns into a relative one of ~ulp(1) / |u|
    for small |u| (x / cap at cap 30 is mostly there).  float32 takes tanh's
    Taylor series below |u| = 0.3 instead (to u**11; the first term left out
    is under 2e-9 of tanh there), so that z = cap tanh(x / cap) is as exact as
    torch's: the absolute error of 3e-8 cap made softcap losses a few times
    less exact than torch's.  float64 keeps the absolute 1.1e-16 (a softcap
    CE exact to ~1e-14): its series would cost the float64 gradient kernel
    of the vocabulary-parallel CE a spill at 16 warps on sm_80."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    if u.dtype != tl.float64:
        s = a * a
        p = ((((_T11 * s + _T9) * s + _T7) * s + _T5) * s + _T3) * s
        t = tl.where(a < 0.3, a + a * p, t)
    return tl.where(u < 0.0, -t, t)


#: Triton's interpreter runs the kernels (set before triton is imported): no inline PTX there
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def rounded_mul(a, b):
    """a * b rounded on its own, for logits a kernel scales (softcap, 1 / T)
    and then compares with their row max.  A plain product may be contracted
    into a following add (NVPTX forms an fma of the unrounded product), so
    ``max - z_t`` is the product's rounding error rather than 0 where z_t is
    the max: ~1e22 in the loss at logits near 1e30 (seen on an H200).  An
    explicit ``mul.rn`` in inline PTX is opaque to LLVM and never fused by
    ptxas; the rest of the kernel keeps its fmas (turning fusion off for the
    whole kernel made a softcap configuration spill).  The interpreter rounds
    every product anyway."""
    if INTERPRETING:
        return a * b
    else:
        if a.dtype == tl.float64:
            return tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=l,l,l", [a, b], dtype=tl.float64,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)


@triton.jit
def softcap_logits(x, cap, HAS_SOFTCAP: tl.constexpr):
    """z = cap * tanh(x / cap) when HAS_SOFTCAP (a rounded product), else x."""
    if HAS_SOFTCAP:
        return rounded_mul(tanh(x / cap), cap)
    else:
        return x


@triton.jit
def softcap_grad_factor(x, cap, HAS_SOFTCAP: tl.constexpr):
    """dz/dx of the softcap, sech(x / cap)**2 = 4 e / (1 + e)**2 with
    e = exp(-2 |x / cap|): accurate to a few ulps for every x, where
    1 - tanh(x / cap)**2 cancels once tanh rounds near 1.  1 without softcap."""
    if HAS_SOFTCAP:
        e = tl.exp(-2.0 * tl.abs(x / cap))
        q = 1.0 + e
        return 4.0 * e / (q * q)
    else:
        return 1.0


@triton.jit
def rescale_rel_sum(A, B, m_old, m_new):
    """A row sum A = sum_c v_c (z_c - shift) kept relative to the running
    shift (the max, 0 while it is -inf), so that its precision does not depend
    on where the logits sit: when the max moves from m_old to m_new, A gains
    (shift_old - shift_new) * B, B = sum_c v_c of the same terms.  Nothing is
    added while B is 0 (no inf * 0)."""
    shift_old = tl.where(m_old == float("-inf"), 0.0, m_old)
    shift_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    return A + tl.where(B == 0.0, 0.0, (shift_old - shift_new) * B)


@triton.jit
def online_update(m, s, z):
    """Fold a block ``z`` (masked lanes already -inf) into the running
    (max m, sum s of exp(z - m)).  A row whose entries are all -inf so far
    keeps m = -inf, s = 0 (the shift used is 0 then, never -inf - -inf)."""
    m_new = tl.maximum(m, tl.max(z, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
    return m_new, s


@triton.jit
def finish_lse(m, s):
    """log-sum-exp from (max, sum of exp(z - max)); -inf for an all -inf row
    (as the reference), never nan."""
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift + tl.log(s)


@triton.jit
def split_row_combine(Scratch_ptr, Arrive_ptr, row, part, m, s, a, b,
                      SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, NVAL: tl.constexpr):
    """Rendezvous of the SPLIT programs that share one row (split-row design).

    Each program publishes its chunk's partials (max m, sum s of exp(z - m)
    and, when NVAL == 4, two plain sums a, b) to ``Scratch[row, part, 0:4]``,
    counts itself in ``Arrive[row]`` with release semantics, polls the counter
    with acquire semantics until all SPLIT programs have arrived, then reads
    the SPLIT partials back (through atomics, i.e. from L2, never a stale L1
    line) and combines them: M = max m_k, S = sum s_k exp(m_k - M),
    B = sum b_k, and A = sum a_k + (m_k - M) b_k: each a_k is a sum
    relative to its chunk's max (see ``rescale_rel_sum``), A is relative to M.

    Forward progress: programs take row ids from a ticket counter in the order
    they start (see the kernels), so when a program waits, every program with
    a smaller ticket has started; at most SPLIT - 1 programs of the last,
    partly started row can be waiting and all others finish and free their
    slots, so the missing siblings start.  Deadlock-free for any grid as long
    as SPLIT programs fit on the device at once.  A poll budget of MAX_SPINS
    turns a violated assumption into NaN (returned M = nan) instead of a hang.

    Bytes: 4 * SPLIT * 4 of scratch per row, written once and read SPLIT
    times: under 0.1 % of a row of 8k+ elements.
    """
    base = Scratch_ptr + (row * SPLIT + part) * 4
    tl.atomic_xchg(base + 0, m, sem="relaxed")
    tl.atomic_xchg(base + 1, s, sem="relaxed")
    if NVAL > 2:
        tl.atomic_xchg(base + 2, a, sem="relaxed")
        tl.atomic_xchg(base + 3, b, sem="relaxed")
    # every thread's share of the publication happens before the release below
    tl.debug_barrier()
    arrived = tl.atomic_add(Arrive_ptr + row, 1, sem="acq_rel") + 1
    spins = 0
    while (arrived < SPLIT) & (spins < MAX_SPINS):
        arrived = tl.atomic_add(Arrive_ptr + row, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()
    k = tl.arange(0, SPLIT_P2)
    kmask = k < SPLIT
    rowbase = Scratch_ptr + row * SPLIT * 4 + k * 4
    ms = tl.atomic_add(rowbase + 0, 0.0, mask=kmask, sem="acquire")
    ss = tl.atomic_add(rowbase + 1, 0.0, mask=kmask, sem="acquire")
    ms = tl.where(kmask, ms, float("-inf"))
    ss = tl.where(kmask, ss, 0.0)
    M = tl.max(ms, 0)
    shift = tl.where(M == float("-inf"), 0.0, M)
    S = tl.sum(ss * tl.exp(ms - shift), 0)
    if NVAL > 2:
        as_ = tl.atomic_add(rowbase + 2, 0.0, mask=kmask, sem="acquire")
        bs = tl.atomic_add(rowbase + 3, 0.0, mask=kmask, sem="acquire")
        as_ = rescale_rel_sum(tl.where(kmask, as_, 0.0), tl.where(kmask, bs, 0.0), ms, M)
        A = tl.sum(as_, 0)
        B = tl.sum(tl.where(kmask, bs, 0.0), 0)
    else:
        A = a
        B = b
    M = tl.where(arrived < SPLIT, float("nan"), M)
    return M, S, A, B


@triton.jit
def unpack(xs, ACC: tl.constexpr, key, PHASE: tl.constexpr, PACKED: tl.constexpr):
    """A register-resident chunk ``xs`` (as loaded, in its storage dtype) in
    the accumulation dtype, for phase PHASE (0, 1, 2) of a one-read kernel.

    Without PACKED every phase gets the same upcast, which the compiler keeps
    as one ACC copy of the chunk: 4 bytes per element in registers.  With
    PACKED (2-byte storage) each phase upcasts afresh from the 2-byte
    registers, so the chunk costs half the registers between the phases.
    For that the phases' upcasts must not be merged by common-subexpression
    elimination: phases 1 and 2 first pass the bits through ``^ key`` and
    ``| key`` with ``key`` a runtime 0 (``n_cols >> 31`` of a non-negative
    C), which no compiler can fold.  One integer op per element and phase."""
    if PACKED and xs.dtype.primitive_bitwidth == 16:
        if PHASE == 0:
            out = xs.to(ACC)
        else:
            bits = xs.to(tl.int16, bitcast=True)
            k = key.to(tl.int16)
            if PHASE == 1:
                bits = bits ^ k
            else:
                bits = bits | k
            out = bits.to(xs.dtype, bitcast=True).to(ACC)
    else:
        out = xs.to(ACC)
    return out


@triton.jit
def scalar_acc(v, ACC: tl.constexpr):
    """A float scalar argument in the accumulation dtype.  Python floats reach
    a kernel as fp32, which is not exact enough for float64 launches (0.1, 1/n
    ...): those pass a one-element float64 tensor instead, whose pointer is
    read here.  The branch is resolved at compile time."""
    # (the interpreter passes plain Python floats, which have no dtype)
    is_ptr: tl.constexpr = hasattr(v, "dtype") and v.dtype.is_ptr()
    if is_ptr:
        out = tl.load(v).to(ACC)
    else:
        out = tl.zeros((), ACC) + v
    return out


@triton.jit
def pass2_block_start(i, n_blocks, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """First column of block ``i`` of a looped kernel's second pass: forwards,
    or (REVERSE) from the end of the row back, so the pass starts on the
    blocks the first pass read last, the likeliest still in L1/L2."""
    if REVERSE:
        start = (n_blocks - 1 - i) * BLOCK
    else:
        start = i * BLOCK
    return start


@triton.jit
def split_row_id(Counter_ptr, SPLIT: tl.constexpr):
    """(row, part) of an on-chip program.  With SPLIT > 1, row ids follow the
    order in which programs start (a ticket from ``Counter_ptr``), so the
    SPLIT programs of a row start together (the progress argument of
    ``split_row_combine``); with SPLIT = 1 the program id is the row."""
    if SPLIT > 1:
        ticket = tl.atomic_add(Counter_ptr, 1).to(tl.int64)
        row = ticket // SPLIT
        part = ticket % SPLIT
    else:
        row = tl.program_id(0).to(tl.int64)
        part = 0
    return row, part
