"""The factored normal equations' Gram of factor pairs by input pairs (private to the estimators).

:func:`factor_gram` forms ``sum_i (u_a u_c)(x~_p x~_q)`` over the samples from the factors ``u`` of
a Jacobian given as column blocks (:class:`hmoe_sim.estimators._core.KhatriRaoLayout`) and the
input products; :func:`side_by_side` lets blocks written into one buffer be read without a copy.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["GRAM_BLOCK", "GRAM_CACHE_BYTES", "PAIR_GATHER_MAX", "factor_gram", "pair_products", "sample_blocked",
           "side_by_side"]


def pair_products(v: torch.Tensor, out: torch.Tensor | None = None,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, m, n) -> (b, m(m+1)/2, n)``: rows ``v_a * v_c`` for ``a <= c`` in row-major order.

    Small stacks (at most ``PAIR_GATHER_MAX`` numbers per row block) gather both factors of every
    pair and multiply once (three operations); larger ones multiply row ``a`` by rows ``a..m-1``
    (``m`` operations, no gathered copies). Each entry is the same product either way. ``out``
    (contiguous, of the result's shape) receives the products; without it a new array does.
    ``scratch`` (of the same shape) receives the second factors of a gather (else a new array).
    """
    m = v.shape[-2]
    shape = (*v.shape[:-2], m * (m + 1) // 2, v.shape[-1])
    if out is None:
        out = torch.empty(shape, dtype=v.dtype, device=v.device)
    if v.shape[-1] * math.prod(v.shape[:-2]) <= PAIR_GATHER_MAX:
        first, second = _pair_rows(m, v.device)
        torch.index_select(v, -2, first, out=out)
        other = v.index_select(-2, second) if scratch is None else torch.index_select(v, -2, second, out=scratch)
        return out.mul_(other)
    start = 0
    for a in range(m):
        torch.mul(v[..., a : a + 1, :], v[..., a:, :], out=out[..., start : start + m - a, :])
        start += m - a
    return out


#: largest ``problems x samples`` for which :func:`pair_products` gathers: three operations instead
#: of ``m``; above it the looped products move less memory. Every block of :func:`factor_gram`
#: (at most ``GRAM_CACHE_BYTES`` of products) is gathered: with several solver threads the
#: operation count (Python, under the GIL) costs more than the extra copy (measured on 2 cores)
PAIR_GATHER_MAX = 8192
_PAIR_ROWS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _pair_rows(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``a`` and ``c`` of every pair ``a <= c`` in row-major order, on ``device``."""
    key = (m, device)
    if key not in _PAIR_ROWS:
        a, c = torch.triu_indices(m, m)
        _PAIR_ROWS[key] = (a.to(device), c.to(device))
    return _PAIR_ROWS[key]


#: samples per block of :func:`factor_gram` (the block's factor-pair products stay in cache)
GRAM_BLOCK = 1024
#: bytes of factor-pair products one block of :func:`factor_gram` may write: about one core's L2
#: cache on current x86-64 CPUs (1 MiB on the 2-core development machine), so that the matrix
#: product reads them back from cache; problems are taken in groups that fit
GRAM_CACHE_BYTES = 5 * 2**18


def sample_blocked(n_factors: int, n_products: int) -> bool:
    """Whether :func:`factor_gram` sums over blocks of samples: when the factor pairs outnumber the
    input pairs (the HMoE: 36 against 15), not when the input pairs dominate (the flat models)."""
    return n_factors * (n_factors + 1) // 2 > n_products


def factor_gram(factors: torch.Tensor, products: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, m(m+1)/2, d2)``: the factor-pair products of ``factors (b, m, n)`` times the input
    products ``(b, d2, n)``, summed over the samples, for the problems ``rows`` (``None``: all).

    When the factor pairs outnumber the input pairs (:func:`sample_blocked`), it is formed over
    blocks of ``GRAM_BLOCK`` samples and summed in block order, for groups of problems whose
    block of pair products fits in ``GRAM_CACHE_BYTES``: the ``m(m+1)/2 x block`` pair products
    of one block are reused from cache by the matrix product instead of being written to and read
    back from memory (about 3x faster at ``m = 8``, ``n = 1e4`` than one product; the groups
    another 1.4x at 16 problems). ``rows`` are gathered block by block (only the block's factors
    and input products are copied). Otherwise (the flat models, whose input pairs dominate) it
    is one product over all samples (``rows`` picked from it). The order of summation depends on
    the shapes of one problem only, never on the number of problems in the stack, on ``rows`` or
    on the grouping: ``bmm`` treats every problem of a batch alike.
    """
    n, m = factors.shape[-1], factors.shape[-2]
    pairs = m * (m + 1) // 2
    if not sample_blocked(m, products.shape[-2]):
        # the input products dominate the traffic (the flat models): one product, as before
        gram = torch.bmm(pair_products(factors), products.transpose(-1, -2))
        return gram if rows is None else gram[rows]
    count = factors.shape[0] if rows is None else rows.numel()
    group = max(1, GRAM_CACHE_BYTES // (pairs * min(n, GRAM_BLOCK) * factors.element_size()))
    width = min(n, GRAM_BLOCK)
    # the pair products of every block, and the second factors of their gather, go to two
    # buffers kept by this thread (a new array per group or block is a fresh allocation each time)
    numel = min(group, count) * pairs * width
    buffer, second = (_scratch(k, numel, factors) for k in (0, 1))
    wanted = None if rows is None else rows.tolist()
    grams = []
    for first in range(0, count, group):
        size = min(group, count - first)
        chosen = None if rows is None else rows[first : first + group]
        # the group's problems (views; gathered block by block for rows); the factors of consecutive
        # rows (one row, always, when a group is one problem) are read as a view: only the pair
        # products are formed from them (the same numbers either way)
        u_all, x_all = (factors, products) if chosen is not None else (factors[first : first + group],
                                                                      products[first : first + group])
        u_rows = wanted is not None and wanted[first : first + size] == list(range(wanted[first], wanted[first] + size))
        full = buffer[: size * pairs * width].view(size, pairs, width)
        full_second = second[: size * pairs * width].view(size, pairs, width)
        gram = None
        for start in range(0, n, GRAM_BLOCK):
            u, x = u_all[..., start : start + GRAM_BLOCK], x_all[..., start : start + GRAM_BLOCK]
            if u_rows:
                u, x = u[wanted[first] : wanted[first] + size], x.index_select(0, chosen)
            elif chosen is not None:
                u, x = u.index_select(0, chosen), x.index_select(0, chosen)
            if u.shape[-1] == width:
                out, scratch = full, full_second
            else:
                k = size * pairs * u.shape[-1]
                out, scratch = buffer[:k].view(size, pairs, -1), second[:k].view(size, pairs, -1)
            part = torch.bmm(pair_products(u, out, scratch), x.transpose(-1, -2))
            gram = part if gram is None else gram.add_(part)
        assert gram is not None
        grams.append(gram)
    return grams[0] if len(grams) == 1 else torch.cat(grams)


_SCRATCH = threading.local()


def _scratch(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat array of at least ``numel`` numbers of ``like``'s dtype and device, kept by the
    calling thread for ``slot`` and reused by its next calls (grown when too small)."""
    kept = getattr(_SCRATCH, "arrays", None)
    if kept is None:
        kept = _SCRATCH.arrays = {}
    key = (slot, like.dtype, like.device)
    array = kept.get(key)
    if array is None or array.numel() < numel:
        array = kept[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return array


def side_by_side(blocks: list[torch.Tensor]) -> torch.Tensor | None:
    """The ``(b, m, n)`` array whose consecutive row ranges are ``blocks`` (each ``(b, w, n)``,
    rows of ``n`` contiguous numbers), as a view, when they are slices of one such array in
    order; ``None`` otherwise."""
    first = blocks[0]
    if first.dim() != 3 or first.stride(-1) != 1 or first.stride(-2) != first.shape[-1]:
        return None
    b, n = first.shape[0], first.shape[-1]
    storage, address = first.untyped_storage().data_ptr(), first.data_ptr()
    m = 0
    for block in blocks:
        if (block.dim() != 3 or block.shape[0] != b or block.shape[-1] != n or block.stride() != first.stride()
                or block.untyped_storage().data_ptr() != storage
                or block.data_ptr() != address + m * n * block.element_size()):
            return None
        m += block.shape[1]
    if b > 1 and first.stride(0) < m * n:
        return None
    return first.as_strided((b, m, n), (first.stride(0), n, 1))
