"""The multi-tensor LAMB against the per-tensor reference, and LAMB under ZeRO-2/3 against one process at ZeRO-0."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hpdm.optim import Lamb, param_groups

SCRIPT = Path(__file__).parent / "scripts" / "lamb_zero_run.py"


class ReferenceLamb(torch.optim.Optimizer):
    """The per-tensor LAMB that the multi-tensor one replaced (hpdm.optim.Lamb before issue 11)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                g = p.grad.float()
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["exp_avg"] / (1 - b1 ** state["step"])
                v_hat = state["exp_avg_sq"] / (1 - b2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                w_norm, u_norm = p.float().norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_((update * trust).to(p.dtype), alpha=-group["lr"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.conv = nn.Conv1d(1, 2, 3)
        self.frozen_grad = nn.Parameter(torch.randn(4, 5))  # in the graph with a zero gradient
        self.unused = nn.Parameter(torch.randn(7))  # never in the graph: grad stays None
        self.zero = nn.Parameter(torch.zeros(3, 3))  # ||w|| = 0 at first: trust ratio 1

    def forward(self, x):
        h = torch.tanh(self.a(x))
        c = self.conv(h[:, None]).flatten(1).sum(1, keepdim=True)
        return self.b(h) + c + 0 * self.frozen_grad.sum() + (self.zero @ torch.ones(3)).sum()


def test_foreach_lamb_equals_per_tensor_reference():
    torch.manual_seed(0)
    nets = [Net(), Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [Lamb(param_groups(nets[0], 0.1), lr=0.01), ReferenceLamb(param_groups(nets[1], 0.1), lr=0.01)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    assert nets[0].unused.grad is None and torch.equal(nets[0].unused, nets[1].unused)
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        a, b = opts[0].state[p], opts[1].state[q]
        assert a.keys() == b.keys() and a.get("step") == b.get("step")
        if a:
            assert type(a["step"]) is int
            torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-10)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(tmp_path: Path, procs: int, stage: int, *flags: str) -> dict[str, torch.Tensor]:
    """Final weights of ``SCRIPT`` in one plain process or 2 under the `deepspeed` launcher (CPU, gloo, loopback)."""
    out = tmp_path / f"w{procs}_{stage}{''.join(flags)}.pt"
    args = [str(SCRIPT), str(stage), str(out), *flags]
    cmd = ([sys.executable, *args] if procs == 1 else
           [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(_port()), *args])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(out)


@pytest.mark.slow
def test_zero_lamb_matches_one_process(tmp_path):
    """2 processes at ZeRO-2 and ZeRO-3 give the weights of 1 process at ZeRO-0 (same global batch), and ZeRO-2
    without the partitions attached does not: its trust ratio would be taken over whole flat partitions."""
    reference = _weights(tmp_path, 1, 0)
    for stage in (2, 3):
        got = _weights(tmp_path, 2, stage)
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {k}")
    unattached = _weights(tmp_path, 2, 2, "--no-attach")
    assert any(not torch.allclose(unattached[k], v, rtol=1e-3, atol=1e-4) for k, v in reference.items())
