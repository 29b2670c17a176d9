"""Benchmark ops.gather_attention against its peers on a CUDA GPU, one table per shape.

    python tools/benchmark.py ops                      # every shape, every peer, bf16
    python tools/benchmark.py ops --shapes t224_s2 dsvt36_d32 --peers ours flex
    python tools/benchmark.py ops --tune --configs tuned.json     # sweep the tile configs
    python tools/benchmark.py ops --configs tuned.json            # benchmark with them applied
    python tools/benchmark.py ops --tune-map --shapes t224_s3     # whole-map backward rows
    python tools/benchmark.py ops --tune-single --shapes dsvt36_d32  # single-block kernel rows
    python tools/benchmark.py ops --host-overhead                 # eager Python path, CPU only

``--tune`` times each kernel of ours (fwd, dq, dkdv, and bwd: the dK/dV kernel that also
computes dQ) alone, as CUDA-graph replays, for every candidate tile (``TUNE``) on a few shapes
per (head dim, block size) class, then the fastest tiles (``CAPPED_TILES``) of each class's
shapes under each register cap of ``REGISTER_CAPS`` (Triton's ``maxnreg``), and writes the best
rows as a ``set_tile_configs`` table (JSON). Each shape that has a window form (``map_windows``)
is timed in the window layout too, as BiFormer calls the op (``--no-windows``: block-major
only); the chosen row of a class weighs both. It compiles the candidates first in parallel
worker processes (Triton's disk cache), so the sweep is not compile-bound. ``--tune-map`` times
the whole-map backward (``ops._triton_map_attention``) for each candidate row on the shapes it
applies to and prints each row's time, the fastest (a row of its ``_TILES``) and the time of
the count table it reads. ``--tune-single`` does the same for the forward and the backward of
the single-block kernels (``ops._triton_single_block``, DSVT's sets), compiling the candidates
in worker processes first, then times the fastest rows under each register cap too.

Columns: fwd ms and fwd+bwd ms timed as CUDA-graph replays (GPU time, no Python launch cost;
marked "(eager)" where capture fails), fwd+bwd ms launched eagerly from Python (with L2
flushes), peak extra MiB of fwd+bwd over the inputs, and the fraction of the roofline.

Peers:
* ``ours``: the fused Triton kernels (``backend="triton"``), default backward.
* ``ours_split`` / ``ours_fused``: the same with the backward forced to the split (dQ kernel +
  dK/dV kernel) or the one-kernel form (dQ stored, or added by atomics): see
  ``ops._triton_gather_attention.set_backward_mode``.
* ``ours_general``: ours with the kernels' ``ALIGNED`` form off (per-element masks at every
  shape): see ``ops._triton_gather_attention.set_aligned_tiles``.
* ``ours_gathered``: ours with the whole-map backward and the single-block kernels off (the
  gathered kernels at every shape): see ``ops._triton_map_attention.set_map_backward`` and
  ``ops._triton_single_block.set_single_block_kernels``; "n/a" where ours runs them.
* ``ours_map``: ours in the window layout BiFormer uses (``block_q=(h, w)``, ``map_width``):
  the same problem with the tokens read as the row-major pixels of a square map of square
  windows, where the shape has that form (BiFormer at 224/512/1024 px), "n/a" elsewhere.
* ``official``: BiFormer's formulation: ``torch.gather`` of the routed K/V blocks, matmul,
  softmax, matmul (ops' torch reference, which is that formulation plus masking).
* ``gather_sdpa``: the same gather, then ``F.scaled_dot_product_attention`` per query group.
* ``flex``: FlexAttention with a BlockMask of (block_q, block_k) blocks, compiled; it runs in a
  child process so a device-side assert cannot take the others down; failures are reported.
* ``dense_sdpa``: SDPA over all tokens (a different, denser function; a speed reference).

The roofline floor is max(FLOPs / matmul peak, minimum bytes / copy bandwidth), both ceilings
measured in the same run (bf16 8192^3 matmul, large device-to-device copy). FLOPs count
4*Nq*Kt*D forward and 10*Nq*Kt*D backward per (batch, head), Kt = K * block_k routed keys;
minimum bytes read q, k, v and write o once (forward) and read q, k, v, o, dO and write dq, dk,
dv once (backward).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ops  # noqa: E402
from ops import _triton_gather_attention as kernels  # noqa: E402
from ops import _triton_map_attention as whole_map  # noqa: E402
from ops import _triton_single_block as single_block  # noqa: E402
from ops.gather_attention import gather_attention_reference  # noqa: E402
from bench_timing import (DTYPES, compile_in_workers, copy_bandwidth,  # noqa: E402
                          fwd_and_fwd_bwd_ms, least_slowdown, peak_extra_mib, time_ms)

PEERS = ('ours', 'ours_split', 'ours_fused', 'ours_general', 'ours_gathered', 'ours_map',
         'official', 'gather_sdpa', 'flex', 'dense_sdpa')
BACKWARD_MODE_OF_PEER = {'ours_split': 'split', 'ours_fused': 'fused'}


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: G query groups of block_q, M key blocks of block_k, K per group."""
    name: str
    batch: int
    heads: int
    groups: int
    block_q: int
    blocks: int
    block_k: int
    topk: int
    head_dim: int
    padded_fraction: float = 0.0  # share of keys excluded by the key padding mask
    note: str = ''


