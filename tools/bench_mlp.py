"""Benchmark the fused LayerNorm-MLP forward kernel (ops._triton_ln_mlp: ``x + fc2(gelu(fc1(
LN(x))))`` in one launch) against the launches it replaces and a torch.compile'd reference, one
table per shape (BiFormer's MLP halves at 224 px, batch 128: rows = B * H * W, hidden = 3 C).

    python tools/benchmark.py mlp                          # every shape, every peer, bf16
    python tools/benchmark.py mlp --shapes s1_401408x64 --peers ours unfused
    python tools/benchmark.py mlp --tune --configs mlp.json  # sweep tile rows, write the best
    python tools/benchmark.py mlp --configs mlp.json         # benchmark with those rows
    python tools/benchmark.py mlp --smoke                    # tiny shapes, also on a CPU

Every peer computes the forward (no gradient) in ``--dtype`` from a residual stream x in that
dtype and fp32 parameters (the model's), with the roundings of the module path
(:func:`ops.mlp.residual_mlp_reference`). Peers:

* ``ours``: the kernel on the fp32 parameters, rounded as it reads them (BiFormer's inference).
* ``ours_cast``: the kernel on fc1/fc2 weights cast beforehand (the training forward, which
  keeps the casts for the backward; the casts are not timed).
* ``unfused``: what the fused block ran before the kernel: ops.layer_norm's kernel, the four
  parameter casts, ``addmm``, ``gelu``, ``addmm`` and the residual add (seven launches).
* ``compiled``: ``torch.compile`` of the reference (static shapes; Inductor fuses the
  LayerNorm and the pointwise work around cuBLAS products); "fails" if it does not compile.

Columns: fwd ms as CUDA-graph replays (``triton.testing.do_bench_cudagraph``; "(eager)" where
capture fails), TFLOP/s of the two products (4 * rows * C * hidden), and GB/s over the minimum
bytes (x read, y written). Above each table: relative L2 error of the branch (y - x) against
the fp32 reference, of ours and of ``unfused``.

``--tune`` times ``ours`` alone for candidate rows of the kernel's table on every shape,
compiling the candidates first in ``--workers`` processes; it prints each shape's best and,
per BLOCK_C, the row with the least summed slowdown over the shapes sharing it; ``--configs``
receives those rows (a ``set_tile_configs`` table) and all timings.

Without CUDA (``--smoke`` on a CPU) the kernel runs in the interpreter and times are
wall-clock medians of a few calls: a smoke test of the script, not a measurement.
"""
import itertools
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before ops creates its @triton.jit functions
    os.environ.setdefault('TRITON_INTERPRET', '1')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops import _triton_layer_norm, _triton_ln_mlp as kernels  # noqa: E402
from ops._sizes import next_power_of_2  # noqa: E402
from ops.mlp import residual_mlp_reference  # noqa: E402
from bench_layer_norm import _cpu_ms  # noqa: E402
from bench_timing import (DTYPES, choose_per_class, compile_in_workers,  # noqa: E402
                          kernel_bench_parser, kernel_bench_setup, mean_slowdown, measure_peers,
                          run_header, time_ms)

PEERS = ('ours', 'ours_cast', 'unfused', 'compiled')
EPS = 1e-6  # BiFormer's LayerNorm eps


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int  # H * W per sample
    chans: int
    note: str = ''

    @property
    def rows(self):
        return self.batch * self.tokens

    @property
    def hidden(self):
        return 3 * self.chans


SHAPES = [Shape(f's{stage}_{128 * tokens}x{chans}', 128, tokens, chans,
                f'BiFormer-{model} 224 px, batch 128, stage {stage}')
          for model, widths in (('T/S', (64, 128, 256, 512)), ('B', (96, 192, 384)))
          for stage, (tokens, chans) in enumerate(zip((3136, 784, 196, 49), widths), 1)]
SMOKE_SHAPES = [Shape('smoke_2x25x32', 2, 25, 32, 'smoke test'),
                Shape('smoke_1x9x24', 1, 9, 24, 'smoke test')]
SHAPES_BY_NAME = {s.name: s for s in SHAPES + SMOKE_SHAPES}

