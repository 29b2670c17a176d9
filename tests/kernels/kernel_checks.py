"""Comparison helpers shared by the kernel tests (imported by the test modules beside it)."""
import torch


def forward_and_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of every tensor input (None inputs stay None)."""
    inputs = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    tensors = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, tensors, grad_out))
    return [out] + [None if t is None else next(grads) for t in inputs]


def max_error(result, exact):
    """Max absolute difference in fp64 (0 for empty tensors)."""
    if result.numel() == 0:
        return 0.0
    return (result.double().cpu() - exact.double().cpu()).abs().max().item()


def relative_l2(got, ref):
    """||got - ref|| / ||ref||, in fp32."""
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()
