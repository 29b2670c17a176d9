"""Benchmark ops.layer_norm against PyTorch's native LayerNorm and a torch.compile'd one, one
table per shape (BiFormer's residual stream: (rows, C) contiguous, rows = B * H * W).

    python tools/benchmark.py layernorm                        # every shape, every peer, bf16
    python tools/benchmark.py layernorm --shapes s1_401408x64 --reps-ms 100 --json ln.json
    python tools/benchmark.py layernorm --dtype fp16
    python tools/benchmark.py layernorm --tune --configs ln.json  # sweep tile rows, write the best
    python tools/benchmark.py layernorm --configs ln.json         # benchmark with those rows
    python tools/benchmark.py layernorm --smoke                   # tiny shapes, also on a CPU

Every peer normalizes x (rows, C) in ``--dtype`` with fp32 weight and bias (the model's
parameters) and differentiates in x, weight and bias. Columns: fwd ms and fwd+bwd ms as
CUDA-graph replays (``triton.testing.do_bench_cudagraph``; "(eager)" where capture fails), and
achieved GB/s over the minimum bytes of the problem in ``--dtype`` (forward: x read, y written;
backward: x and dy read, dx written; the statistics and weights not counted), the same byte
count for every peer, so a peer that writes an fp32 output is charged only for the bf16 one.
Above each table: relative L2 errors (out, dx, dweight, dbias) against the fp32 reference, of
ours and of the native peer.

Peers:
* ``ours``: ``ops.layer_norm(x, weight, bias, backend='triton')``: one forward kernel, one
  backward kernel (dx and dweight/dbias partials), two small torch sums.
* ``native``: ``F.layer_norm(x, (C,), weight.to(x.dtype), bias.to(x.dtype))``, as BiFormer's
  ``AutocastLayerNorm`` under autocast (the weight casts are timed too).
* ``native_amp``: ``F.layer_norm(x, (C,), weight, bias)`` under autocast (bf16, or fp16 for
  ``--dtype fp16``), what ``nn.LayerNorm`` does in AMP: autocast casts x to fp32, the output is
  fp32.
* ``compiled``: ``torch.compile`` of the reference, ``F.layer_norm(x.float(), (C,), weight,
  bias).to(x.dtype)`` (the semantics of ours), static shapes; "fails" if it does not compile.

``--tune`` times our forward and backward launchers alone (CUDA-graph replay) for candidate
rows of ``ops/_triton_layer_norm.py``'s table on every shape, prints each shape's best and,
per BLOCK_C, the row with the least summed slowdown over the shapes sharing it; ``--configs``
receives those rows (a ``set_tile_configs`` table) and all timings.

Without CUDA (``--smoke`` on a CPU) the Triton kernels run in the interpreter and times are
wall-clock medians of a few eager calls: a smoke test of the script, not a measurement.
"""
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before ops creates its @triton.jit functions
    os.environ.setdefault('TRITON_INTERPRET', '1')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ops  # noqa: E402
from ops import _triton_layer_norm as kernels  # noqa: E402
from ops._sizes import next_power_of_2  # noqa: E402
from ops.layer_norm import layer_norm_reference  # noqa: E402
from bench_timing import (DTYPES, choose_per_class, fwd_and_fwd_bwd_ms,  # noqa: E402
                          kernel_bench_parser, kernel_bench_setup, mean_slowdown,
                          measure_peers, run_header)

PEERS = ('ours', 'native', 'native_amp', 'compiled')
EPS = 1e-6  # BiFormer's LayerNorm eps


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    chans: int
    note: str = ''


SHAPES = [Shape(f's{stage}_{rows}x{chans}', rows, chans,
                f'BiFormer-{model} 224 px, batch 128, stage {stage}')
          for model, widths in (('T/S', (64, 128, 256, 512)), ('B', (96, 192, 384, 768)))
          for stage, (rows, chans) in enumerate(zip((401408, 100352, 25088, 6272), widths), 1)]
SMOKE_SHAPES = [Shape('smoke_37x64', 37, 64, 'smoke test'),
                Shape('smoke_13x100', 13, 100, 'smoke test')]
SHAPES_BY_NAME = {s.name: s for s in SHAPES + SMOKE_SHAPES}


# Candidate rows for --tune, per BLOCK_C: tiles of 1K-16K elements, 8 to 64 fp32 elements per
# thread; the backward's programs cap (a runtime argument: no recompilation) 264 to 2112, or
# uncapped (one row block per program, the partials then one row per block).
_TILES = (1024, 2048, 4096, 8192, 16384)
_WARPS = (1, 2, 4, 8, 16)
_PROGRAMS = (264, 528, 1056, 2112, 1 << 30)