SHAPES = [
    Shape('t224_s1', 128, 2, 49, 64, 49, 64, 1, 32, note='BiFormer-T 224, stage 1: 56^2, 8x8 regions'),
    Shape('t224_s2', 128, 4, 49, 16, 49, 16, 4, 32, note='BiFormer-T 224, stage 2: 28^2, 4x4 regions'),
    Shape('t224_s3', 128, 8, 49, 4, 49, 4, 16, 32, note='BiFormer-T 224, stage 3: 14^2, 2x2 regions'),
    Shape('t512_s1', 16, 2, 64, 256, 64, 256, 1, 32, note='BiFormer-T 512 n_win=8, stage 1: 128^2'),
    Shape('t512_s2', 16, 4, 64, 64, 64, 64, 4, 32, note='BiFormer-T 512 n_win=8, stage 2: 64^2'),
    Shape('t512_s3', 16, 8, 64, 16, 64, 16, 16, 32, note='BiFormer-T 512 n_win=8, stage 3: 32^2'),
    Shape('b1024_s2', 4, 6, 256, 64, 256, 64, 8, 32, note='BiFormer-B 1024 n_win=16, stage 2, k=8'),
    Shape('s_det_s1', 2, 2, 256, 273, 256, 273, 1, 32, 0.04,
          'BiFormer-S 800x1344 n_win=16, stage 1: 200x336 padded to 208x336, 13x21 regions'),
    Shape('s_det_s2', 2, 4, 256, 77, 256, 77, 4, 32, 0.15,
          'BiFormer-S 800x1344 n_win=16, stage 2: 100x168 padded to 112x176, 7x11 regions'),
    Shape('s_det_s3', 2, 8, 256, 24, 256, 24, 16, 32, 0.32,
          'BiFormer-S 800x1344 n_win=16, stage 3: 50x84 padded to 64x96, 4x6 regions'),
    Shape('dsvt36_d32', 694, 4, 1, 36, 1, 36, 1, 32, 0.1, 'DSVT sets of 36 over 25k voxels'),
    Shape('dsvt48_d32', 521, 4, 1, 48, 1, 48, 1, 32, 0.1, 'DSVT sets of 48 over 25k voxels'),
    Shape('dsvt90_d32', 278, 4, 1, 90, 1, 90, 1, 32, 0.1, 'DSVT sets of 90 over 25k voxels'),
    Shape('dsvt36_d64', 694, 4, 1, 36, 1, 36, 1, 64, 0.1, 'DSVT sets of 36, D=64'),
    Shape('dsvt90_d64', 278, 4, 1, 90, 1, 90, 1, 64, 0.1, 'DSVT sets of 90, D=64'),
    Shape('b1024_s2_d64', 4, 3, 256, 64, 256, 64, 8, 64, note='b1024_s2 with D=64'),
]
SHAPES_BY_NAME = {s.name: s for s in SHAPES}

TUNE = {  # kind: (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles, timed without a register cap
    'fwd': [(16, 64, 2, 2), (16, 128, 4, 2), (32, 64, 4, 2), (32, 128, 4, 2), (64, 64, 4, 2),
            (64, 128, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3),
            (128, 64, 8, 2), (128, 128, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 2),
            (16, 32, 1, 2), (16, 64, 1, 2), (16, 64, 1, 3), (32, 64, 2, 2)],
    'dq': [(16, 32, 2, 2), (16, 64, 2, 2), (32, 32, 2, 2), (32, 64, 4, 2), (64, 32, 4, 2),
           (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 4, 2), (128, 32, 8, 2),
           (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3), (16, 32, 1, 2),
           (16, 64, 1, 2), (32, 64, 2, 2)],
    'dkdv': [(32, 16, 2, 2), (64, 16, 2, 2), (64, 16, 4, 2), (128, 16, 4, 2), (32, 32, 2, 2),
             (64, 32, 4, 2), (128, 32, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2),
             (64, 64, 4, 3), (128, 64, 8, 2), (32, 128, 4, 2), (64, 128, 8, 2), (64, 32, 4, 3),
             (128, 64, 8, 3), (64, 64, 8, 2), (32, 64, 8, 2), (32, 16, 1, 2), (64, 16, 1, 2),
             (16, 16, 1, 2), (16, 16, 1, 3), (32, 16, 1, 3), (16, 32, 1, 2), (32, 32, 1, 2),
             (64, 32, 2, 2)],
    'bwd': [(32, 16, 2, 2), (64, 16, 2, 2), (32, 32, 2, 2), (64, 32, 4, 2), (16, 64, 4, 2),
            (32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (16, 128, 4, 2),
            (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (16, 256, 8, 2), (32, 256, 8, 2)],
}
# The sweep's second pass: register caps (max_registers) on each class's fastest tiles.
REGISTER_CAPS = (128, 96, 80)
CAPPED_TILES = 2  # fastest uncapped tiles per shape that the second pass caps
# Shapes the sweep times: at least one per (head dim, block size) class that a model uses.
TUNE_SHAPES = ('t224_s3', 't224_s2', 't512_s3', 's_det_s3', 't224_s1', 'b1024_s2', 'dsvt48_d32',
               's_det_s2', 'dsvt90_d32', 't512_s1', 's_det_s1', 'dsvt36_d64', 'b1024_s2_d64',
               'dsvt90_d64')


def make_problem(shape: Shape, dtype, device='cuda', seed=0):
    """Random q, k, v (B, H, N, D), distinct top-k index (B, G, K), key padding mask or None."""
    gen = torch.Generator(device=device).manual_seed(seed)
    num_q, num_k = shape.groups * shape.block_q, shape.blocks * shape.block_k

    def rand(n):
        return torch.randn(shape.batch, shape.heads, n, shape.head_dim, device=device,
                           generator=gen, dtype=dtype)
    q, k, v = rand(num_q), rand(num_k), rand(num_k)
    affinity = torch.rand(shape.batch, shape.groups, shape.blocks, device=device, generator=gen)
    index = affinity.topk(shape.topk, dim=-1).indices
    mask = None
    if shape.padded_fraction:
        # Padding sits at the end of each block, like zero-padded region borders.
        padded_per_block = max(1, round(shape.block_k * shape.padded_fraction))
        within = torch.arange(shape.block_k, device=device)
        mask = (within >= shape.block_k - padded_per_block).repeat(shape.blocks)
        mask = mask.unsqueeze(0).expand(shape.batch, -1).contiguous()
    return q, k, v, index, mask


# ----------------------------------------------------------------------------- peers


def official_gather(q, k, v, index, mask, shape):
    return gather_attention_reference(q, k, v, index, block_q=shape.block_q,
                                      block_k=shape.block_k, key_padding_mask=mask)


def gather_sdpa(q, k, v, index, mask, shape):
    batch, heads, _, dim = q.shape
    groups, slots, block_k = shape.groups, shape.topk, shape.block_k
    flat = index.reshape(batch, 1, groups * slots, 1).expand(-1, heads, -1, block_k * dim)

    def gather(x):
        blocks = x.reshape(batch, heads, shape.blocks, block_k * dim)
        return torch.gather(blocks, 2, flat).reshape(batch * heads * groups, slots * block_k, dim)
    attn_mask = None
    if mask is not None:
        mask_blocks = mask.reshape(batch, 1, shape.blocks, block_k).expand(-1, heads, -1, -1)
        keep = ~torch.gather(mask_blocks, 2, index.reshape(batch, 1, groups * slots, 1)
                             .expand(-1, heads, -1, block_k))
        attn_mask = keep.reshape(batch * heads * groups, 1, slots * block_k)
    out = F.scaled_dot_product_attention(q.reshape(batch * heads * groups, shape.block_q, dim),
                                         gather(k), gather(v), attn_mask=attn_mask)
    return out.reshape(q.shape)


def dense_sdpa(q, k, v, index, mask, shape):
    if shape.groups == 1:  # DSVT: one set per batch entry; all tokens = all voxels
        def flat(x):
            return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])
        out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v))
        return out.reshape(q.shape[1], q.shape[0], q.shape[2], q.shape[3]).transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, v)


