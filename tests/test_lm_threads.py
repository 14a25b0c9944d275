"""The LM worked through a queue of problems (a bounded stack topped up as problems stop) and on
several threads: every problem gets the answer it gets alone, and fit_batch restores torch's threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from roundoff import assert_tensors_match

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import Bounds, _lm, fit_batch, init_near_truth
from hmoe_sim.estimators import api as fit_api
from hmoe_sim.estimators._core import Problem
from hmoe_sim.estimators._lm import RowQueue, solve_lm, start_output, worker_threads

OPTIONS = dict(max_iter=150, ftol=1e-6, xtol=1e-8, gtol=1e-6)


def _stack(name: str, B: int = 7, n: int = 80):
    s = make_preset(name, seed=2)
    model = s.fit_model
    X, y = sample_batch(s.true_model, s.truth, n, s.noise_std, [np.random.SeedSequence([8, b]) for b in range(B)])
    # starts from near the truth to far from it: the problems stop after very different numbers of steps
    theta0 = torch.cat([model.flatten(init_near_truth(model, s.true_model, s.truth, batch_shape=1,
                                                      perturbation=0.05 + 0.25 * b, seed=b)) for b in range(B)])
    w = torch.ones_like(y)
    return Problem(model, X, y, w, w.sum(-1), *Bounds().vectors(model)), theta0


def _assert_same_output(a, b):
    for name in ("theta", "rel_change"):
        assert_tensors_match(getattr(a, name), getattr(b, name))
    for name in ("n_iter", "converged", "diverged"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_row_queue_hands_out_each_row_once_in_order():
    queue = RowQueue(5)
    assert list(queue.take(2)) == [0, 1]
    assert list(queue.take(0)) == []
    assert list(queue.take(4)) == [2, 3, 4]
    assert list(queue.take(3)) == []


@pytest.mark.parametrize("name", ["hmoe-shared", "softmax-linear"])
@pytest.mark.parametrize("stack", [1, 3])
def test_a_bounded_stack_topped_up_from_the_queue_gives_every_problem_its_answer(name, stack):
    problem, theta0 = _stack(name)
    whole = solve_lm(problem, theta0, **OPTIONS)
    assert int(whole.n_iter.min()) < int(whole.n_iter.max())  # problems stop at different steps
    bounded = solve_lm(problem, theta0, stack=stack, **OPTIONS)
    _assert_same_output(bounded, whole)
    # one at a time, each problem alone
    for b in range(theta0.shape[0]):
        alone = solve_lm(problem.take(torch.tensor([b])), theta0[b : b + 1], **OPTIONS)
        assert int(alone.n_iter[0]) == int(whole.n_iter[b])
        assert_tensors_match(alone.theta[0], whole.theta[b])


@pytest.mark.parametrize("solvers", [1, 3])
def test_solvers_sharing_a_queue_and_an_output_on_threads(solvers):
    # solvers=1: the queue only hands out rows; 3: the threads also balance their active problems
    problem, theta0 = _stack("hmoe-shared", B=9)
    whole = solve_lm(problem, theta0, **OPTIONS)
    out, queue = start_output(theta0, problem.lo, problem.hi), RowQueue(theta0.shape[0], solvers=solvers)
    threads = [threading.Thread(target=solve_lm, args=(problem, theta0),
                                kwargs=dict(queue=queue, stack=3, out=out, solver=k % solvers, **OPTIONS))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_same_output(out, whole)


def test_a_solver_with_two_fewer_problems_is_handed_half_the_difference():
    problem, theta0 = _stack("hmoe-shared", B=7)
    out, queue = start_output(theta0, problem.lo, problem.hi), RowQueue(7, solvers=2)
    assert list(queue.take(7)) == list(range(7))
    many = _lm._start(problem, range(0, 6), out, 1e-3, OPTIONS["gtol"])
    few = _lm._start(problem, range(6, 7), out, 1e-3, OPTIONS["gtol"])
    assert many.rows.numel() == 6 and few.rows.numel() == 1
    assert queue.balance(1, many, problem) is many  # nobody has asked; solver 0 has not reported yet
    assert queue.balance(0, few, problem) is few    # 1 + 2 <= 6: solver 0 asks
    kept = queue.balance(1, many, problem)          # hands over (6 - 1) // 2 = 2 problems
    assert kept.rows.tolist() == [0, 1, 2, 3]
    joined = queue.balance(0, few, problem)
    assert joined.rows.tolist() == [6, 4, 5]
    assert torch.equal(joined.theta[1:], many.theta[4:]) and torch.equal(joined.A[1:], many.A[4:])
    assert torch.equal(joined.sub.X[1:], problem.X[4:6])
    # balanced within one: nobody asks any more; a solver out of problems waits only while another has two
    assert queue.balance(1, kept, problem) is kept and queue.balance(0, joined, problem) is joined
    idle = RowQueue(3, solvers=2)
    idle.balance(1, few, problem)
    assert idle.wait_for_problems(0, problem) is None  # the other has one problem: nothing to hand over


def test_fit_batch_on_worker_threads_matches_one_thread_and_restores_torch_threads(monkeypatch):
    s = make_preset("hmoe-shared", seed=3)
    model = s.fit_model
    X, y = sample_batch(s.true_model, s.truth, 150, s.noise_std, [np.random.SeedSequence([9, b]) for b in range(6)])
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=6, perturbation=0.2, seed=4)
    before = torch.get_num_threads()
    serial = fit_batch(model, X, y, init, max_iter=80, workers=1)
    calls = []
    original = fit_api.solve_lm_in_threads

    def spy(problem, theta0, threads, **options):
        calls.append(threads)
        return original(problem, theta0, threads, **options)

    monkeypatch.setattr(fit_api, "solve_lm_in_threads", spy)
    monkeypatch.setattr(_lm, "MIN_SAMPLES_PER_WORKER", 100)
    threaded = fit_batch(model, X, y, init, max_iter=80, workers=3)
    assert calls == [3]
    assert torch.get_num_threads() == before
    for name in ("risk", "rel_change"):
        assert_tensors_match(getattr(threaded, name), getattr(serial, name))
    assert_tensors_match(model.flatten(threaded.params), model.flatten(serial.params))
    assert torch.equal(threaded.converged, serial.converged)


def test_small_stacks_stay_on_one_thread():
    # a part smaller than MIN_SAMPLES_PER_WORKER samples is not worth a thread (the GIL)
    assert _lm.MIN_SAMPLES_PER_WORKER == 20_000
    assert worker_threads(4, 16, 10_000) == 4
    assert worker_threads(4, 4, 10_000) == 2
    assert worker_threads(4, 3, 10_000) == 1
    assert worker_threads(8, 12, 316) == 1
    assert worker_threads(1, 64, 10_000) == 1


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_workers_must_be_a_positive_integer(bad):
    s = make_preset("softmax-linear", seed=1)
    X, y = sample_batch(s.true_model, s.truth, 20, s.noise_std, [1])
    init = init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=1, seed=0)
    with pytest.raises((ValueError, TypeError), match="workers"):
        fit_batch(s.fit_model, X, y, init, workers=bad)


def test_a_waiting_solver_is_handed_problems_and_close_ends_the_wait():
    import time

    problem, theta0 = _stack("hmoe-shared", B=4)
    out, queue = start_output(theta0, problem.lo, problem.hi), RowQueue(4, solvers=2)
    queue.take(4)
    four = _lm._start(problem, range(0, 4), out, 1e-3, OPTIONS["gtol"])
    assert four.rows.numel() == 4
    queue.balance(1, four, problem)
    got = []
    waiting = threading.Thread(target=lambda: got.append(queue.wait_for_problems(0, problem)))
    waiting.start()
    for _ in range(500):  # until solver 0 has asked
        if queue._asking == 0:
            break
        time.sleep(0.01)
    kept = queue.balance(1, four, problem)
    waiting.join(5)
    assert kept.rows.tolist() == [0, 1] and got[0].rows.tolist() == [2, 3]
    # a failed solver closes the queue: the others stop waiting
    closed = RowQueue(4, solvers=2)
    closed.balance(1, four, problem)
    waiting = threading.Thread(target=lambda: got.append(closed.wait_for_problems(0, problem)))
    waiting.start()
    closed.close()
    waiting.join(5)
    assert not waiting.is_alive() and got[1] is None


def test_a_failing_solver_does_not_leave_the_others_waiting(monkeypatch):
    problem, theta0 = _stack("hmoe-shared", B=6)
    original, calls = _lm._iterate, []

    def failing(act, *args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 5:
            raise RuntimeError("solver failed")
        return original(act, *args, **kwargs)

    monkeypatch.setattr(_lm, "_iterate", failing)
    errors = []

    def run() -> None:
        try:
            _lm.solve_lm_in_threads(problem, theta0, 2, **OPTIONS)
        except RuntimeError as error:
            errors.append(str(error))

    runner = threading.Thread(target=run)
    runner.start()
    runner.join(60)
    assert not runner.is_alive() and errors == ["solver failed"]
