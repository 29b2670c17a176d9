"""Column sums (bias gradients): ``ops.column_sum`` against PyTorch's ``sum(0)``, side by side.

    python tools/benchmark.py colsum              # CUDA; BiFormer's bias-gradient shapes
    python tools/benchmark.py colsum --dtype fp32

A Linear's bias gradient is the column sum of its (tokens, C) output gradient. ``sum(0)`` of a
tall bf16 matrix runs far below copy bandwidth on an H200; ``ops.column_sum`` computes it as
``torch.mv(x.t(), ones)`` from ``COLUMN_SUM_MV_MIN_ROWS`` rows. Both are timed as CUDA-graph
replays (median), and each row also shows the other form, so the threshold can be checked
from one run. Shapes: the qkv/fc1 and proj/fc2 bias gradients of BiFormer-T/S at 224 px,
batch 128 (stages 1-4). On a CPU (smoke test) times are wall-clock medians of a few calls.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ops  # noqa: E402
from ops.mlp import COLUMN_SUM_MV_MIN_ROWS  # noqa: E402

SHAPES = [(401408, 192), (401408, 64), (100352, 384), (100352, 128), (25088, 768),
          (25088, 256), (6272, 1536), (6272, 512)]
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='benchmark.py colsum', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dtype', default='bf16', choices=list(DTYPES))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--reps-ms', type=int, default=50, help='timing budget per row')
    parser.add_argument('--shapes', nargs='+', metavar='ROWSxC',
                        help='shapes to time instead of the defaults, e.g. 401408x192')
    return parser.parse_args(argv)


def _median_ms(fn, device: torch.device, reps_ms: int) -> float:
    if device.type == 'cuda':
        from bench_timing import time_ms
        return time_ms(fn, reps_ms, graph=True)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = ([tuple(int(v) for v in s.split('x')) for s in args.shapes] if args.shapes
              else SHAPES)
    print(f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
          f'{torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}, torch '
          f'{torch.__version__}, {args.dtype}; ops.column_sum uses torch.mv from '
          f'{COLUMN_SUM_MV_MIN_ROWS} rows on CUDA')
    print('\n| rows x C | MB | sum(0) µs | mv µs | ops.column_sum µs | column_sum TB/s |')
    print('|---|---:|---:|---:|---:|---:|')
    results = []
    for rows, chans in shapes:
        x = torch.randn(rows, chans, device=device, dtype=dtype)
        ones = x.new_ones(rows)
        row = dict(rows=rows, chans=chans, mb=x.numel() * x.element_size() / 1e6)
        for name, fn in (('sum', lambda: x.sum(0)), ('mv', lambda: torch.mv(x.t(), ones)),
                         ('column_sum', lambda: ops.column_sum(x))):
            row[name] = 1e3 * _median_ms(fn, device, args.reps_ms)
        row['tb_s'] = row['mb'] / row['column_sum']  # MB per µs = TB/s
        results.append(row)
        print(f"| {rows} x {chans} | {row['mb']:.0f} | {row['sum']:.1f} | {row['mv']:.1f} | "
              f"{row['column_sum']:.1f} | {row['tb_s']:.2f} |", flush=True)
        del x, ones
    return results


if __name__ == '__main__':
    main()