def tune_rows(kind, block_c):
    rows = []
    for tile in _TILES:
        block_m = tile // block_c
        if block_m < 1 or (block_m == 1 and tile != block_c):
            continue
        for warps in _WARPS:
            if 8 <= tile // (32 * warps) <= 64:
                rows += ([(block_m, warps)] if kind == 'fwd' else
                         [(block_m, warps, p) for p in _PROGRAMS])
    return rows


def make_problem(shape: Shape, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, device=device, generator=generator)
    x = (rand(shape.rows, shape.chans) * 2 + 0.5).to(dtype)
    weight = 1 + 0.5 * rand(shape.chans)
    bias = 0.3 * rand(shape.chans)
    return x, weight, bias, rand(shape.rows, shape.chans).to(dtype)


def _amp_dtype(dtype):
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def make_peer(peer, dtype):
    """fn(x, weight, bias) -> y, and whether it runs under autocast."""
    if peer == 'ours':
        return lambda x, w, b: ops.layer_norm(x, w, b, EPS, backend='triton'), False
    if peer == 'native':
        return (lambda x, w, b: F.layer_norm(x, x.shape[-1:], w.to(x.dtype), b.to(x.dtype), EPS),
                False)
    if peer == 'native_amp':
        return lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS), True
    torch._dynamo.reset()  # a fresh cache per shape (static shapes, no recompile limit)
    return torch.compile(
        lambda x, w, b: F.layer_norm(x.float(), x.shape[-1:], w, b, EPS).to(x.dtype),
        dynamic=False), False


def _cpu_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(peer, problem, reps_ms):
    """dict(fwd, fwd_bwd, graph) in ms."""
    x, weight, bias, grad_out = problem
    fn, amp = make_peer(peer, x.dtype)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    device_type = x.device.type

    def forward():
        with torch.no_grad(), torch.autocast(device_type, _amp_dtype(x.dtype), enabled=amp):
            return fn(*leaves)

    def forward_backward():
        with torch.autocast(device_type, _amp_dtype(x.dtype), enabled=amp):
            out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    forward()
    forward_backward()
    if not x.is_cuda:
        return dict(fwd=_cpu_ms(forward, 3), fwd_bwd=_cpu_ms(forward_backward, 3), graph=False)
    torch.cuda.synchronize()
    return fwd_and_fwd_bwd_ms(forward, forward_backward, reps_ms)


def errors(problem):
    """Relative L2 errors (out, dx, dweight, dbias) of ours and of the native peer against the
    fp32 reference."""
    x, weight, bias, grad_out = problem

    def run(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (x, weight, bias)]
        out = fn(*leaves)
        return [out] + list(torch.autograd.grad(out, leaves, cast(grad_out).to(out.dtype)))
    exact = run(lambda *a: layer_norm_reference(*a, EPS), lambda t: t.float())

    def rel(results):
        return [((r.float() - e).norm() / e.norm()).item() for r, e in zip(results, exact)]
    return (rel(run(make_peer('ours', x.dtype)[0], lambda t: t)),
            rel(run(make_peer('native', x.dtype)[0], lambda t: t)))


def problem_bytes(shape, elem_bytes):
    """(fwd, fwd+bwd) minimum bytes: x read and y written; plus x, dy read and dx written."""
    elements = shape.rows * shape.chans
    return 2 * elements * elem_bytes, 5 * elements * elem_bytes


def format_table(shape, rows, nbytes, errs, bandwidth):
    names = ('out', 'dx', 'dw', 'db')
    floor = '' if bandwidth is None else (
        f'; copy-bandwidth floor fwd {nbytes[0] / bandwidth * 1e3:.4f} ms, fwd+bwd '
        f'{nbytes[1] / bandwidth * 1e3:.4f} ms')
    lines = [f'### {shape.name}: {shape.note}',
             (f'{shape.rows} x {shape.chans}; {nbytes[0] / 1e6:.1f} MB fwd, '
              f'{nbytes[1] / 1e6:.1f} MB fwd+bwd{floor}'),
             *(f'rel. L2 vs fp32: {peer} ' + ', '.join(f'{n} {e:.2e}' for n, e in zip(names, err))
               for peer, err in zip(('ours', 'native'), errs)),
             '', '| peer | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |',
             '|---|---|---|---|---|']
    for peer, r in rows.items():
        if 'error' in r:
            lines.append(f'| {peer} | fails: {r["error"]} | | | |')
            continue
        mark = '' if r['graph'] else ' (eager)'
        lines.append(f'| {peer} | {r["fwd"]:.4f}{mark} | {nbytes[0] / r["fwd"] / 1e6:.0f} | '
                     f'{r["fwd_bwd"]:.4f}{mark} | {nbytes[1] / r["fwd_bwd"] / 1e6:.0f} |')
    return '\n'.join(lines)


