"""The LM's normal equations: the factored (Khatri-Rao) form against the assembled Jacobian,
row selection, the solver with and without it, and the memory budget of the chunks."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from roundoff import assert_tensors_match

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import Bounds, auto_chunk_size, fit_batch, init_near_truth, jacobian_bytes
from hmoe_sim.estimators._core import Problem, khatri_rao_layout
from hmoe_sim.estimators._gram import (
    GRAM_BLOCK,
    GRAM_CACHE_BYTES,
    PAIR_GATHER_MAX,
    factor_gram,
    pair_products,
    side_by_side,
)
from hmoe_sim.estimators._lm import solve_lm
from hmoe_sim.models.flat import FlatMoE

CASES = [("softmax-linear", {}), ("softmax-relu", {}), ("sigmoid-regime2", {}), ("hmoe-nonshared", {}),
         ("hmoe-nonshared", {"first_level": "softmax"}), ("hmoe-shared", {}),
         ("hmoe-shared", {"code_activation": "identity", "first_level": "softmax"})]


def _problem(name: str, options: dict, B: int = 3, n: int = 40, *, structured: bool = True, masked: bool = False):
    s = make_preset(name, seed=1, **options)
    model = s.fit_model
    X, y = sample_batch(s.true_model, s.truth, n, s.noise_std, [np.random.SeedSequence([4, b]) for b in range(B)])
    w = torch.ones_like(y)
    if masked:
        w[1, n // 2 :] = 0
        X, y = X * w.unsqueeze(-1), y * w
    theta = model.flatten(init_near_truth(model, s.true_model, s.truth, batch_shape=B, perturbation=0.3, seed=3))
    problem = Problem(model, X, y, w, w.sum(-1), *Bounds().vectors(model), structured=structured)
    return s, problem, theta


def test_pair_products_hand_computed():
    v = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]]])  # (1, m=3, n=2)
    out = pair_products(v)
    # pairs (0,0) (0,1) (0,2) (1,1) (1,2) (2,2)
    expected = torch.tensor([[[1.0, 4.0], [3.0, -2.0], [0.5, 8.0], [9.0, 1.0], [1.5, -4.0], [0.25, 16.0]]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("m", [8, 3])
def test_factor_gram_over_sample_blocks(m):
    # m = 8 factors: 36 pairs > 15 input pairs, summed over blocks (the last one partial); m = 3: one product
    g = torch.Generator().manual_seed(0)
    n = 2 * GRAM_BLOCK + 37
    u, x = torch.randn(2, m, n, generator=g, dtype=torch.float64), torch.randn(2, 15, n, generator=g,
                                                                               dtype=torch.float64)
    ref = torch.einsum("bpn,bqn->bpq", pair_products(u), x)
    torch.testing.assert_close(factor_gram(u, x), ref, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 8, PAIR_GATHER_MAX // 3 + 1), (1, 8, PAIR_GATHER_MAX)])
def test_pair_products_gathered_and_looped_agree_exactly(shape):
    # small stacks gather both factors of every pair, large ones multiply row by rows in place;
    # each entry is the same floating-point product, so the two paths agree bit for bit
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = shape[1]
    expected = torch.stack([v[:, a] * v[:, c] for a in range(m) for c in range(a, m)], 1)
    assert torch.equal(pair_products(v), expected)


def test_factor_gram_of_a_problem_does_not_depend_on_its_stack():
    # the groups of problems that fit in cache change with the stack size; the sums must not
    g = torch.Generator().manual_seed(5)
    n = GRAM_BLOCK + 300
    u, x = torch.randn(11, 8, n, generator=g, dtype=torch.float64), torch.randn(11, 15, n, generator=g,
                                                                                dtype=torch.float64)
    group = GRAM_CACHE_BYTES // (36 * GRAM_BLOCK * 8)
    assert 1 < group < 11  # the stack of 11 is cut into several groups
    whole = factor_gram(u, x)
    for b in (0, group - 1, group, 10):
        assert torch.equal(factor_gram(u[b : b + 1], x[b : b + 1])[0], whole[b])
    assert torch.equal(factor_gram(u[3:9], x[3:9]), whole[3:9])
    # rows picked block by block (the accepted steps of a stack): the same sums, bit for bit
    for rows in ([2], [0, 5, 6], [1, 2, 3, 4, 6, 7, 8, 9, 10], list(range(11))):
        index = torch.tensor(rows)
        assert torch.equal(factor_gram(u, x, index), whole[index])
    flat = torch.randn(4, 3, n, generator=g, dtype=torch.float64)  # 6 pairs < 15: one product, rows picked
    assert torch.equal(factor_gram(flat, x[:4], torch.tensor([1, 3])), factor_gram(flat, x[:4])[[1, 3]])


def test_factor_gram_rows_of_strided_factors_are_those_of_the_whole_stack():
    # the HMoE's factors are rows of the model's product buffer (a strided view); at m = 16 a group is one
    # problem, whose factors the rows path reads as a view (consecutive rows) instead of a gathered copy
    g = torch.Generator().manual_seed(9)
    n = 2 * GRAM_BLOCK + 35
    u = torch.randn(5, 19, n, generator=g, dtype=torch.float64)[:, :16]
    x = torch.randn(5, 15, n, generator=g, dtype=torch.float64)
    assert GRAM_CACHE_BYTES // (136 * GRAM_BLOCK * 8) <= 1 and not u.is_contiguous()
    whole = factor_gram(u, x)
    for rows in ([3], [0, 1], [1, 3, 4], [0, 1, 2, 3, 4]):
        assert torch.equal(factor_gram(u, x, torch.tensor(rows)), whole[rows])


def test_factor_gram_scratch_buffers_are_kept_per_thread_and_grown():
    # the pair products go to buffers kept by the calling thread: reused call after call (the
    # same sums as a first call) and grown for a larger stack; another thread gets its own
    import threading

    from hmoe_sim.estimators import _gram
    g = torch.Generator().manual_seed(8)
    u, x = torch.randn(3, 8, 300, generator=g, dtype=torch.float64), torch.randn(3, 15, 300, generator=g,
                                                                                dtype=torch.float64)
    ref = torch.einsum("bpn,bqn->bpq", pair_products(u), x)
    seen = {}

    def in_a_new_thread() -> None:  # a thread that has kept no buffer yet
        seen["first"] = factor_gram(u[:1], x[:1])
        seen["small"] = _gram._scratch(0, 1, u)
        seen["again"] = factor_gram(u[:1], x[:1])
        seen["all"] = factor_gram(u, x)
        seen["grown"] = _gram._scratch(0, 1, u)

    thread = threading.Thread(target=in_a_new_thread)
    thread.start()
    thread.join()
    assert seen["small"].numel() == 36 * 300
    assert torch.equal(seen["again"], seen["first"])
    torch.testing.assert_close(seen["all"], ref, rtol=1e-13, atol=1e-12)
    assert seen["grown"].numel() == 3 * 36 * 300
    assert _gram._scratch(0, 1, u).data_ptr() != seen["grown"].data_ptr()  # this thread's own


def test_blocks_written_side_by_side_are_read_without_a_copy():
    buffer = torch.randn(4, 2, 6, 50, dtype=torch.float64)  # (b, blocks, width, n)
    first, second = buffer[:, 0], buffer[:, 1]
    joined = side_by_side([first, second])
    assert joined is not None and joined.data_ptr() == buffer.data_ptr()
    assert torch.equal(joined, torch.cat([first, second], -2))
    assert side_by_side([second, first]) is None  # out of order
    assert side_by_side([first, torch.randn(4, 6, 50, dtype=torch.float64)]) is None  # another buffer
    assert side_by_side([buffer[:2, 0], buffer[2:, 1]]) is None  # other problems
    # the HMoE writes its two blocks this way: the layout's factors are a view, equal to the copy
    _, problem, theta = _problem("hmoe-nonshared", {})
    lin = problem.linearize(theta)
    layout = khatri_rao_layout(lin.pieces, problem.X.shape[-1])
    factors = layout.factors(lin.pieces)
    assert factors.data_ptr() == lin.pieces[0][0].data_ptr()
    assert torch.equal(factors, torch.cat([lin.pieces[0][0].mT, lin.pieces[2][0].mT], -2))


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_normal_equations_equal_those_of_the_assembled_jacobian(name, options, masked):
    _, problem, theta = _problem(name, options, masked=masked)
    lin = problem.linearize(theta)
    A, g = lin.normal_equations()
    r, J = problem.residual_and_jacobian(theta)  # the Jacobian by columns, masked
    torch.testing.assert_close(lin.r, r, rtol=0, atol=0)
    A_ref = torch.einsum("bnp,bnq->bpq", J, J)
    g_ref = torch.einsum("bnp,bn->bp", J, r)
    scale_A = A_ref.abs().amax((-2, -1), keepdim=True)
    scale_g = g_ref.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(A / scale_A, A_ref / scale_A, rtol=0, atol=1e-13)
    torch.testing.assert_close(g / scale_g, g_ref / scale_g, rtol=0, atol=1e-13)
    if masked:  # a masked-out sample contributes nothing
        short = Problem(problem.model, problem.X[1:2, :20], problem.y[1:2, :20], problem.weight[1:2, :20],
                        problem.weight[1:2, :20].sum(-1), problem.lo, problem.hi)
        A_s, g_s = short.linearize(theta[1:2]).normal_equations()
        torch.testing.assert_close(A_s[0], A[1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_s[0], g[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "factored", "ratio"), [
    ("softmax-linear", True, 21 * 45 / 54**2),  # D = 8, k = 3: u has 6 entries (21 pairs), (1, x) 9 (45 pairs)
    ("sigmoid-regime2", True, 55 * 45 / 90**2),  # k = 5: u has 10 entries (55 pairs), P = 90
    ("hmoe-nonshared", True, 36 * 15 / 40**2),  # H = 2, L = 2, D = 4: u has 8 entries, (1, x) 5, P = 40
    # shared: the blocks are the non-shared Jacobian's (P_ns = 40), mapped to the P = 30 columns by M
    ("hmoe-shared", True, 36 * 15 / 40**2),
])
def test_which_models_get_the_factored_form(name, factored, ratio):
    _, problem, theta = _problem(name, {})
    lin = problem.linearize(theta)
    layout = khatri_rao_layout(lin.pieces, problem.X.shape[-1])
    assert (layout is not None) == factored
    if factored:
        blocks = problem.model.n_params if lin.column_map is None else lin.column_map.shape[-2]
        assert layout.n_columns == blocks
        assert layout.cost_ratio() == pytest.approx(ratio)
    if name == "hmoe-shared":
        assert tuple(lin.column_map.shape) == (3, 40, problem.model.n_params)


@pytest.mark.parametrize("rows", [[2], [0, 2], [1, 2, 3], [0, 1, 2, 3]])
def test_rows_of_the_normal_equations_are_those_of_the_whole_stack(rows):
    # one row of four gathers the input products, three of four compute all and pick: same numbers
    for name in ("softmax-linear", "hmoe-shared"):
        _, problem, theta = _problem(name, {}, B=4)
        lin = problem.linearize(theta)
        A, g = lin.normal_equations()
        index = torch.tensor(rows)
        A_r, g_r = lin.normal_equations(index)
        assert_tensors_match(A_r, A[index], rtol=1e-12, atol=1e-14)
        assert_tensors_match(g_r, g[index], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "options"), [("softmax-linear", {"gate_slope_std": 1.0}),
                                               ("hmoe-nonshared", {})])
def test_lm_with_factored_and_assembled_normal_equations_reaches_the_same_fit(name, options):
    # exact-specified, low noise, started near the truth: a well-determined minimum both must reach
    s = make_preset(name, seed=2, **options)
    model = s.true_model
    X, y = sample_batch(model, s.truth, 300, 0.01, [5, 6])
    theta0 = model.flatten(init_near_truth(model, model, s.truth, batch_shape=2, perturbation=0.05, seed=3))
    w = torch.ones_like(y)
    rss = []
    for structured in (True, False):
        problem = Problem(model, X, y, w, w.sum(-1), *Bounds().vectors(model), structured=structured)
        out = solve_lm(problem, theta0, max_iter=300, ftol=1e-12, xtol=1e-12, gtol=1e-12)
        assert out.converged.all()
        rss.append(problem.residual(out.theta).square().sum(-1))
    # the two orders of summation differ by rounding only: the same minimum to the tolerance
    torch.testing.assert_close(rss[0], rss[1], rtol=1e-10, atol=0)


class _NoAnalyticJacobian(FlatMoE):
    """A model without hand-derived derivatives: the solver falls back to autodiff."""

    jacobian_pieces = None
    value_and_jacobian = None


def test_models_without_analytic_jacobian_get_the_same_normal_equations_and_steps():
    s, problem, theta = _problem("softmax-linear", {})
    m = problem.model
    plain = _NoAnalyticJacobian(m.input_dim, m.n_atoms, gate=m.gate, expert=m.expert,
                                anchors={k: v.numpy() for k, v in m.anchors.items()})
    other = Problem(plain, problem.X, problem.y, problem.weight, problem.n_eff, problem.lo, problem.hi)
    lin_a, lin_b = problem.linearize(theta), other.linearize(theta)
    assert lin_b.pieces is None
    rows = torch.tensor([0, 2])
    for (A_a, g_a), (A_b, g_b) in ((lin_a.normal_equations(), lin_b.normal_equations()),
                                   (lin_a.normal_equations(rows), lin_b.normal_equations(rows))):
        torch.testing.assert_close(A_b, A_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_b, g_a, rtol=1e-10, atol=1e-12)
    out_a = solve_lm(problem, theta, max_iter=5, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    out_b = solve_lm(other, theta, max_iter=5, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    torch.testing.assert_close(out_b.theta, out_a.theta, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ memory budget
def test_auto_chunk_size_respects_max_memory():
    per_problem = 3 * 1000 * 54 * 8  # analytic Jacobian: 3 n P float64 numbers
    cpu = torch.device("cpu")
    assert auto_chunk_size(1000, 54, torch.float64, cpu, analytic=True, max_memory=5 * per_problem) == 5
    assert auto_chunk_size(1000, 54, torch.float64, cpu, analytic=True, max_memory=5 * per_problem - 1) == 4
    assert auto_chunk_size(1000, 54, torch.float32, cpu, analytic=True, max_memory=5 * per_problem) == 10
    with pytest.raises(ValueError, match="max_memory=1000 bytes is below"):
        auto_chunk_size(1000, 54, torch.float64, cpu, analytic=True, max_memory=1000)
    with pytest.raises(ValueError, match="max_memory"):
        auto_chunk_size(1000, 54, torch.float64, cpu, analytic=True, max_memory=-5)


def test_jacobian_bytes_is_what_auto_chunk_size_budgets():
    assert jacobian_bytes(1000, 54, torch.float64, analytic=True) == 3 * 1000 * 54 * 8
    assert jacobian_bytes(1000, 54, torch.float32) == 8 * 1000 * 54 * 4  # autodiff: 8 copies
    assert jacobian_bytes(10, 0, torch.float64) == 8 * 10 * 1 * 8  # at least one parameter column
    cpu = torch.device("cpu")
    for analytic in (False, True):
        one = jacobian_bytes(777, 31, torch.float32, analytic=analytic)
        assert auto_chunk_size(777, 31, torch.float32, cpu, analytic=analytic, max_memory=3 * one) == 3
        assert auto_chunk_size(777, 31, torch.float32, cpu, analytic=analytic, max_memory=3 * one - 1) == 2


def test_fit_batch_chunks_to_the_memory_budget_with_the_same_answers(monkeypatch):
    s = make_preset("softmax-linear", seed=0)
    model = s.fit_model
    X, y = sample_batch(s.true_model, s.truth, 200, s.noise_std, list(range(5)))
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=5, perturbation=0.1, seed=1)
    ref = fit_batch(model, X, y, init, max_iter=10)
    api = sys.modules[fit_batch.__module__]
    sizes: list[int] = []
    original = api._solve

    def spy(problem, *rest):
        sizes.append(problem.X.shape[0])
        return original(problem, *rest)

    monkeypatch.setattr(api, "_solve", spy)
    budget = 2 * 3 * 200 * model.n_params * 8  # two problems
    res = fit_batch(model, X, y, init, max_iter=10, max_memory=budget)
    assert sizes == [2, 2, 1]
    # chunks of 2, 2, 1 against one stack of 5: the same fits to round-off (see tests/roundoff.py)
    assert_tensors_match(res.risk, ref.risk)
    assert torch.equal(res.n_iter, ref.n_iter)


@pytest.mark.gpu
def test_chunks_stay_under_the_memory_budget_on_cuda():
    s = make_preset("softmax-linear", seed=0, input_dim=16, n_true=4, n_fit=5)
    model = s.fit_model
    n, B = 20_000, 12
    X, y = sample_batch(s.true_model, s.truth, n, s.noise_std, list(range(B)), device="cuda")
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=B, seed=1, device="cuda")
    budget = 3 * 3 * n * model.n_params * 8  # three problems per chunk
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fit_batch(model, X, y, init, max_iter=5, max_memory=budget)
    torch.cuda.synchronize()
    # fit_batch's own copies of the data (masked X, y, weights) come on top of the budget
    data = 2 * X.numel() * X.element_size() + 3 * y.numel() * y.element_size()
    assert torch.cuda.max_memory_allocated() - base <= budget + data
