"""Timing, memory and tuning helpers shared by the benchmarks (tools/bench_*.py)."""
import torch


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
