"""Host time per call of our ops and of the PyTorch ops they replace, side by side.

    python tools/benchmark.py overhead            # CUDA; tiny tensors, so the GPU idles
    python tools/benchmark.py overhead --calls 1000

Eager models of many small kernels (BiFormer: 30 blocks) are bound by the host: each op's
Python, dispatch, autograd node and kernel launch. This measures that cost per call, forward
and forward + backward (one ``torch.autograd.backward`` per call, so the fwd+bwd column also
holds the autograd engine's start-up, the same for every row), on inputs small enough that the
device work is negligible. A Python loop of 10^6 additions is timed first, to compare hosts.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ops  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='benchmark.py overhead', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--calls', type=int, default=300, help='timed calls per row')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args(argv)


def host_us_per_call(fn, calls: int, device: torch.device) -> float:
    """Wall microseconds per call of ``fn`` over ``calls`` calls, after 20 warm-up calls."""
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return 1e6 * (time.perf_counter() - start) / calls


def python_loop_ms() -> float:
    start, total = time.perf_counter(), 0
    for i in range(10 ** 6):
        total += i
    return 1e3 * (time.perf_counter() - start)


def cases(device: torch.device):
    """(name, forward, forward + backward) for each op pair, on tiny bf16 tensors."""
    def param(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    def fwd_bwd(fn, *inputs):
        def run():
            out = fn(*inputs)
            torch.autograd.backward(out, torch.ones_like(out))
        return run

    x = param(2, 4, 4, 64, dtype=torch.bfloat16)
    w, b = param(64), param(64)
    w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (w, b))
    conv_w, conv_b = param(64, 1, 5, 5, dtype=torch.bfloat16), param(64, dtype=torch.bfloat16)
    conv = torch.nn.Conv2d(64, 64, 5, padding=2, groups=64).to(device, torch.bfloat16)
    q = param(2, 2, 16, 32, dtype=torch.bfloat16)
    index = torch.zeros(2, 4, 1, dtype=torch.long, device=device)
    tokens = param(2, 16, 64, dtype=torch.bfloat16)
    w1, b1, w2, b2 = param(192, 64), param(192), param(64, 192), param(64)

    def plain_mlp(t):
        return F.linear(F.gelu(F.linear(t, w1, b1)), w2, b2)

    def ours_mlp(t):
        return ops.gelu_mlp(t, w1, b1, w2, b2)

    def autocast(fn):
        def run(*args):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn(*args)
        return run

    pairs = [
        ('layer_norm: ops', lambda t: ops.layer_norm(t, w, b, 1e-6), (x,)),
        ('layer_norm: F.layer_norm (bf16 weights)',
         lambda t: F.layer_norm(t, (64,), w16, b16, 1e-6), (x,)),
        ('depthwise 5x5 + add: ops', lambda t: ops.depthwise_conv2d(t, conv_w, conv_b, add=t),
         (x,)),
        ('depthwise 5x5 + add: nn.Conv2d (cuDNN)',
         lambda t: t + conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), (x,)),
        ('attention: ops.gather_attention',
         lambda t: ops.gather_attention(t, t, t, index, block_q=4, block_k=4), (q,)),
        ('attention: window layout', lambda t: ops.gather_attention(
            t, t, t, index, block_q=(2, 2), block_k=(2, 2), map_width=4), (q,)),
        ('attention: F.scaled_dot_product_attention',
         lambda t: F.scaled_dot_product_attention(t, t, t), (q,)),
        ('MLP (autocast): ops.gelu_mlp', autocast(ours_mlp), (tokens,)),
        ('MLP (autocast): Linear-GELU-Linear', autocast(plain_mlp), (tokens,)),
    ]
    for name, fn, inputs in pairs:
        def forward(fn=fn, inputs=inputs):
            with torch.no_grad():
                fn(*inputs)
        yield name, forward, fwd_bwd(fn, *inputs)
    yield ('region_routing (window layout, no grad)', lambda: ops.region_routing(
        tokens, tokens, block_q=(2, 2), block_k=(2, 2), map_width=4, topk=2), None)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    print(f'host: Python loop of 10^6 additions {python_loop_ms():.0f} ms; torch '
          f'{torch.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''))
    print('\n| op | fwd µs/call | fwd+bwd µs/call |\n|---|---:|---:|')
    rows = []
    for name, forward, forward_backward in cases(device):
        fwd = host_us_per_call(forward, args.calls, device)
        both = (host_us_per_call(forward_backward, args.calls, device)
                if forward_backward is not None else None)
        rows.append(dict(op=name, fwd_us=fwd, fwd_bwd_us=both))
        print(f'| {name} | {fwd:.1f} | {"-" if both is None else f"{both:.1f}"} |', flush=True)
    return rows


if __name__ == '__main__':
    main()