def ours(q, k, v, index, mask, shape):
    return ops.gather_attention(q, k, v, index, block_q=shape.block_q, block_k=shape.block_k,
                                key_padding_mask=mask, backend='triton')


def map_windows(shape):
    """((h, w), map_width) when the shape's groups and blocks are the square windows of one
    square map (as BiFormer's regions at 224/512/1024 px), else None."""
    side, win = math.isqrt(shape.groups), math.isqrt(shape.block_q)
    if (shape.groups != shape.blocks or shape.block_q != shape.block_k
            or side * side != shape.groups or win * win != shape.block_q):
        return None
    return (win, win), side * win


def ours_map(q, k, v, index, mask, shape):
    window, map_width = map_windows(shape)
    return ops.gather_attention(q, k, v, index, block_q=window, block_k=window,
                                map_width=map_width, key_padding_mask=mask, backend='triton')


class FlexPeer:
    """FlexAttention over a BlockMask built from the routing index (compiled once per shape)."""

    def __init__(self, shape, index, mask):
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        batch, groups, blocks = shape.batch, shape.groups, shape.blocks
        # torch 2.11: compact [..., topk] indices hit a device-side assert; pad to all blocks.
        order = torch.cat([index, _complement(index, blocks)], dim=-1).to(torch.int32)
        kv_indices = order.unsqueeze(1).contiguous()                   # (B, 1, G, M)
        kv_num = torch.full((batch, 1, groups), shape.topk, dtype=torch.int32,
                            device=index.device)
        size = (shape.block_q, shape.block_k)
        lengths = (groups * shape.block_q, blocks * shape.block_k)
        if mask is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= 0
            self.block_mask = BlockMask.from_kv_blocks(
                torch.zeros_like(kv_num), kv_indices, kv_num, kv_indices, BLOCK_SIZE=size,
                mask_mod=mask_mod, seq_lengths=lengths)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return ~mask[b, kv_idx]
            self.block_mask = BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=size,
                                                       mask_mod=mask_mod, seq_lengths=lengths)
        self.attend = torch.compile(flex_attention, dynamic=False)

    def __call__(self, q, k, v, index, mask, shape):
        return self.attend(q, k, v, block_mask=self.block_mask)


def _complement(index, blocks):
    """The blocks not in each index row, in increasing order: (B, G, M - K)."""
    chosen = torch.zeros(*index.shape[:-1], blocks, dtype=torch.bool, device=index.device)
    chosen.scatter_(-1, index, True)
    rest = torch.argsort(chosen.to(torch.int8), dim=-1, stable=True)
    return rest[..., :blocks - index.shape[-1]]


# ----------------------------------------------------------------------------- measurement


def ceilings():
    """Measured copy bandwidth (bytes read + written per s) and bf16 matmul FLOP/s."""
    from triton.testing import do_bench
    bandwidth = copy_bandwidth()
    a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode='median')
    a = b = None  # free before empty_cache (the lambda holds them)
    torch.cuda.empty_cache()
    return bandwidth, 2 * 8192 ** 3 / (mm_ms * 1e-3)


def floor_ms(shape, elem_bytes, bandwidth, flops_peak, backward):
    bh = shape.batch * shape.heads
    num_q, num_k = shape.groups * shape.block_q, shape.blocks * shape.block_k
    routed = shape.topk * shape.block_k
    flops = bh * num_q * routed * shape.head_dim * (14 if backward else 4)
    fwd_bytes = elem_bytes * shape.head_dim * (2 * num_q + 2 * num_k) + 4 * num_q
    bwd_bytes = elem_bytes * shape.head_dim * (4 * num_q + 4 * num_k) + 4 * num_q
    moved = bh * (fwd_bytes + (bwd_bytes if backward else 0))
    return 1e3 * max(flops / flops_peak, moved / bandwidth)


def measure(fn, q, k, v, index, mask, shape, reps_ms, only=None):
    """Timings (ms) and peak extra MiB of fn(q, k, v, index, mask, shape).

    Keys: fwd, fwd_bwd (CUDA-graph replay, falling back to eager if capture fails: then
    ``graph`` is False), fwd_bwd_eager (launched from Python each time) and peak_mib (fwd+bwd,
    over the inputs and grad_out). ``only='fwd'`` or ``'fwd_bwd'`` times just that, in graphs.
    """
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            return fn(q, k, v, index, mask, shape)

    def forward_backward():
        out = fn(q, k, v, index, mask, shape)
        return torch.autograd.grad(out, (q, k, v), grad_out)
    forward_backward()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    if only == 'fwd':
        return dict(fwd=time_ms(forward, reps_ms, graph=True))
    if only == 'fwd_bwd':
        return dict(fwd_bwd=time_ms(forward_backward, reps_ms, graph=True))
    eager = time_ms(forward_backward, reps_ms, graph=False)
    result = dict(fwd_bwd_eager=eager,
                  **fwd_and_fwd_bwd_ms(forward, forward_backward, reps_ms, eager))
    result['peak_mib'] = peak_extra_mib(forward_backward)
    return result