def _launcher(kind, problem, config):
    x, weight, bias, grad_out = problem
    if kind == 'fwd':
        return lambda: kernels.forward(x, weight, bias, EPS, x.dtype, config=config)
    _, mean, rstd = kernels.forward(x, weight, bias, EPS, x.dtype)
    return lambda: kernels.backward(grad_out, x, weight, mean, rstd, x.dtype, True, True, True,
                                    config=config)


def choose_rows(timings):
    """{kind: {BLOCK_C: row}}: per BLOCK_C the row with the least summed slowdown (time / the
    shape's best) over the shapes with that BLOCK_C."""
    return {kind: choose_per_class(per_block) for kind, per_block in timings.items()}


def tune(shapes, dtype, reps_ms, configs_path, kinds=kernels.KINDS):
    """Time our launchers of ``kinds`` alone for every candidate row (CUDA-graph replay) and
    write the chosen rows and all timings to ``configs_path`` after every shape."""
    from triton.testing import do_bench_cudagraph
    timings = {kind: {} for kind in kinds}
    for shape in shapes:
        problem = make_problem(shape, dtype, 'cuda')
        block_c = next_power_of_2(shape.chans)
        for kind in kinds:
            measured = {}
            for row in tune_rows(kind, block_c):
                try:
                    measured[row] = do_bench_cudagraph(_launcher(kind, problem, row),
                                                       rep=reps_ms, return_mode='median')
                except Exception as exc:  # e.g. out of resources: skip the row
                    print(f'{shape.name} {kind} {row}: {type(exc).__name__}', flush=True)
            timings[kind].setdefault(block_c, {})[shape.name] = measured
            best = min(measured, key=measured.get)
            current = kernels.tile_config(kind, shape.chans)
            current_ms = (f'{measured[current] * 1e3:.1f} us' if current in measured
                          else 'not timed')
            print(f'{shape.name:16s} {kind}: best row {best} {measured[best] * 1e3:.1f} us; '
                  f'current row {current} {current_ms}', flush=True)
        del problem
        torch.cuda.empty_cache()
        with open(configs_path, 'w') as f:
            json.dump(dict(configs=choose_rows(timings), timings={
                kind: {str(c): {name: {str(list(row)): ms for row, ms in per.items()}
                                for name, per in per_shape.items()}
                       for c, per_shape in per_block.items()}
                for kind, per_block in timings.items()}), f, indent=1)
    for kind, rows in choose_rows(timings).items():
        for block_c, row in rows.items():
            slowdown = mean_slowdown(row, timings[kind][block_c].values())
            print(f'chosen {kind} row for BLOCK_C {block_c}: {row}, mean slowdown '
                  f'{slowdown:.3f} vs the per-shape best', flush=True)
    print(f'wrote {configs_path}')


def main(argv=None):
    parser = kernel_bench_parser('layernorm', __doc__, SHAPES_BY_NAME, PEERS, DTYPES)
    parser.add_argument('--kinds', nargs='+', default=list(kernels.KINDS),
                        choices=kernels.KINDS, help='the kernels --tune sweeps')
    args = parser.parse_args(argv)
    cuda, dtype, shapes = kernel_bench_setup(args, 'layernorm', DTYPES, SHAPES, SMOKE_SHAPES)
    if args.tune:
        tune(shapes, dtype, args.reps_ms, args.configs, args.kinds)
        return
    if args.configs:
        with open(args.configs) as f:
            kernels.set_tile_configs(json.load(f)['configs'])
    device = 'cuda' if cuda else 'cpu'
    header, bandwidth = run_header(dtype, cuda)
    print(header, flush=True)
    elem_bytes = torch.finfo(dtype).bits // 8
    results = {}
    for shape in shapes:
        problem = make_problem(shape, dtype, device)
        errs = errors(problem)
        rows = measure_peers(args.peers, lambda peer, p=problem: measure(peer, p, args.reps_ms))
        nbytes = problem_bytes(shape, elem_bytes)
        for r in rows.values():
            if 'error' not in r:
                r.update(fwd_gbs=nbytes[0] / r['fwd'] / 1e6,
                         fwd_bwd_gbs=nbytes[1] / r['fwd_bwd'] / 1e6)
        results[shape.name] = dict(rows=rows, bytes=nbytes,
                                   errors=dict(ours=errs[0], native=errs[1]))
        print(format_table(shape, rows, nbytes, errs, bandwidth) + '\n', flush=True)
        del problem
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(header=header, configs={k: {str(c): r for c, r in v.items()}
                                                   for k, v in kernels._CONFIGS.items()},
                           results=results), f, indent=1)


if __name__ == '__main__':
    main()
