"""Each algorithm's contract is declared once (C++) and read by every layer: the
step op's hyper list and state lists, the coefficient table the Triton backend
reads by column name, the ``begin_step`` prologue and the optimizers' ``_hyper``."""
from __future__ import annotations

import math

import pytest
import torch

import amos_fused as af
from amos_fused import contracts
from amos_fused.contracts import call_step, column_indices, contract, step_arguments
from registry import CASES

# algorithm -> the registry's cases of it (every optimizer class of the registry)
OPTIMIZERS = {}
for _case in CASES.values():
    OPTIMIZERS.setdefault(_case.cls.algorithm, []).append(_case)


def test_every_algorithm_has_an_optimizer_and_a_contract():
    assert sorted(contracts.algorithms()) == sorted(OPTIMIZERS)
    for name in contracts.algorithms():
        c = contract(name)
        assert len(c.states) == len(c.enabled_by) and c.columns and c.hyper
        assert all(flag == "" or flag in c.hyper for flag in c.enabled_by)


@pytest.mark.parametrize("algorithm", sorted(OPTIMIZERS))
def test_optimizer_hyper_names_are_the_contracts(algorithm):
    for case in OPTIMIZERS[algorithm]:
        opt = case.make([torch.nn.Parameter(torch.randn(4, 3))], "reference")
        assert opt.algorithm == algorithm
        assert sorted(opt._hyper(opt.param_groups[0])) == sorted(contract(algorithm).hyper)


def test_unknown_algorithm_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown algorithm 'no_such_rule'.*adam"):
        torch.ops.amos_fused.contract("no_such_rule")
    with pytest.raises(ValueError, match="unknown algorithm"):
        torch.ops.amos_fused.step("no_such_rule", [torch.zeros(1)], [torch.zeros(1)], [], [torch.tensor(0.0)],
                                  [], [])


def test_wrong_hyper_names_or_counts_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        step_arguments("lion", dict(lr=1.0, beta1=0.9, beta2=0.99), {"exp_avg": []})
    p, g, m = torch.zeros(3), torch.ones(3), torch.zeros(3)
    step = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"expected 4 hyper-parameters \(lr, beta1, beta2, weight_decay\)"):
        torch.ops.amos_fused.step("lion", [p], [g], [m], [step], [1e-3, 0.9, 0.99], [])
    with pytest.raises(ValueError, match="state lists"):
        torch.ops.amos_fused.step("lion", [p], [g], [m, m], [step], [1e-3, 0.9, 0.99, 0.0], [])
    with pytest.raises(ValueError, match="per-tensor"):
        torch.ops.amos_fused.step("lion", [p], [g], [m], [step], [1e-3, 0.9, 0.99, 0.0], [1.0])
    assert float(step) == 0.0 and torch.equal(p, torch.zeros(3)) and torch.equal(m, torch.zeros(3))


def test_column_readers_must_name_every_column():
    columns = contract("lion").columns
    assert column_indices("lion", list(reversed(columns))) == list(reversed(range(len(columns))))
    with pytest.raises(RuntimeError, match="do not match"):
        column_indices("lion", columns[:-1])
    with pytest.raises(RuntimeError, match="do not match"):
        column_indices("lion", list(columns[:-1]) + ["neg_step_size"])


def _begin(algorithm, hyper, n=2, per_tensor=(), state_shape=None, found_inf=None, start=(0.0, 4.0)):
    params = [torch.randn(3) for _ in range(n)]
    grads = [torch.randn(3) for _ in range(n)]
    c = contract(algorithm)
    state = {key: [torch.zeros(state_shape or 3) for _ in range(n)] for key in c.states}
    states, values = step_arguments(algorithm, hyper, state)
    steps = [torch.tensor(float(s)) for s in start[:n]]
    run, table = torch.ops.amos_fused.begin_step(algorithm, params, grads, states, steps, values,
                                                 list(per_tensor), None, found_inf)
    return run, table, steps, {name: table[:, i] for i, name in enumerate(c.columns)}