def profile(shapes, dtype):
    """GPU time per kernel of ours, forward+backward, from torch.profiler (20 iterations)."""
    from torch.profiler import ProfilerActivity
    for shape in shapes:
        q, k, v, index, mask = make_problem(shape, dtype)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad_out = torch.randn_like(q)
        for _ in range(3):
            torch.autograd.grad(ours(q, k, v, index, mask, shape), (q, k, v), grad_out)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                torch.autograd.grad(ours(q, k, v, index, mask, shape), (q, k, v), grad_out)
            torch.cuda.synchronize()
        print(f'### {shape.name} (20 iterations)')
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=12), flush=True)


def check_ours(shape, q, k, v, index, mask):
    """Relative L2 errors of ours and of the same-dtype reference against an fp32 reference."""
    exact = gather_attention_reference(q.float(), k.float(), v.float(), index,
                                       block_q=shape.block_q, block_k=shape.block_k,
                                       key_padding_mask=mask)
    same = official_gather(q, k, v, index, mask, shape).float()
    got = ours(q, k, v, index, mask, shape).float()

    def rel(x):
        return ((x - exact).norm() / exact.norm().clamp(min=1e-30)).item()
    return rel(got), rel(same)


def run_peer(peer, shape, dtype, reps_ms):
    q, k, v, index, mask = make_problem(shape, dtype)
    fn = {'ours': ours, 'ours_map': ours_map, 'official': official_gather,
          'gather_sdpa': gather_sdpa, 'dense_sdpa': dense_sdpa,
          'ours_general': ours, 'ours_gathered': ours,
          **{p: ours for p in BACKWARD_MODE_OF_PEER}}.get(peer)
    if peer == 'ours_map' and map_windows(shape) is None:
        return dict(error='n/a: not square windows of a square map')
    if peer == 'ours_gathered' and not (
            whole_map.takes_map_backward(shape.blocks * shape.block_k, shape.head_dim,
                                         shape.block_q, shape.block_k, shape.topk,
                                         shape.batch * shape.heads)
            or takes_single_block(shape)):
        return dict(error='n/a: ours runs the gathered kernels here')
    if peer == 'flex':
        fn = FlexPeer(shape, index, mask)
    kernels.set_backward_mode(BACKWARD_MODE_OF_PEER.get(peer, 'auto'))
    kernels.set_aligned_tiles(peer != 'ours_general')
    whole_map.set_map_backward('off' if peer == 'ours_gathered' else 'auto')
    single_block.set_single_block_kernels(peer != 'ours_gathered')
    try:
        return measure(fn, q, k, v, index, mask, shape, reps_ms)
    except Exception as err:  # one peer's failure must not stop the run
        torch.cuda.synchronize()
        return dict(error=f'{type(err).__name__}: {str(err).splitlines()[0][:160]}')
    finally:
        kernels.set_backward_mode('auto')
        kernels.set_aligned_tiles(True)
        whole_map.set_map_backward('auto')
        single_block.set_single_block_kernels(True)
        del q, k, v
        torch.cuda.empty_cache()


def flex_in_child(shapes, dtype_name, reps_ms):
    """Run the FlexAttention peer in a child process, one JSON line per shape."""
    results = {}
    remaining = [s.name for s in shapes]
    while remaining:
        cmd = [sys.executable, os.path.abspath(__file__), '--child-flex', '--dtype', dtype_name,
               '--reps-ms', str(reps_ms), '--shapes', *remaining]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith('{'):
                row = json.loads(line)
                results[row.pop('shape')] = row
        remaining = [n for n in remaining if n not in results]
        if remaining:  # the child died on remaining[0]: record it and go on after it
            tail = (proc.stderr.strip().splitlines() or ['no output'])[-1][:160]
            results[remaining.pop(0)] = dict(error=f'child process died: {tail}')
    return results


WINDOWED = ':windows'  # suffix of a sweep member timed in BiFormer's window layout


def sweep_member(name):
    """(Shape, layout) of a tuning-sweep member: a shape's name (block-major tokens, layout
    None), or that name + WINDOWED for the same problem in the window layout (``layout`` as
    the kernels take it: q and k window widths and the map width; see ``map_windows``)."""
    if name.endswith(WINDOWED):
        shape = SHAPES_BY_NAME[name[:-len(WINDOWED)]]
        (_, width), map_width = map_windows(shape)
        return shape, (width, width, map_width)
    return SHAPES_BY_NAME[name], None


def sweep_members(shapes, windows=True):
    """Names of the sweep's members: every shape, and with ``windows`` each shape that has a
    window form (``map_windows``) once more in that layout, which BiFormer's attention uses."""
    return [s.name for s in shapes] + [s.name + WINDOWED for s in shapes
                                       if windows and map_windows(s)]


class KernelInputs:
    """One sweep member's inputs to each kernel of ours (:func:`sweep_member`): q, k, v, index,
    mask, dO and, from a first pass, the forward's out and lse, the delta and the transposed
    index."""

    def __init__(self, name, dtype):
        self.shape, self.layout = shape, layout = sweep_member(name)
        self.q, self.k, self.v, self.index, self.mask = make_problem(shape, dtype)
        self.args = (self.index, self.mask, shape.block_q, shape.block_k, shape.head_dim ** -0.5)
        self.out, self.lse = kernels.forward(self.q, self.k, self.v, *self.args, layout=layout)
        self.grad_out = torch.randn_like(self.q)
        _, self.delta = kernels.backward_dq(self.grad_out, self.q, self.k, self.v, self.out,
                                            self.lse, *self.args, layout=layout)
        self.order, self.offsets = kernels._transpose_index(self.index, shape.blocks)

    def launcher(self, kind, config):
        q, k, v, grad_out, layout = self.q, self.k, self.v, self.grad_out, self.layout
        if kind == 'fwd':
            return lambda: kernels.forward(q, k, v, *self.args, config=config, layout=layout)
        if kind == 'dq':
            return lambda: kernels.backward_dq(grad_out, q, k, v, self.out, self.lse, *self.args,
                                               config=config, layout=layout)
        index, mask, block_q, block_k, scale = self.args
        tail = (self.order, self.offsets, index.dim() == 4, mask, block_q, block_k, scale)
        if kind == 'dkdv':
            return lambda: kernels.backward_dkdv(grad_out, q, k, v, self.out, self.lse,
                                                 self.delta, *tail, config=config,
                                                 layout=layout)
        dq_mode = kernels.backward_dq_mode(index.shape[-1], block_k, q.shape[-1], 'fused',
                                           block_n=config[1])
        return lambda: kernels.backward_one_kernel(grad_out, q, k, v, self.out, self.lse, *tail,
                                                   dq_mode=dq_mode, config=config,
                                                   layout=layout)


