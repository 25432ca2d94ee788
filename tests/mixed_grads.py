"""Setting a gradient of another dtype than its parameter (a bfloat16 gradient of a float32
parameter), shared by the low-byte tests."""

import torch


def assign_grad(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    """p.grad = g where g may have another dtype than p: torch >= 2.10 asks for p.grad_dtype to
    be set first; older torch takes it through .data."""
    if g.dtype != p.dtype:
        if hasattr(p, "grad_dtype"):
            p.grad_dtype = g.dtype
        else:
            p.grad = torch.zeros_like(p)
            p.grad.data = g
            return
    p.grad = g
