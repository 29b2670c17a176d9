"""ops._launch: the eager fast path past Triton's argument binding.

On the CPU a real ``JITFunction`` whose compile-and-launch (``run``) is replaced by a recorder
checks the cache key and the arguments given to the compiled kernel's C launcher; on a GPU the
ops' kernels are compared with the fast path on and off, and on misaligned inputs."""
import pytest
import torch
from triton.runtime.jit import JITFunction

import ops
from ops import _launch


def _toy(X, Y, n, scale, FLAG: 'tl.constexpr', BLOCK: 'tl.constexpr' = 4):  # noqa: F821
    pass


class _Compiled:
    """A compiled kernel: ``run`` records the C launcher's arguments."""
    function = 11
    packed_metadata = (4, 1, 0)

    def __init__(self, launches):
        self.run = lambda *args: launches.append(args)


@pytest.fixture
def toy(monkeypatch):
    """(launcher, Triton-path calls, C-launcher calls) of a JITFunction whose ``run`` records
    the call and returns a :class:`_Compiled`; device 0 with raw stream 7."""
    kernel = JITFunction(_toy)
    triton_calls, launches = [], []

    def run(*args, grid, warmup, **kwargs):
        triton_calls.append((grid, args, kwargs))
        return _Compiled(launches)
    monkeypatch.setattr(kernel, 'run', run)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch._C, '_cuda_getCurrentRawStream', lambda device: 7, raising=False)
    monkeypatch.setattr(_launch, 'ENABLED', True)
    return _launch.fast_launcher(kernel), triton_calls, launches


def test_fast_launcher_keys_what_triton_specializes_on(toy):
    launcher, triton_calls, launches = toy
    buffer = torch.zeros(64)
    x, y = buffer[:16], buffer[16:32]   # 16-byte aligned (offsets 0 and 64 bytes)
    launcher[(3,)](x, y, 5, 0.5, FLAG=True)
    assert len(triton_calls) == 1 and not launches
    x2, y2 = buffer[32:48], buffer[48:]
    launcher[(3, 2)](x2, y2, 5, 0.25, FLAG=True)   # the same key: the C launcher, no binding
    assert len(triton_calls) == 1 and len(launches) == 1
    grid_stream_kernel, args = launches[0][:9], launches[0][9:]
    assert grid_stream_kernel == (3, 2, 1, 7, 11, (4, 1, 0), None, None, None)
    assert args[0] is x2 and args[1] is y2 and args[2:] == (5, 0.25, True, 4)  # BLOCK default
    for args, meta in [((buffer[1:17], y, 5, 0.5), {}),          # misaligned tensor
                       ((x.double(), y, 5, 0.5), {}),            # another dtype
                       ((x, y, 6, 0.5), {}),                     # another int
                       ((x, y, True, 0.5), {}),                  # a bool, not the int 1
                       ((x, y, 5, 0.5), {'num_warps': 8}),       # another option
                       ((x, y, 5, 0.5), {'BLOCK': 8})]:          # another constexpr
        before = len(triton_calls)
        launcher[(3,)](*args, FLAG=True, **meta)
        assert len(triton_calls) == before + 1, (args, meta)
    assert len(launches) == 1


def test_fast_launcher_takes_tritons_path_for_hooks_and_odd_calls(toy, monkeypatch):
    from triton import knobs
    launcher, triton_calls, launches = toy
    x, y = torch.zeros(16), torch.zeros(16)
    launcher[(1,)](x, y, 5, 0.5, FLAG=False)
    launcher[(1,)](x, y, 5, 0.5, FLAG=False)
    assert len(triton_calls) == 1 and len(launches) == 1
    cases = [lambda: launcher[[1]](x, y, 5, 0.5, FLAG=False),           # grid not a tuple
             lambda: launcher[(1,)](x, y, (5,), 0.5, FLAG=False),       # an argument not keyed
             lambda: launcher[(1,)](x, y, 5, 0.5, FLAG=[False])]       # unhashable constexpr
    for case in cases:
        case()
    monkeypatch.setattr(knobs.runtime, 'launch_enter_hook', lambda metadata: None)
    launcher[(1,)](x, y, 5, 0.5, FLAG=False)                            # a profiler's hook
    monkeypatch.undo()
    assert len(triton_calls) == 1 + len(cases) + 1 and len(launches) == 1


def test_onnx_export_guard_refuses_remembered_kernels(toy, monkeypatch):
    """A kernel the fast path remembers (whose launches skip ``JITFunction.run``) still raises
    inside the export guard, which patches ``JITFunction.run``."""
    from backbones.deploy import forbid_triton_launches
    launcher, triton_calls, launches = toy
    x, y = torch.zeros(16), torch.zeros(16)
    launcher[(1,)](x, y, 5, 0.5, FLAG=False)
    monkeypatch.delattr(launcher.kernel, 'run')   # the class's run again: the guard's
    with forbid_triton_launches(), pytest.raises(RuntimeError, match="Triton kernel '_toy'"):
        launcher[(1,)](x, y, 5, 0.5, FLAG=False)
    assert _launch.ENABLED and not launches


def test_fast_launcher_leaves_other_kernels_to_triton():
    class Interpreted:       # what TRITON_INTERPRET=1 gives, or a test's stand-in
        def __getitem__(self, grid):
            return lambda *args, **kwargs: ('launched', grid, args, kwargs)
    assert _launch.fast_launcher(Interpreted())[(2,)](1, A=3) == ('launched', (2,), (1,), {'A': 3})


@pytest.mark.gpu
def test_ops_agree_with_and_without_the_fast_path_on_gpu(monkeypatch):
    """Layer norm, depthwise conv and gather attention (fwd + bwd), fp32: the fast path gives
    Triton's results, and a 4-byte-misaligned input (keyed apart) stays right."""
    def run(offset):
        gen = torch.Generator(device='cuda').manual_seed(0)
        def rand(*shape):
            flat = torch.randn(offset + torch.Size(shape).numel(), device='cuda', generator=gen)
            return flat[offset:].view(shape).requires_grad_()
        x, w, b = rand(2, 14, 14, 64), rand(64), rand(64)
        cw, cb = rand(64, 1, 5, 5), rand(64)
        q, k, v = rand(2, 2, 64, 32), rand(2, 2, 64, 32), rand(2, 2, 64, 32)
        index = torch.randint(0, 4, (2, 4, 2), device='cuda', generator=gen)
        outs = [ops.layer_norm(x, w, b, backend='triton'),
                ops.depthwise_conv2d(x, cw, cb, backend='triton'),
                ops.gather_attention(q, k, v, index, block_q=16, block_k=16, backend='triton')]
        leaves = [x, w, b, cw, cb, q, k, v]
        grads = torch.autograd.grad(sum(o.float().square().sum() for o in outs), leaves)
        return outs + list(grads)
    monkeypatch.setattr(_launch, 'ENABLED', False)
    expected = {offset: run(offset) for offset in (0, 1)}
    monkeypatch.setattr(_launch, 'ENABLED', True)
    for _ in range(2):   # first the misses, then the C-launcher hits
        for offset in (0, 1):
            for got, want in zip(run(offset), expected[offset]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from ops import _triton_depthwise_conv, _triton_gather_attention, _triton_layer_norm
    for kernel in (_triton_layer_norm._fwd_kernel, _triton_depthwise_conv._conv_rows_kernel,
                   _triton_gather_attention._fwd_kernel):
        assert len(_launch.fast_launcher(kernel).compiled) >= 2   # aligned and misaligned