def effective_config(shape, kind, config):
    """The config a launch really uses (fwd/dq cap BLOCK_N at the routed keys); raises
    ValueError for a config that does not fit the shape."""
    s = shape
    if kind in ('dkdv', 'bwd'):
        kernels._key_plan(kind, s.batch, s.heads, s.blocks * s.block_k, s.head_dim,
                          s.block_k, s.block_q, s.topk, False, config)
        return config
    meta = kernels._query_plan(kind, s.batch, s.heads, s.groups * s.block_q, s.head_dim,
                               s.block_q, s.block_k, s.topk, False, config)[2]
    return (meta['BLOCK_M'], meta['BLOCK_N'], meta['num_warps'], meta['num_stages'],
            meta['maxnreg'] or 0)


def _candidates(shape, kind, configs=None):
    """{effective config: [candidate configs that launch as it]} of one kind on one shape;
    ``configs`` default to the uncapped TUNE tiles."""
    unique = {}
    for config in [tile + (0,) for tile in TUNE[kind]] if configs is None else configs:
        try:
            unique.setdefault(effective_config(shape, kind, tuple(config)), []).append(
                tuple(config))
        except ValueError:  # the tile cannot hold the packed groups/blocks
            pass
    return unique


def _capped_candidates(kind, measured):
    """{member name: configs for the second pass}: the CAPPED_TILES fastest uncapped tiles of
    every sweep member of a (head-dim, block-size) class, each with every REGISTER_CAPS value,
    for all members of that class (so they share candidates). ``measured``: {member name:
    {config: ms}} of the first pass."""
    chosen = [name for name in measured if _runs_in_auto(kind, name)]
    fastest = {}
    for name in chosen:
        shape = sweep_member(name)[0]
        tiles = {effective_config(shape, kind, c)[:4]: ms for c, ms in measured[name].items()}
        fastest.setdefault(_member_class(kind, name), set()).update(
            sorted(tiles, key=tiles.get)[:CAPPED_TILES])
    return {name: [tile + (cap,) for tile in sorted(fastest[_member_class(kind, name)])
                   for cap in REGISTER_CAPS] for name in chosen}


def _compile_worker(name, kind, dtype_name, configs=None):
    """Launch every candidate of one kind once on one sweep member (fills Triton's disk
    cache)."""
    inputs = KernelInputs(name, DTYPES[dtype_name])
    for config in _candidates(inputs.shape, kind, configs):
        try:
            inputs.launcher(kind, config)()
        except Exception:  # reported by the timing pass
            pass
    torch.cuda.synchronize()


def _member_class(kind, name):
    """(head-dim class, block-size class) of kernel ``kind``'s rows that a sweep member
    times: the keys of ``kernels._CONFIGS[kind]`` and of its rows' size limits."""
    shape = sweep_member(name)[0]
    block_size = _block_size(kind, shape)
    return (kernels.head_dim_class(shape.head_dim),
            next(limit for limit in kernels.SIZE_LIMITS if limit is None or block_size <= limit))


def choose_configs(timings):
    """A set_tile_configs table from {kind: {member: {config: ms}}}: per head-dim class and
    block-size class, the candidate with the least summed slowdown (time / best time) over
    that class's sweep members; classes without a timed member keep their current rows."""
    table = {}
    for kind, per_shape in timings.items():
        table[kind] = {}
        for max_d, rows in kernels._CONFIGS[kind].items():
            new_rows = []
            for limit, current in rows:
                members = [t for name, t in per_shape.items() if t and _runs_in_auto(kind, name)
                           and _member_class(kind, name) == (max_d, limit)]
                common = set.intersection(*(set(t) for t in members)) if members else set()
                if common:
                    current = least_slowdown(common, members)
                new_rows.append((limit, tuple(current)))
            table[kind][max_d] = new_rows
    return table


def _runs_in_auto(kind, name):
    """Whether the default kernels run kernel ``kind`` at this sweep member, so that its
    timings there choose rows: the forward always; the backward is the whole-map one where
    that takes the call, else the one-kernel backward ('bwd') where it stores dQ, else dQ and
    dK/dV."""
    if kind == 'fwd':
        return True
    s = sweep_member(name)[0]
    if whole_map.takes_map_backward(s.blocks * s.block_k, s.head_dim, s.block_q, s.block_k,
                                    s.topk, s.batch * s.heads):
        return False
    one_kernel = kernels.backward_dq_mode(s.topk, s.block_k, s.head_dim, 'auto') != 0
    return one_kernel == (kind == 'bwd')


def _block_size(kind, shape):
    return shape.block_k if kind in ('dkdv', 'bwd') else shape.block_q