def test_adam_table_is_the_equations():
    """Independent of csrc/step_coefficients.h: the columns are Adam's scalars at the
    next step counts t = 1 and t = 5."""
    h = dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True,
             amsgrad=False,
             bias_correction=True)
    run, table, steps, col = _begin("adam", h)
    assert run and table.dtype == torch.float64 and table.shape == (2, len(contract("adam").columns))
    assert [float(s) for s in steps] == [0.0, 4.0]  # begin_step writes nothing: the table is at t + 1
    for i, t in enumerate((1.0, 5.0)):
        assert col["neg_step_size"][i] == pytest.approx(-0.01 / (1 - 0.9**t), rel=1e-15)
        assert col["bc2_sqrt"][i] == pytest.approx(math.sqrt(1 - 0.99**t), rel=1e-15)
        assert col["param_decay"][i] == pytest.approx(1 - 0.01 * 0.1, rel=1e-15)
        assert col["l2"][i] == 0.0 and col["lerp_small"][i] == 1.0 and col["grad_unscale"][i] == 1.0
        assert col["beta1_complement"][i] == pytest.approx(0.1, rel=1e-15)


def test_radam_table_rectifies_when_rho_exceeds_the_threshold():
    h = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
             rectify_threshold=5.0)
    run, _, _, col = _begin("radam", h, start=(0.0, 9.0))
    rho_inf = 2 / (1 - 0.999) - 1
    for i, t in enumerate((1.0, 10.0)):
        rho_t = rho_inf - 2 * t * 0.999**t / (1 - 0.999**t)
        assert col["rectified"][i] == float(rho_t > 5.0)
        if rho_t > 5.0:
            expected = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            assert col["rect"][i] == pytest.approx(expected, rel=1e-12)
    assert col["rectified"].tolist() == [0.0, 1.0]


def test_amos_and_scaled_adam_tables_take_the_per_tensor_values():
    h = dict(lr=0.04, beta=0.98, momentum=0.9, clip_value=1.0, extra_l2=0.0, d_coef=0.25, c_coef=0.25,
             epsilon=2.0**-125, use_momentum=True, clip=False)
    _, _, _, col = _begin("amos", h, per_tensor=(0.5, 0.1), state_shape=())
    assert col["alpha"].tolist() == pytest.approx([0.04 * 0.5, 0.04 * 0.1])
    assert col["d_scale"].tolist() == pytest.approx([0.25 * math.sqrt(0.02), 0.25 * math.sqrt(0.004)])
    assert col["clip"].tolist() == [0.0, 0.0]  # clip off: the column is not used
    assert col["momentum"].tolist() == pytest.approx([0.9, 0.9])
    h = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, p=2.0, inverse_time=True, q=0.5)
    _, _, _, col = _begin("scaled_adam", h, per_tensor=(3.0, 7.0))
    s = [1 / (2 * 0.01 * 2.0 * t + 1) for t in (1.0, 5.0)]
    assert col["init_norm"].tolist() == [3.0, 7.0]
    assert col["scale"].tolist() == pytest.approx([0.01 * x for x in s], rel=1e-15)
    assert col["rho"].tolist() == pytest.approx([0.01**2 / (2 * 0.5) * x for x in s], rel=1e-15)


def test_found_inf_skips_the_prologue():
    h = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
    run, table, steps, _ = _begin("lion", h, found_inf=torch.tensor(1.0))
    assert not run and table.shape[0] == 0 and [float(s) for s in steps] == [0.0, 4.0]


def test_call_step_matches_the_optimizer():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    p.grad = torch.randn(5, 4)
    q = p.detach().clone()
    opt = af.AdamW([p], lr=0.01, weight_decay=0.1, backend="cpu")
    opt.step()
    m, v, step = torch.zeros_like(q), torch.zeros_like(q), torch.tensor(0.0)
    call_step(torch.ops.amos_fused, "adam", [q], [p.grad], {"exp_avg": [m], "exp_avg_sq": [v]}, [step],
              opt._hyper(opt.param_groups[0]))
    assert torch.equal(q, p.detach()) and torch.equal(m, opt.state[p]["exp_avg"])
