"""Benchmark ops.depthwise_conv2d (NHWC, fused add) against BiFormer's formulation and cuDNN on
a CUDA GPU, one table per shape.

    python tools/benchmark.py dwconv                          # every shape, every peer, bf16
    python tools/benchmark.py dwconv --shapes s56_c64_k3 det256_c64_k3 --reps-ms 100
    python tools/benchmark.py dwconv --autocast               # fp32 x/add/weight, bf16 autocast
    python tools/benchmark.py dwconv --tune --configs dw.json  # sweep tile rows, write the best
    python tools/benchmark.py dwconv --tune --kinds fwd dx --configs dw.json
    python tools/benchmark.py dwconv --configs dw.json        # benchmark with those rows

Every peer computes ``add + dwconv(x) + bias`` on an NHWC map x (B, H, W, C) and its gradients
in x, weight, bias and add. Columns: fwd ms and fwd+bwd ms as CUDA-graph replays
(``triton.testing.do_bench_cudagraph``; "(eager)" where capture fails, then ``do_bench``),
peak extra MiB of fwd+bwd over the inputs and grad_out, and the fraction of the memory floor
(x and add read, out written once forward; dy and x read, dx written once backward, at the
copy bandwidth measured in the same run). Above each table: relative L2 errors against an fp32
reference (ours, and the biformer peer in the same dtype).

Peers:
* ``ours``: ``ops.depthwise_conv2d(x, weight, bias, add=add, backend='triton')``: one kernel
  forward; backward one kernel for dx, one for per-tile dweight/dbias partials, a torch sum.
* ``biformer``: BiFormer's formulation before this op,
  ``add + F.conv2d(x.permute(0, 3, 1, 2), weight, bias, groups=C).permute(0, 2, 3, 1)`` with
  the module's NCHW-contiguous weight (the channels_last view of x).
* ``cudnn_cl``: x and weight as channels_last NCHW tensors (the cuDNN channels_last path), then
  a separate add; the output stays NCHW channels_last (no permute back).

``--tune`` times each of our launchers (fwd, dx, dw, or those of ``--kinds``) alone
(CUDA-graph replay) for each candidate row of ``ops/_triton_depthwise_conv.py``'s ``_CONFIGS``
on every shape, after compiling the candidates in parallel worker processes into Triton's disk
cache. It prints each shape's best and, per kernel and tile class (``tile_class``: kernels of
up to 3 rows or taller; 16- or 32-bit tensors, from the swept dtype), the row with the least
mean slowdown over that class's shapes. ``--configs`` receives those rows (a
``set_tile_configs`` table) and all timings, rewritten after every shape.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ops  # noqa: E402
from ops import _triton_depthwise_conv as kernels  # noqa: E402
from ops.depthwise_conv import depthwise_conv2d_reference  # noqa: E402
from bench_timing import (DTYPES, compile_in_workers, copy_bandwidth,  # noqa: E402
                          fwd_and_fwd_bwd_ms, least_slowdown, mean_slowdown, peak_extra_mib)

PEERS = ('ours', 'biformer', 'cudnn_cl')


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    height: int
    width: int
    chans: int
    kernel: int
    note: str = ''


SHAPES = [Shape(f's{size}_c{chans}_k{k}', 128, size, size, chans, k,
                f'BiFormer-S 224 px, batch 128, stage {stage}, '
                f'{"pos_embed 3x3" if k == 3 else "LePE 5x5"}')
          for stage, (size, chans) in enumerate(((56, 64), (28, 128), (14, 256), (7, 512)), 1)
          for k in (3, 5)]
SHAPES.append(Shape('det256_c64_k3', 8, 256, 256, 64, 3,
                    'BiFormer 1024 px detection, batch 8, stage 1 pos_embed 3x3'))
SHAPES_BY_NAME = {s.name: s for s in SHAPES}

# Candidate rows for --tune, (rows per strip, widest BLOCK_W, widest BLOCK_C, num_warps): fwd/dx
# with 4 to 16 fp32 elements per thread in each of the kh row accumulators, dw with 2 to 4 in
# each of its kh * kw tap accumulators.
_SLIDING_ROWS = [(h, w, c, nw) for h in (8, 16, 32) for w in (8, 16, 32) for c in (32, 64, 128)
                 for nw in (1, 2, 4)]
TUNE_ROWS = dict(fwd=[r for r in _SLIDING_ROWS if 4 <= r[1] * r[2] // (32 * r[3]) <= 16],
                 dw=[(h, w, c, nw) for h in (8, 16, 32) for w in (8, 16, 32) for c in (32, 64, 128)
                     for nw in (1, 2, 4, 8) if 2 <= w * c // (32 * nw) <= 4])
TUNE_ROWS['dx'] = TUNE_ROWS['fwd']


def make_problem(shape: Shape, dtype, seed=0):
    generator = torch.Generator(device='cuda').manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, device='cuda', generator=generator).to(dtype)
    x = rand(shape.batch, shape.height, shape.width, shape.chans)
    weight = rand(shape.chans, 1, shape.kernel, shape.kernel) * 0.2
    return x, weight, rand(shape.chans), rand(*x.shape), rand(*x.shape)


def ours(x, weight, bias, add):
    return ops.depthwise_conv2d(x, weight, bias, add=add, backend='triton')


def biformer(x, weight, bias, add):
    pad = weight.shape[-1] // 2
    return add + F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=pad,
                          groups=x.shape[-1]).permute(0, 2, 3, 1)


def cudnn_cl(x, weight, bias, add):
    """x, add: NCHW channels_last views; weight channels_last (prepared by ``peer_inputs``)."""
    pad = weight.shape[-1] // 2
    return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1]) + add


PEER_FNS = dict(ours=ours, biformer=biformer, cudnn_cl=cudnn_cl)


def peer_inputs(peer, x, weight, bias, add, grad_out):
    """The tensors a peer takes, as leaves requiring grad, and its grad_out."""
    if peer == 'cudnn_cl':
        x, add, grad_out = (t.permute(0, 3, 1, 2) for t in (x, add, grad_out))
        weight = weight.contiguous(memory_format=torch.channels_last)
        assert x.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, add)]
    return leaves, grad_out




def _autocast(enabled):
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=enabled)


def measure(peer, problem, reps_ms, autocast):
    """fwd / fwd_bwd ms (graph replay, eager if capture fails) and peak extra MiB."""
    x, weight, bias, add, grad_out = problem
    leaves, grad_out = peer_inputs(peer, x, weight, bias, add, grad_out)
    fn = PEER_FNS[peer]

    def forward():
        with torch.no_grad(), _autocast(autocast):
            return fn(*leaves)

    def forward_backward():
        with _autocast(autocast):
            out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    forward_backward()
    torch.cuda.synchronize()
    result = fwd_and_fwd_bwd_ms(forward, forward_backward, reps_ms)
    result['peak_mib'] = peak_extra_mib(forward_backward)
    return result


def errors(problem, autocast):
    """Relative L2 errors (out, dx, dweight, dbias, dadd) of ours and of the biformer peer
    against the torch reference in fp32."""
    x, weight, bias, add, grad_out = problem

    def run(fn, cast, use_autocast):
        leaves = [cast(t).detach().requires_grad_() for t in (x, weight, bias, add)]
        with _autocast(use_autocast):
            out = fn(*leaves)
        return [out] + list(torch.autograd.grad(out, leaves, cast(grad_out).to(out.dtype)))

    exact = run(depthwise_conv2d_reference, lambda t: t.float(), False)

    def rel(results):
        return [((r.float() - e).norm() / e.norm()).item() for r, e in zip(results, exact)]
    return (rel(run(ours, lambda t: t, autocast)), rel(run(biformer, lambda t: t, autocast)))


def floors_ms(shape, elem_bytes, bandwidth):
    elements = shape.batch * shape.height * shape.width * shape.chans
    one_pass = 3 * elements * elem_bytes / bandwidth * 1e3
    return one_pass, 2 * one_pass


def format_table(shape, rows, floors, errs):
    names = ('out', 'dx', 'dw', 'db', 'dadd')
    err_ours = ', '.join(f'{n} {e:.2e}' for n, e in zip(names, errs[0]))
    err_torch = ', '.join(f'{n} {e:.2e}' for n, e in zip(names, errs[1]))
    lines = [f'### {shape.name}: {shape.note}',
             f'B={shape.batch} {shape.height}x{shape.width}x{shape.chans} kernel '
             f'{shape.kernel}x{shape.kernel}; floor fwd {floors[0]:.3f} ms, fwd+bwd '
             f'{floors[1]:.3f} ms', f'rel. L2 vs fp32: ours {err_ours}',
             f'rel. L2 vs fp32: biformer {err_torch}', '',
             '| peer | fwd ms | fwd+bwd ms | peak extra MiB | floor fwd | floor fwd+bwd |',
             '|---|---|---|---|---|---|']
    for peer, r in rows.items():
        if 'error' in r:
            lines.append(f'| {peer} | fails: {r["error"]} | | | | |')
            continue
        mark = '' if r['graph'] else ' (eager)'
        lines.append(f'| {peer} | {r["fwd"]:.3f}{mark} | {r["fwd_bwd"]:.3f}{mark} | '
                     f'{r["peak_mib"]:.0f} | {floors[0] / r["fwd"]:.0%} | '
                     f'{floors[1] / r["fwd_bwd"]:.0%} |')
    return '\n'.join(lines)


def _dtypes(dtype_name, autocast):
    """(tensor dtype, compute dtype): fp32 tensors computing in bf16 under --autocast."""
    if autocast:
        return torch.float32, torch.bfloat16
    dtype = DTYPES[dtype_name]
    return dtype, dtype


def _launcher(kind, problem, config, compute_dtype):
    x, weight, bias, add, grad_out = problem
    if kind == 'fwd':
        return lambda: kernels.forward(x, weight, bias, add, compute_dtype, config=config)
    if kind == 'dx':
        return lambda: kernels.backward_dx(grad_out, x, weight, compute_dtype, config=config)
    return lambda: kernels.backward_dw(grad_out, x, weight, compute_dtype, config=config)


def _candidates(kind, shape):
    """{effective (BLOCK_H, BLOCK_W, BLOCK_C, num_warps): [TUNE_ROWS rows giving it]}."""
    unique = {}
    for row in TUNE_ROWS[kind]:
        config = kernels.config_for(kind, row, shape.height, shape.width, shape.chans)
        unique.setdefault(config, []).append(row)
    return unique


def _compile_worker(shape_name, kind, dtype_name, autocast):
    """Launch every candidate of one kernel once on one shape (fills Triton's disk cache)."""
    dtype, compute_dtype = _dtypes(dtype_name, autocast)
    problem = make_problem(SHAPES_BY_NAME[shape_name], dtype)
    for config in _candidates(kind, SHAPES_BY_NAME[shape_name]):
        _launcher(kind, problem, config, compute_dtype)()
    torch.cuda.synchronize()


def choose_rows(timings, dtype):
    """Per kernel and tile class (``kernels.tile_class`` of the shape's kernel and the swept
    tensor dtype), the row with the least mean slowdown (time / the shape's best time) over
    the timed shapes of that class: {kind: {class: row}}."""
    chosen = {}
    for kind, per_shape in timings.items():
        by_class = {}
        for name, measured in per_shape.items():
            tile_cls = kernels.tile_class(SHAPES_BY_NAME[name].kernel, dtype)
            by_class.setdefault(tile_cls, []).append(measured)
        for tile_cls, of_class in by_class.items():
            chosen.setdefault(kind, {})[tile_cls] = least_slowdown(TUNE_ROWS[kind], of_class)
    return chosen


def tune(shapes, kinds, dtype_name, autocast, reps_ms, configs_path, workers):
    """Time each kernel alone for every TUNE_ROWS row (CUDA-graph replay), print each shape's
    best, and write the chosen rows and all timings to ``configs_path`` after every shape."""
    from triton.testing import do_bench_cudagraph
    dtype, compute_dtype = _dtypes(dtype_name, autocast)
    compile_in_workers(_compile_worker, [(s.name, kind, dtype_name, autocast) for s in shapes
                                         for kind in kinds], workers)
    timings = {kind: {} for kind in kinds}
    for shape in shapes:
        problem = make_problem(shape, dtype)
        for kind in kinds:
            measured = {}
            for config, rows in _candidates(kind, shape).items():
                ms = do_bench_cudagraph(_launcher(kind, problem, config, compute_dtype),
                                        rep=reps_ms, return_mode='median')
                measured.update({row: ms for row in rows})
            timings[kind][shape.name] = measured
            best = min(measured, key=measured.get)
            current = kernels._CONFIGS[kind][kernels.tile_class(shape.kernel, dtype)]
            size = (shape.height, shape.width, shape.chans)
            current_ms = (f'{measured[current] * 1e3:.1f} us' if current in measured
                          else 'not timed')
            best_config = kernels.config_for(kind, best, *size)
            print(f'{shape.name:14s} {kind}: best row {best} -> {best_config} '
                  f'{measured[best] * 1e3:.1f} us; current row {current} {current_ms}',
                  flush=True)
        del problem
        torch.cuda.empty_cache()
        with open(configs_path, 'w') as f:
            json.dump(dict(configs=choose_rows(timings, dtype), timings={
                kind: {name: {str(list(row)): ms for row, ms in per.items()}
                       for name, per in per_shape.items()}
                for kind, per_shape in timings.items()}), f, indent=1)
    for kind, rows in choose_rows(timings, dtype).items():
        for tile_cls, row in rows.items():
            of_class = [t for name, t in timings[kind].items()
                        if kernels.tile_class(SHAPES_BY_NAME[name].kernel, dtype) == tile_cls]
            print(f'chosen {kind} row for tile class {tile_cls} {row}: mean slowdown '
                  f'{mean_slowdown(row, of_class):.3f} vs the per-shape best', flush=True)
    print(f'wrote {configs_path}')


def main(argv=None):
    parser = argparse.ArgumentParser(prog='benchmark.py dwconv', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', choices=list(SHAPES_BY_NAME))
    parser.add_argument('--peers', nargs='+', default=list(PEERS), choices=PEERS)
    parser.add_argument('--dtype', default='bf16', choices=('bf16', 'fp16', 'fp32'))
    parser.add_argument('--autocast', action='store_true',
                        help='fp32 tensors under bf16 autocast (BiFormer pos_embed in AMP)')
    parser.add_argument('--reps-ms', type=int, default=100, help='timing budget per measurement')
    parser.add_argument('--tune', action='store_true', help='sweep the tile rows of ours')
    parser.add_argument('--kinds', nargs='+', default=list(kernels.KINDS), choices=kernels.KINDS,
                        help='the kernels --tune sweeps')
    parser.add_argument('--configs', help='JSON of tile rows: written by --tune, applied to '
                        'ours otherwise')
    parser.add_argument('--workers', type=int, default=12,
                        help='processes compiling the --tune candidates')
    parser.add_argument('--json', help='write all results to this JSON file')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('benchmark.py dwconv needs a CUDA GPU (none is visible to torch)')
    dtype, _ = _dtypes(args.dtype, args.autocast)
    shapes = [SHAPES_BY_NAME[n] for n in args.shapes or SHAPES_BY_NAME]
    if args.tune:
        if not args.configs:
            sys.exit('--tune needs --configs FILE to write the chosen rows to')
        tune(shapes, args.kinds, args.dtype, args.autocast, args.reps_ms, args.configs,
             args.workers)
        return
    if args.configs:
        with open(args.configs) as f:
            kernels.set_tile_configs(json.load(f)['configs'])
    import triton
    bandwidth = copy_bandwidth()
    header = (f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
              f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton '
              f'{triton.__version__}, {"fp32 under bf16 autocast" if args.autocast else args.dtype}'
              f'; tile rows {kernels._CONFIGS}; measured copy {bandwidth / 1e12:.2f} TB/s')
    print(header, flush=True)
    elem_bytes = torch.finfo(dtype).bits // 8
    results = {}
    for shape in shapes:
        problem = make_problem(shape, dtype)
        errs = errors(problem, args.autocast)
        rows = {}
        for peer in args.peers:
            try:
                rows[peer] = measure(peer, problem, args.reps_ms, args.autocast)
            except Exception as exc:  # report and go on (e.g. out of memory)
                rows[peer] = dict(error=f'{type(exc).__name__}: {str(exc)[:120]}')
                torch.cuda.empty_cache()
        results[shape.name] = dict(rows=rows, errors=dict(ours=errs[0], biformer=errs[1]))
        print(format_table(shape, rows, floors_ms(shape, elem_bytes, bandwidth), errs) + '\n',
              flush=True)
        del problem
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(header=header, results=results), f, indent=1)


if __name__ == '__main__':
    main()