def _time_candidates(names, kinds, dtype, reps_ms, timings, configs_path, candidates=None):
    """Add each kernel kind's time alone (CUDA-graph replay, ms) for its candidates on every
    sweep member to ``timings`` ({kind: {member name: {config: ms}}}) and write the chosen
    table and all timings to ``configs_path`` after every member. ``candidates``: {kind:
    {member name: configs}}, default the uncapped TUNE tiles."""
    from triton.testing import do_bench_cudagraph
    for name in names:
        inputs = KernelInputs(name, dtype)
        shape = inputs.shape
        for kind in kinds:
            default = kernels.tile_config(kind, _block_size(kind, shape), shape.head_dim)
            measured = timings[kind].setdefault(name, {})
            configs = None if candidates is None else candidates[kind].get(name, [])
            for effective, requested in _candidates(shape, kind, configs).items():
                try:
                    ms = do_bench_cudagraph(inputs.launcher(kind, effective), rep=reps_ms,
                                            return_mode='median')
                except Exception as err:
                    print(f'  {name} {kind} {effective}: {type(err).__name__}', flush=True)
                    continue
                measured.update({config: ms for config in requested})
            if measured:
                best = min(measured, key=measured.get)
                base = measured.get(default)
                print(f'{name:21s} {kind:4s} best {best} {measured[best] * 1e3:7.1f} us; '
                      f'current {default} '
                      + (f'{base * 1e3:7.1f} us' if base is not None else 'not timed'),
                      flush=True)
        del inputs
        torch.cuda.empty_cache()
        with open(configs_path, 'w') as f:
            json.dump(dict(configs=choose_configs(timings), timings={
                kind: {name: {str(list(c)): t for c, t in per.items()}
                       for name, per in per_shape.items()}
                for kind, per_shape in timings.items()}), f, indent=1)


def tune(shapes, kinds, dtype, dtype_name, reps_ms, configs_path, workers, windows=True):
    """Time each kernel kind alone (CUDA-graph replay) for every TUNE tile on every sweep
    member (:func:`sweep_members`: with ``windows``, the window-layout form of each shape
    that has one too), then for the fastest tiles of each class under each of REGISTER_CAPS,
    and write the chosen table (and all timings) to ``configs_path`` as JSON."""
    names = sweep_members(shapes, windows)
    compile_in_workers(_compile_worker, [(name, kind, dtype_name) for name in names
                                         for kind in kinds], workers)
    timings = {kind: {} for kind in kinds}
    _time_candidates(names, kinds, dtype, reps_ms, timings, configs_path)
    capped = {kind: _capped_candidates(kind, timings[kind]) for kind in kinds}
    print('second pass: register caps', REGISTER_CAPS, flush=True)
    compile_in_workers(_compile_worker, [(name, kind, dtype_name, configs)
                                         for kind in kinds
                                         for name, configs in capped[kind].items()
                                         if configs], workers)
    _time_candidates(names, kinds, dtype, reps_ms, timings, configs_path, capped)
    print('chosen rows (set_tile_configs table):', flush=True)
    for kind, classes in choose_configs(timings).items():
        for max_d, rows in classes.items():
            print(f'  {kind} D<={max_d}: {rows}', flush=True)


# Candidate rows (BLOCK_M, num_warps, num_stages) of ops._triton_map_attention._TILES.
MAP_TUNE = [(16, 4, 1), (16, 8, 1), (32, 4, 1), (32, 8, 1), (64, 4, 1), (64, 8, 1), (64, 8, 2)]


def tune_map(shapes, dtype, reps_ms):
    """Time the whole-map backward alone (CUDA-graph replay) for every MAP_TUNE row on the
    shapes it applies to; print the times, the fastest row and the count table's time."""
    for shape in shapes:
        if not whole_map.applies(shape.blocks * shape.block_k, shape.head_dim, shape.topk):
            print(f'{shape.name}: the whole-map backward does not apply', flush=True)
            continue
        q, k, v, index, mask = make_problem(shape, dtype)
        out, lse = kernels.forward(q, k, v, index, mask, shape.block_q, shape.block_k,
                                   shape.head_dim ** -0.5)
        args = (whole_map.count_table(index, shape.blocks), kernels._mask_args(mask, index),
                shape.block_q, shape.block_k, shape.head_dim ** -0.5,
                *(kernels.token_major(t) for t in (q, k, v)))
        grad_out = torch.randn_like(q)
        timings = {}
        for row in MAP_TUNE:
            try:
                timings[row] = time_ms(lambda: whole_map.backward(grad_out, q, k, v, out, lse,
                                                                  *args, config=row),
                                       reps_ms, graph=True)
            except Exception as err:  # a row this GPU cannot hold
                torch.cuda.synchronize()
                print(f'{shape.name} {row}: {type(err).__name__}', flush=True)
        counting = time_ms(lambda: whole_map.count_table(index, shape.blocks), reps_ms,
                           graph=True)
        times = ', '.join(f'{row}: {ms * 1e3:.1f}' for row, ms in timings.items())
        fastest = min(timings, key=timings.get) if timings else 'none (no row launched)'
        print(f'{shape.name} whole-map backward us: {times}; fastest {fastest}; count table '
              f'{counting * 1e3:.1f} us', flush=True)


# Candidate (num_warps, num_stages) of ops._triton_single_block._TILES rows, each timed with
# these programs per SM (0: one program per (entry, head)) and query rows a step (0: all; only
# those under the tile's rows), uncapped; then the fastest under REGISTER_CAPS. One warp in
# 16-row steps issues about 30% fewer instructions a pair than the 4-warp whole-tile forward
# at the sets of 36 and 48, D=32; the committed backward rows hold 3 programs an SM by their
# registers, 4-6 under the caps (tools/kernel_sass.py).
SINGLE_TUNE = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (4, 3), (8, 1), (8, 2)]
SINGLE_PROGRAMS_PER_SM = (0, 2, 4, 8, 16)
SINGLE_QUERY_ROWS = (0, 16, 32, 64)
SINGLE_CAPPED_KERNELS = 4  # fastest uncapped kernels per shape and kind the second pass caps


def takes_single_block(shape):
    """Whether the single-block kernels run the shape's forward or backward."""
    return any(single_block.takes_call(kind, shape.groups * shape.block_q,
                                       shape.blocks * shape.block_k, shape.block_q,
                                       shape.block_k, shape.topk, shape.head_dim, None)
               for kind in ('fwd', 'bwd'))


