"""Timing, memory and tuning helpers shared by the benchmarks (tools/bench_*.py)."""
import time

import torch

# --dtype names of the benchmarks
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def time_ms(fn, reps_ms, graph):
    """Median ms of fn: CUDA-graph replay (no launch overhead) or eager with L2 flushes."""
    from triton.testing import do_bench, do_bench_cudagraph
    if graph:
        return do_bench_cudagraph(fn, rep=reps_ms, return_mode='median')
    return do_bench(fn, warmup=25, rep=reps_ms, return_mode='median')


def fwd_and_fwd_bwd_ms(forward, forward_backward, reps_ms, fwd_bwd_eager=None):
    """dict(fwd, fwd_bwd, graph): CUDA-graph replays, or eager timings (graph False) where
    capture fails; ``fwd_bwd_eager``, when already timed, serves as the eager fwd_bwd."""
    try:
        return dict(fwd=time_ms(forward, reps_ms, graph=True),
                    fwd_bwd=time_ms(forward_backward, reps_ms, graph=True), graph=True)
    except Exception:  # capture unsupported: eager timings
        torch.cuda.synchronize()
        if fwd_bwd_eager is None:
            fwd_bwd_eager = time_ms(forward_backward, reps_ms, graph=False)
        return dict(fwd=time_ms(forward, reps_ms, graph=False), fwd_bwd=fwd_bwd_eager,
                    graph=False)


def peak_extra_mib(fn):
    """Peak CUDA memory that one call of fn allocates above what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth():
    """Measured device-to-device copy bandwidth, bytes read + written per second (1 GiB)."""
    from triton.testing import do_bench
    src = torch.empty(2 ** 30, dtype=torch.uint8, device='cuda').random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode='median')
    src = dst = None  # free before empty_cache (the lambda holds them)
    torch.cuda.empty_cache()
    return 2 * 2 ** 30 / (ms * 1e-3)


def mean_slowdown(row, per_shape) -> float:
    """Tuning's criterion: over shapes (each a {candidate row: ms} dict), the mean of the row's
    time / that shape's best time."""
    per_shape = list(per_shape)
    return sum(t[row] / min(t.values()) for t in per_shape) / len(per_shape)


def least_slowdown(rows, per_shape):
    """The candidate of ``rows`` with the least :func:`mean_slowdown` over ``per_shape``."""
    per_shape = list(per_shape)
    return min(rows, key=lambda row: mean_slowdown(row, per_shape))


def choose_per_class(per_class):
    """{class: row}: per class (e.g. a BLOCK_C), of ``{shape: {candidate row: ms}}``, the
    candidate timed on all of the class's shapes with the least :func:`mean_slowdown`."""
    chosen = {}
    for key, per_shape in per_class.items():
        common = set.intersection(*(set(t) for t in per_shape.values()))
        chosen[key] = least_slowdown(common, per_shape.values())
    return chosen


def kernel_bench_parser(name, doc, shape_names, peers, dtypes):
    """The argument parser shared by the single-kernel benchmarks (``benchmark.py NAME``):
    --shapes, --smoke, --peers, --dtype, --reps-ms, --tune, --configs, --json."""
    import argparse
    parser = argparse.ArgumentParser(prog=f'benchmark.py {name}', description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', choices=list(shape_names))
    parser.add_argument('--smoke', action='store_true',
                        help='the tiny smoke shapes (runs on a CPU through the interpreter)')
    parser.add_argument('--peers', nargs='+', default=list(peers), choices=peers)
    parser.add_argument('--dtype', default='bf16', choices=list(dtypes))
    parser.add_argument('--reps-ms', type=int, default=100, help='timing budget per measurement')
    parser.add_argument('--tune', action='store_true', help='sweep the tile rows of ours')
    parser.add_argument('--configs', help='JSON of tile rows: written by --tune, applied to '
                        'ours otherwise')
    parser.add_argument('--json', help='write all results to this JSON file')
    return parser


def kernel_bench_setup(args, name, dtypes, shapes, smoke_shapes):
    """(cuda, dtype, shapes) of a single-kernel benchmark's parsed ``args``; exits with a
    message where the run cannot be made (no GPU without --smoke, --tune without a GPU or
    --configs). Without a GPU bf16 becomes fp16 (the interpreter's bf16 products are wrong)."""
    import sys
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit(f'benchmark.py {name} needs a CUDA GPU (none is visible to torch); --smoke '
                 f'runs tiny shapes on the CPU')
    if args.tune and not (args.configs and cuda):
        sys.exit('--tune needs a CUDA GPU and --configs FILE to write the chosen rows to')
    dtype = dtypes[args.dtype]
    if not cuda and dtype == torch.bfloat16:
        dtype = torch.float16
    by_name = {s.name: s for s in list(shapes) + list(smoke_shapes)}
    chosen = [by_name[n] for n in args.shapes] if args.shapes else list(
        smoke_shapes if args.smoke else shapes)
    return cuda, dtype, chosen


def run_header(dtype, cuda):
    """(header line: date, device, versions, dtype, measured copy bandwidth; the bandwidth in
    bytes/s or None on the CPU)."""
    import time
    import triton
    bandwidth = copy_bandwidth() if cuda else None
    header = (f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
              f'{torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"}, torch '
              f'{torch.__version__}, triton {triton.__version__}, {dtype}'
              + (f'; measured copy {bandwidth / 1e12:.2f} TB/s' if cuda else ''))
    return header, bandwidth


def measure_peers(peers, measure):
    """{peer: measure(peer)}, a failing peer's row ``{'error': ...}`` (compile failure, out of
    memory, unsupported shape) so that the other peers still run."""
    rows = {}
    for peer in peers:
        try:
            rows[peer] = measure(peer)
        except Exception as exc:  # report and go on
            rows[peer] = dict(error=f'{type(exc).__name__}: {str(exc)[:120]}')
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def compile_in_workers(worker, tasks, workers: int) -> None:
    """Run ``worker(*task)`` for every task in ``workers`` spawned processes, so a tuning sweep
    compiles its candidate kernels in parallel into Triton's disk cache before timing them. If
    the pool fails, the timing pass compiles what is missing, serially."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    started = time.time()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context('spawn')) as pool:
            list(pool.map(worker, *zip(*tasks)))
        print(f'compiled the candidates in {time.time() - started:.0f} s', flush=True)
    except Exception as err:
        print(f'parallel compilation failed ({type(err).__name__}: {err}); compiling serially',
              flush=True)