# --tune candidates per BLOCK_C: (BLOCK_M, BLOCK_H, num_warps, num_stages) whose fp32
# accumulator takes at most 128 registers per thread and whose shared memory (the pipelined
# fp32 weight chunks, h and the GELU output in 16 bits) fits an H200's 227 KiB.
def tune_rows(block_c):
    rows = []
    stage_counts = (1, 2) if block_c >= 256 else (2, 3)
    for block_m, block_h, warps, stages in itertools.product((32, 64, 128), (32, 64, 128),
                                                              (4, 8), stage_counts):
        registers = block_m * block_c // (32 * warps)
        shared = ((stages - 1) * block_h * block_c * 8 + 2 * block_h * block_c * 2
                  + block_m * (block_c + block_h) * 2)
        if registers <= 128 and block_m * block_h // (32 * warps) <= 64 and shared <= 200 * 1024:
            rows.append((block_m, block_h, warps, stages))
    return rows


def make_problem(shape: Shape, dtype, device, seed=0):
    """(x (B, tokens, C) in dtype, fp32 parameters dict)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return torch.randn(*size, device=device, generator=generator) * scale
    c, hid = shape.chans, shape.hidden
    params = dict(ln_weight=1 + rand(c, scale=0.2), ln_bias=rand(c, scale=0.2),
                  fc1_weight=rand(hid, c, scale=c ** -0.5), fc1_bias=rand(hid, scale=0.1),
                  fc2_weight=rand(c, hid, scale=hid ** -0.5), fc2_bias=rand(c, scale=0.1))
    return rand(shape.batch, shape.tokens, c).to(dtype), params


def _reference(x, p, dtype):
    return residual_mlp_reference(x, p['ln_weight'], p['ln_bias'], EPS, p['fc1_weight'],
                                  p['fc1_bias'], p['fc2_weight'], p['fc2_bias'], dtype)


def make_peer(peer, problem, config=None):
    """A no-argument callable computing the forward of ``problem`` as ``peer`` does."""
    x, p = problem
    dtype = x.dtype
    if peer in ('ours', 'ours_cast'):
        if not kernels.supports(x.shape[-1], p['fc1_weight'].shape[0]):
            raise ValueError(f'C = {x.shape[-1]} is wider than the kernel takes '
                             f'({kernels.MAX_CHANNELS})')
        w1, w2 = p['fc1_weight'], p['fc2_weight']
        if peer == 'ours_cast':
            w1, w2 = w1.to(dtype), w2.to(dtype)
        return lambda: kernels.forward(x, p['ln_weight'], p['ln_bias'], EPS, w1, p['fc1_bias'],
                                       w2, p['fc2_bias'], dtype, config=config)[0]
    if peer == 'unfused':
        def unfused():
            h = _triton_layer_norm.forward(x, p['ln_weight'], p['ln_bias'], EPS, dtype,
                                           store_stats=False)[0]
            w1, b1, w2, b2 = (p[k].to(dtype) for k in ('fc1_weight', 'fc1_bias', 'fc2_weight',
                                                       'fc2_bias'))
            hidden = torch.addmm(b1, h.view(-1, h.shape[-1]), w1.t())
            branch = torch.addmm(b2, F.gelu(hidden), w2.t())
            return x + branch.view(x.shape)
        return unfused
    torch._dynamo.reset()  # a fresh cache per shape (static shapes, no recompile limit)
    compiled = torch.compile(_reference, dynamic=False)
    return lambda: compiled(x, p, dtype)


def measure(peer, problem, reps_ms):
    """dict(fwd, graph) in ms."""
    fn = make_peer(peer, problem)
    with torch.no_grad():
        fn()
        if not problem[0].is_cuda:
            return dict(fwd=_cpu_ms(fn, 3), graph=False)
        torch.cuda.synchronize()
        try:
            return dict(fwd=time_ms(fn, reps_ms, graph=True), graph=True)
        except Exception:  # capture unsupported: eager timing
            torch.cuda.synchronize()
            return dict(fwd=time_ms(fn, reps_ms, graph=False), graph=False)


def errors(problem):
    """Relative L2 error of the branch (y - x) of ours and of ``unfused`` against fp32."""
    x, p = problem
    with torch.no_grad():
        exact = _reference(x.float(), p, torch.float32) - x.float()
        return {peer: ((make_peer(peer, problem)().float() - x.float() - exact).norm()
                       / exact.norm()).item() for peer in ('ours', 'unfused')
                if peer != 'ours' or kernels.supports(x.shape[-1], p['fc1_weight'].shape[0])}


def format_table(shape, rows, errs, bandwidth, elem_bytes):
    flops = 4 * shape.rows * shape.chans * shape.hidden
    nbytes = 2 * shape.rows * shape.chans * elem_bytes
    floor = '' if bandwidth is None else f'; copy-bandwidth floor {nbytes / bandwidth * 1e3:.4f} ms'
    lines = [f'### {shape.name}: {shape.note}',
             f'{shape.rows} x {shape.chans}, hidden {shape.hidden}; {flops / 1e9:.1f} GFLOP, '
             f'{nbytes / 1e6:.1f} MB{floor}',
             'rel. L2 of the branch vs fp32: ' + ', '.join(f'{k} {v:.2e}' for k, v in errs.items()),
             '', '| peer | fwd ms | TFLOP/s | GB/s |', '|---|---|---|---|']
    for peer, r in rows.items():
        if 'error' in r:
            lines.append(f'| {peer} | fails: {r["error"]} | | |')
            continue
        mark = '' if r['graph'] else ' (eager)'
        lines.append(f'| {peer} | {r["fwd"]:.4f}{mark} | {flops / r["fwd"] / 1e9:.0f} | '
                     f'{nbytes / r["fwd"] / 1e6:.0f} |')
    return '\n'.join(lines)


def _compile_worker(shape_name, dtype_name, row):
    """Compile (into Triton's cache) one candidate row for one shape, on a two-sample input
    with the shape's specializations (same C, hidden and tokens per sample)."""
    shape = SHAPES_BY_NAME[shape_name]
    problem = make_problem(Shape(shape.name, 2, shape.tokens, shape.chans), DTYPES[dtype_name],
                           'cuda')
    try:
        make_peer('ours', problem, row)()
        torch.cuda.synchronize()
    except Exception:  # reported by the timing pass
        pass


def tune(shapes, dtype_name, reps_ms, configs_path, workers):
    """Time ``ours`` for every candidate row (CUDA-graph replay) and write the chosen rows and
    all timings to ``configs_path``."""
    from triton.testing import do_bench_cudagraph
    compile_in_workers(_compile_worker, [(s.name, dtype_name, row) for s in shapes
                                         for row in tune_rows(next_power_of_2(s.chans))],
                       workers)
    timings = {}
    for shape in shapes:
        problem = make_problem(shape, DTYPES[dtype_name], 'cuda')
        measured = {}
        block_c = next_power_of_2(shape.chans)
        for row in tune_rows(block_c):
            try:
                measured[row] = do_bench_cudagraph(make_peer('ours', problem, row), rep=reps_ms,
                                                   return_mode='median')
            except Exception as exc:  # e.g. out of resources: skip the row
                print(f'{shape.name} {row}: {type(exc).__name__}', flush=True)
        timings.setdefault(block_c, {})[shape.name] = measured
        best, current = min(measured, key=measured.get), kernels.tile_config(shape.chans)
        print(f'{shape.name:16s} best row {best} {measured[best] * 1e3:.1f} us; current row '
              f'{current} {measured.get(current, float("nan")) * 1e3:.1f} us', flush=True)
        del problem
        torch.cuda.empty_cache()
    chosen = choose_per_class(timings)
    for block_c, row in chosen.items():
        print(f'chosen row for BLOCK_C {block_c}: {row}, mean slowdown '
              f'{mean_slowdown(row, timings[block_c].values()):.3f} vs the per-shape best')
    with open(configs_path, 'w') as f:
        json.dump(dict(configs=chosen, timings={
            str(c): {name: {str(list(row)): ms for row, ms in per.items()}
                     for name, per in per_shape.items()} for c, per_shape in timings.items()}),
            f, indent=1)
    print(f'wrote {configs_path}')


def main(argv=None):
    parser = kernel_bench_parser('mlp', __doc__, SHAPES_BY_NAME, PEERS, DTYPES)
    parser.add_argument('--workers', type=int, default=8, help='compile processes for --tune')
    args = parser.parse_args(argv)
    cuda, dtype, shapes = kernel_bench_setup(args, 'mlp', DTYPES, SHAPES, SMOKE_SHAPES)
    if args.tune:
        tune(shapes, args.dtype, args.reps_ms, args.configs, args.workers)
        return
    if args.configs:
        with open(args.configs) as f:
            kernels.set_tile_configs(json.load(f)['configs'])
    header, bandwidth = run_header(dtype, cuda)
    print(header, flush=True)
    results = {}
    for shape in shapes:
        problem = make_problem(shape, dtype, 'cuda' if cuda else 'cpu')
        errs = errors(problem)
        rows = measure_peers(args.peers, lambda peer, p=problem: measure(peer, p, args.reps_ms))
        results[shape.name] = dict(rows=rows, errors=errs)
        print(format_table(shape, rows, errs, bandwidth, torch.finfo(dtype).bits // 8) + '\n',
              flush=True)
        del problem
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(header=header, configs={str(c): r for c, r in kernels._CONFIGS.items()},
                           results=results), f, indent=1)


if __name__ == '__main__':
    main()