def _single_block_launchers(shape, dtype):
    """{'fwd' or 'bwd': launch(row)} of the single-block kernels alone on ``shape``'s problem,
    ``row`` a ``_TILES`` row of theirs."""
    q, k, v, index, mask = make_problem(shape, dtype)
    scale, mask_args = shape.head_dim ** -0.5, kernels._mask_args(mask, index)
    out, lse = kernels.token_major(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    grads = [kernels.token_major(t) for t in (q, k, v)]
    grad_out = torch.randn_like(q)
    return dict(
        fwd=lambda row: single_block.forward(q, k, v, index, mask_args, scale, out, lse,
                                             config=row),
        bwd=lambda row: single_block.backward(grad_out, q, k, v, out, lse, index, mask_args,
                                              scale, *grads, config=row))


def _compile_single_block_worker(name, kind, dtype_name, rows):
    """Launch the single-block ``kind`` kernel once with each of ``rows`` on shape ``name``
    (fills Triton's disk cache)."""
    launch = _single_block_launchers(SHAPES_BY_NAME[name], DTYPES[dtype_name])[kind]
    for row in rows:
        try:
            launch(row)
        except Exception:  # reported by the timing pass
            pass
    torch.cuda.synchronize()


def _compile_single_block_rows(rows_of, dtype_name, workers):
    """Compile ``rows_of`` ({(shape name, kind): rows}) in worker processes, one launch per
    distinct kernel (rows that differ only in programs per SM share one)."""
    compile_in_workers(_compile_single_block_worker, [
        (name, kind, dtype_name, sorted({row[:2] + (0,) + row[3:] for row in rows}))
        for (name, kind), rows in rows_of.items() if rows], workers)


def _capped_single_block_rows(measured):
    """The second pass's rows: the SINGLE_CAPPED_KERNELS fastest distinct kernels of
    ``measured`` ({uncapped row: ms}; rows that differ only in programs per SM are one
    kernel), each under every REGISTER_CAPS value with every SINGLE_PROGRAMS_PER_SM count (a
    cap changes how many programs an SM holds, so the best count with it)."""
    kernels_by_speed = []
    for row in sorted(measured, key=measured.get):
        kernel = row[:2] + row[3:4]
        if kernel not in kernels_by_speed:
            kernels_by_speed.append(kernel)
    return [(warps, stages, programs, query_rows, cap)
            for warps, stages, query_rows in kernels_by_speed[:SINGLE_CAPPED_KERNELS]
            for cap in REGISTER_CAPS for programs in SINGLE_PROGRAMS_PER_SM]


def tune_single(shapes, dtype, dtype_name, reps_ms, workers):
    """Time the single-block forward and backward alone (CUDA-graph replay) for every
    SINGLE_TUNE row, programs-per-SM count and query-row step, uncapped, then the fastest of
    those under register caps (:func:`_capped_single_block_rows`), on the shapes they take
    (candidates compiled first in ``workers`` processes); print the times and the fastest row
    of each (a row of their ``_TILES``), and return those: {shape name: {'fwd' or 'bwd':
    row}}."""
    for shape in shapes:
        if not takes_single_block(shape):
            print(f'{shape.name}: the single-block kernels do not take it', flush=True)
    shapes = [shape for shape in shapes if takes_single_block(shape)]
    rows_of = {}
    for shape in shapes:
        block_q = single_block._tile_sizes(shape.block_q, shape.block_k, shape.head_dim)[0]
        for kind in ('fwd', 'bwd'):
            rows_of[shape.name, kind] = [
                (warps, stages, programs, query_rows, 0) for warps, stages in SINGLE_TUNE
                for programs in SINGLE_PROGRAMS_PER_SM
                for query_rows in SINGLE_QUERY_ROWS if query_rows < block_q]
    timings = {key: {} for key in rows_of}

    def time_rows(candidates):
        for shape in shapes:
            launchers = _single_block_launchers(shape, dtype)
            for kind, launch in launchers.items():
                for row in candidates[shape.name, kind]:
                    try:
                        timings[shape.name, kind][row] = time_ms(lambda: launch(row), reps_ms,
                                                                 graph=True)
                    except Exception as err:  # a row this GPU cannot hold
                        torch.cuda.synchronize()
                        print(f'{shape.name} {kind} {row}: {type(err).__name__}', flush=True)
            del launchers
            torch.cuda.empty_cache()
    _compile_single_block_rows(rows_of, dtype_name, workers)
    time_rows(rows_of)
    capped = {key: _capped_single_block_rows(measured) for key, measured in timings.items()}
    print('second pass: register caps', REGISTER_CAPS, flush=True)
    _compile_single_block_rows(capped, dtype_name, workers)
    time_rows(capped)
    fastest_rows = {}
    for (name, kind), measured in timings.items():
        times = ', '.join(f'{row}: {ms * 1e3:.1f}' for row, ms in
                          sorted(measured.items(), key=lambda item: item[1])[:8])
        fastest = min(measured, key=measured.get) if measured else 'none (no row launched)'
        print(f'{name} single-block {kind} us, fastest first: {times}; fastest {fastest}',
              flush=True)
        if measured:
            fastest_rows.setdefault(name, {})[kind] = fastest
    return fastest_rows


def apply_configs(configs_path):
    """Apply the table of a --tune JSON file to ours."""
    with open(configs_path) as f:
        table = json.load(f)['configs']
    kernels.set_tile_configs({kind: {int(d): [(limit, tuple(c)) for limit, c in rows]
                                     for d, rows in classes.items()}
                              for kind, classes in table.items()})


def host_overhead(reps=3000):
    """Host microseconds per eager call of ours, every Triton launch replaced by a no-op.

    Runs on the CPU with tiny CPU tensors (no GPU needed): it times the Python path around the
    kernels (validation, launch plans, allocations, autograd, custom-op or autograd.Function
    dispatch), not Triton's launcher nor the kernels. Best of 5 rounds.
    """
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    launched = {name: getattr(kernels, name) for name in dir(kernels) if name.endswith('_kernel')}
    for name in launched:
        setattr(kernels, name, NoLaunch())
    try:
        shape = Shape('tiny', 2, 2, 8, 4, 8, 4, 2, 32)
        q, k, v, index, _ = make_problem(shape, torch.float32, device='cpu')
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad_out = torch.randn_like(q)

        def forward_backward():
            torch.autograd.grad(ours(q, k, v, index, None, shape), (q, k, v), grad_out)

        def inference():
            with torch.no_grad():
                ours(q, k, v, index, None, shape)
        for label, fn in (('forward, no grad', inference),
                          ('forward + backward (autograd.grad)', forward_backward)):
            for _ in range(100):
                fn()
            rounds = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(reps // 5):
                    fn()
                rounds.append((time.perf_counter() - started) / (reps // 5) * 1e6)
            print(f'{label:36s} {min(rounds):7.1f} us', flush=True)
    finally:
        for name, kernel in launched.items():
            setattr(kernels, name, kernel)


def format_table(shape, rows, floors):
    lines = [f'### {shape.name}: {shape.note}',
             f'B={shape.batch} H={shape.heads} G={shape.groups}x{shape.block_q} '
             f'M={shape.blocks}x{shape.block_k} K={shape.topk} D={shape.head_dim} '
             f'padded={shape.padded_fraction:.0%}; floor fwd {floors[0]:.3f} ms, '
             f'fwd+bwd {floors[1]:.3f} ms', '',
             '| peer | fwd ms | fwd+bwd ms | fwd+bwd eager ms | peak extra MiB | roofline fwd | '
             'roofline fwd+bwd |',
             '|---|---|---|---|---|---|---|']
    for peer, r in rows.items():
        if 'error' in r:
            lines.append(f'| {peer} | fails: {r["error"]} | | | | | |')
        else:
            mark = '' if r['graph'] else ' (eager)'
            lines.append(f'| {peer} | {r["fwd"]:.3f}{mark} | {r["fwd_bwd"]:.3f}{mark} | '
                         f'{r["fwd_bwd_eager"]:.3f} | {r["peak_mib"]:.0f} | '
                         f'{floors[0] / r["fwd"]:.0%} | {floors[1] / r["fwd_bwd"]:.0%} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='benchmark.py ops', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', choices=list(SHAPES_BY_NAME))
    parser.add_argument('--peers', nargs='+', default=list(PEERS), choices=PEERS)
    parser.add_argument('--dtype', default='bf16', choices=('bf16', 'fp16', 'fp32'))
    parser.add_argument('--reps-ms', type=int, default=200, help='timing budget per measurement')
    parser.add_argument('--tune', nargs='*', choices=tuple(TUNE),
                        help='sweep the tile configs of these kernels of ours (default: all) on '
                        '--shapes (default: TUNE_SHAPES); writes --configs')
    parser.add_argument('--no-windows', action='store_true',
                        help='--tune on block-major tokens only (default: also the window '
                        'layout of each shape that has one, as BiFormer calls the op)')
    parser.add_argument('--tune-map', action='store_true',
                        help='time the whole-map backward\'s tile rows on --shapes')
    parser.add_argument('--tune-single', action='store_true',
                        help='time the single-block kernels\' tile rows on --shapes')
    parser.add_argument('--configs', help='JSON table of tile configs: written by --tune, '
                        'applied to ours (benchmark, --profile) otherwise')
    parser.add_argument('--workers', type=int, default=12,
                        help='processes compiling the --tune and --tune-single candidates')
    parser.add_argument('--profile', action='store_true',
                        help='print the per-kernel GPU time of ours (torch.profiler)')
    parser.add_argument('--json', help='write all results to this JSON file')
    parser.add_argument('--markdown', help='write the tables to this markdown file')
    parser.add_argument('--host-overhead', action='store_true',
                        help='host microseconds per eager call, kernels stubbed (CPU only)')
    parser.add_argument('--child-flex', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host_overhead:
        host_overhead()
        return
    if not torch.cuda.is_available():
        sys.exit('benchmark.py ops needs a CUDA GPU')
    dtype = DTYPES[args.dtype]
    default_shapes = TUNE_SHAPES if args.tune is not None else [s.name for s in SHAPES]
    shapes = [SHAPES_BY_NAME[n] for n in args.shapes or default_shapes]
    if args.child_flex:
        for shape in shapes:
            row = run_peer('flex', shape, dtype, args.reps_ms)
            print(json.dumps(dict(shape=shape.name, **row)), flush=True)
        return
    if args.tune_map:
        tune_map(shapes, dtype, args.reps_ms)
        return
    if args.tune_single:
        tune_single(shapes, dtype, args.dtype, args.reps_ms, args.workers)
        return
    if args.tune is not None:
        if not args.configs:
            sys.exit('--tune needs --configs FILE to write the chosen table to')
        tune(shapes, args.tune or list(TUNE), dtype, args.dtype, args.reps_ms, args.configs,
             args.workers, windows=not args.no_windows)
        return
    if args.configs:
        apply_configs(args.configs)
    if args.profile:
        profile(shapes, dtype)
        return
    import triton
    props = torch.cuda.get_device_properties(0)
    bandwidth, flops_peak = ceilings()
    header = (f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {props.name}, torch '
              f'{torch.__version__}, triton {triton.__version__}, {args.dtype}; measured copy '
              f'{bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops_peak / 1e12:.0f} TFLOP/s')
    print(header, flush=True)
    flex = flex_in_child(shapes, args.dtype, args.reps_ms) if 'flex' in args.peers else {}
    elem_bytes = torch.finfo(dtype).bits // 8
    results, tables = {}, [header]
    for shape in shapes:
        q, k, v, index, mask = make_problem(shape, dtype)
        err_ours, err_ref = check_ours(shape, q, k, v, index, mask)
        del q, k, v
        rows = {}
        for peer in args.peers:
            rows[peer] = flex[shape.name] if peer == 'flex' else run_peer(peer, shape, dtype,
                                                                          args.reps_ms)
        floors = (floor_ms(shape, elem_bytes, bandwidth, flops_peak, False),
                  floor_ms(shape, elem_bytes, bandwidth, flops_peak, True))
        table = format_table(shape, rows, floors) + (
            f'\n\nrel. L2 error vs fp32 reference: ours {err_ours:.2e}, torch '
            f'{args.dtype} {err_ref:.2e}\n')
        print(table, flush=True)
        tables.append(table)
        results[shape.name] = dict(shape=asdict(shape), floors_ms=floors, peers=rows,
                                   rel_err_ours=err_ours, rel_err_torch=err_ref)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(header=header, results=results), f, indent=1)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write('\n\n'.join(tables) + '\n')


if __name__ == '__main__':
    main()
