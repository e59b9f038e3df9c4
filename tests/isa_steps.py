"""Steps every optimizer class on the CPU kernels with the inputs in ``argv[1]``
and saves the params and states it reaches, and the messages of some refused
calls, to ``argv[2]`` (with the instruction set that ran): run natively and on
an emulated older CPU by test_isa_isolation.py, which compares the two."""
import sys

import torch

import amos_fused as af
from registry import ALL_CLASS_CASES

SETTINGS = {"float32": (torch.float32, {}), "bfloat16": (torch.bfloat16, {}),
            "bf16_stochastic_round": (torch.bfloat16, {"bf16_stochastic_round": True}),
            "master_weights": (torch.bfloat16, {"master_weights": True})}


def _run(case, inputs, dtype, extra):
    params = [torch.nn.Parameter(x.to(dtype)) for x in inputs["params"]]
    opt = case.make(params, "cpu", **extra)
    for grads in inputs["grads"]:
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()
                                                   if isinstance(v, torch.Tensor)]


def _refusals():
    """The messages of calls the C++ checks refuse (their error paths build strings)."""
    out = []
    p = torch.nn.Parameter(torch.zeros(5000))
    opt = af.AdamW([p], backend="cpu")
    p.grad = torch.zeros(5000)
    opt.state[p].update(step=torch.tensor(1.0), exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(5000))
    for call in (lambda: torch.ops.amos_fused.set_cpu_capability("bogus"), opt.step):
        try:
            call()
            out.append("no error")
        except Exception as error:  # the message is what is compared
            out.append(f"{type(error).__name__}: {error}")
    return out


def main(inputs_path, out_path):
    inputs = torch.load(inputs_path)
    results = {"capability": torch.ops.amos_fused.cpu_capability(), "refusals": _refusals()}
    for name, case in ALL_CLASS_CASES.items():
        for setting, (dtype, extra) in SETTINGS.items():
            if dtype == torch.float32 or name in ("AdamW", "Amos", "AdamW8bit", "Lion8bit", "Amos8bit"):
                results[f"{name}/{setting}"] = _run(case, inputs, dtype, extra)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
