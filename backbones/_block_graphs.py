"""CUDA graphs of fused BiFormer blocks (``BiFormer(graph_blocks=True)``).

Eager BiFormer is bound by the host: a fused block still issues ~140 aten ops and ~40 kernel
calls per training step, for short kernels (docs/biformer.md). With block graphs, each
block's calls are captured once into CUDA graphs and then replayed. A replayed training call
costs the host one copy in, one graph launch and one copy out, forward and backward alike,
inside an ordinary eager loop: optimizer, loss, AMP and data loading stay eager.

What is captured, and when:

* A call is keyed by everything its kernels depend on: the block's plan and drop-path rates,
  the input's shape, strides, dtype and device, the current stream, and the parameters' storage
  and dtypes. Each block keeps one capture for calls that need a gradient and one for calls
  that do not. A call whose key differs from its capture's runs eagerly (the fused path). The
  second consecutive call with a new key captures it, replacing the old capture; after
  ``BlockGraphs.MAX_CAPTURES`` captures, new keys run eagerly (inputs of changing size).
* Not captured: calls on the CPU, under another capture, under ``torch.compile``, export or
  tracing, and calls under saved-tensor hooks (activation checkpointing, offloading: they
  expect the saved tensors to pass through them).
* Outputs are fresh tensors (cloned from the graph's buffers), so a caller may keep them.
  Parameter gradients come from per-capture buffers, as with
  ``torch.cuda.make_graphed_callables``. Drop-path masks are drawn by the graph from CUDA's
  graph-safe generator: new masks each replay, not the module path's random stream.

Memory: a training capture keeps its saved tensors (the activations eager keeps too) in one
pool shared by the training forward graphs of a stream. Graphs that share a pool may overwrite
each other's freed temporaries, so a forward graph replays only while no graph captured after
it still holds saved tensors for a backward. Otherwise, and when a block is called again
before its previous forward's backward (two forwards, then one backward), the call runs
eagerly. Backward and inference graphs keep no tensors in their pool beyond a replay. They
write their outputs into buffers outside it and share one pool per stream in any order.
Captures retain their pools' temporaries, so graphed training reserves more memory than eager.
"""
import itertools
import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ['BlockGraphs']


class _StreamPools:
    """The pools, side stream and shared buffers of the captures replayed on one stream. Its
    captures hold it; when the last goes, so do its pools (a pool whose graphs are all gone may
    not take new captures)."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device)
        self.side_warmed = False
        self.forward_pool = torch.cuda.graph_pool_handle()
        self.scratch_pool = torch.cuda.graph_pool_handle()
        self.buffers = weakref.WeakValueDictionary()
        self.positions = itertools.count()
        self.forward_captures = weakref.WeakValueDictionary()  # position -> training capture
        self.holding = set()  # positions of forward graphs whose saved tensors await a backward

    def buffer(self, role: str, shape, strides, dtype: torch.dtype, device) -> Tensor:
        """A buffer shared by every capture on this stream for ``role`` ('in' or 'out': a
        graph's input or output) and layout: written and read only within one replay and the
        copies around it."""
        key = (role, tuple(shape), tuple(strides), dtype)
        buf = self.buffers.get(key)
        if buf is None:
            with torch.inference_mode(False):
                buf = torch.empty_strided(shape, strides, dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf


_POOLS = weakref.WeakValueDictionary()  # (device index, stream) -> _StreamPools


def _pools(device: torch.device) -> _StreamPools:
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    pools = _POOLS.get(key)
    if pools is None:
        pools = _POOLS[key] = _StreamPools(device)
    return pools


def _contiguous_strides(shape) -> Tuple[int, ...]:
    return torch.empty(shape, device='meta').stride()


def _capture(graph: torch.cuda.CUDAGraph, pools: _StreamPools, pool, fn):
    """``fn(warmup=False)`` captured into ``graph`` on the side stream, after an eager
    ``fn(warmup=True)`` on the current stream (kernels compiled and loaded, launch fitting
    done; the side stream's first capture warms up there too, for its cuBLAS workspace).
    Then, as ``torch.cuda.graph`` does at each capture, the allocator's cache is emptied: the
    warm-ups' memory goes back to the device instead of staying reserved beside the graph
    pools. Returns the captured call's result."""
    current = torch.cuda.current_stream()
    with torch.no_grad():
        fn(warmup=True)
        pools.side.wait_stream(current)
        with torch.cuda.stream(pools.side):
            if not pools.side_warmed:
                fn(warmup=True)
                pools.side_warmed = True
            graph.capture_begin(pool=pool, capture_error_mode='thread_local')
            try:
                result = fn(warmup=False)
            finally:
                graph.capture_end()
        current.wait_stream(pools.side)
    torch.cuda.empty_cache()
    return result


class _Capture:
    """One captured call of a block: its forward graph and, for training, its backward graph
    (captured at the first backward), with their static tensors."""

    def __init__(self, key, plan, drops, x: Tensor, params):
        from backbones._fused_block import _block_forward
        self.key, self.plan, self.params = key, plan, params
        self.training = plan.needs_grad
        self.pools = pools = _pools(x.device)
        self.param_dtype = params[2].dtype
        if self.training:  # saved for the backward, so owned by this capture
            self.x = torch.empty_like(x)
        else:
            self.x = pools.buffer('in', x.shape, x.stride(), x.dtype, x.device)
        with torch.no_grad():
            self.x.copy_(x)
        self.out = None
        self.saved = self.mixer_state = None

        def forward(warmup: bool):
            result = _block_forward(plan, drops, self.x, *params, out=self.out, graphed=True)
            if warmup and self.out is None:
                y = result[0]
                self.out = pools.buffer('out', y.shape, _contiguous_strides(y.shape), y.dtype,
                                        y.device)
            return result

        self.forward_graph = torch.cuda.CUDAGraph()
        pool = pools.forward_pool if self.training else pools.scratch_pool
        _, saved, mixer_state = _capture(self.forward_graph, pools, pool, forward)
        if self.training:
            self.saved, self.mixer_state = saved, mixer_state
            self.position = next(pools.positions)
            pools.forward_captures[self.position] = self
        self.backward_graph = None
        self.holding = False
        self.generation = 0  # bumped whenever the saved tensors may have been overwritten

    def may_replay_forward(self) -> bool:
        """False while this capture's saved tensors await a backward, or while a forward graph
        captured after it (which may use its temporaries' memory) holds saved tensors."""
        if not self.training:
            return True
        return not self.holding and all(p < self.position for p in self.pools.holding)

    def replay_forward(self, x: Tensor) -> Tensor:
        """The block's output for x (a fresh tensor)."""
        self.x.copy_(x)
        self.forward_graph.replay()
        if self.training:
            for position, capture in list(self.pools.forward_captures.items()):
                if position >= self.position:
                    capture.generation += 1
            self.holding = True
            self.pools.holding.add(self.position)
        return self.out.clone()

    def release(self, generation: int) -> None:
        """The saved tensors of forward ``generation`` are no longer needed."""
        if self.holding and generation == self.generation:
            self.holding = False
            self.pools.holding.discard(self.position)

    def replay_backward(self, grad: Tensor, generation: int):
        """The 17 gradients (x's fresh, the parameters' in this capture's buffers)."""
        if generation != self.generation:
            raise RuntimeError(
                'BiFormer block graphs: the tensors this backward needs were overwritten by a '
                'later forward of the model (graph_blocks=True keeps one set per block). Run '
                'the backward before the next forward, or turn the graphs off with '
                'model.set_graph_blocks(False)')
        if self.backward_graph is None:
            self._capture_backward(grad)
        self.grad.copy_(grad)
        self.backward_graph.replay()
        self.release(generation)
        return (self.grad_x.clone(),) + self.param_grads

    def _capture_backward(self, grad: Tensor) -> None:
        from backbones._fused_block import _block_backward
        pools, x = self.pools, self.x
        self.grad = pools.buffer('in', grad.shape, _contiguous_strides(grad.shape), grad.dtype,
                                 grad.device)
        self.grad_x = pools.buffer('out', x.shape, _contiguous_strides(x.shape), x.dtype,
                                   x.device)
        self.param_grads = tuple(None if p is None else torch.empty_like(p)
                                 for p in self.params)
        self.grad.copy_(grad)

        def backward(warmup: bool):
            grads = _block_backward(self.plan, self.param_dtype, self.saved, self.mixer_state,
                                    self.grad, retain_graph=True, grad_x_out=self.grad_x)
            if not warmup:
                pairs = [(buf, g) for buf, g in zip(self.param_grads, grads[1:])
                         if buf is not None]
                torch._foreach_copy_([buf for buf, _ in pairs], [g for _, g in pairs])

        self.backward_graph = torch.cuda.CUDAGraph()
        _capture(self.backward_graph, pools, pools.scratch_pool, backward)


class _Lease:
    """Held by the autograd node of one replayed training forward: releases the capture's
    saved tensors when the node goes without a backward."""

    def __init__(self, capture: _Capture):
        self.capture, self.generation = capture, capture.generation

    def __del__(self):
        self.capture.release(self.generation)


class _GraphedBlock(torch.autograd.Function):
    """A replayed training call of a block: the forward graph, then the backward graph."""

    @staticmethod
    def forward(ctx, capture, x, *params):
        out = capture.replay_forward(x)
        ctx.lease = _Lease(capture)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        lease = ctx.lease
        return (None,) + lease.capture.replay_backward(grad, lease.generation)


class BlockGraphs:
    """The CUDA graphs of one :class:`backbones.biformer.BiFormerBlock` (module docstring).
    Not copied with the model: a deep copy or pickle starts without captures."""

    # Captures per block and mode (with or without gradient) before calls with a new key run
    # eagerly for good: inputs whose shape keeps changing would otherwise pay for a capture
    # every time a shape repeats.
    MAX_CAPTURES = 4

    def __init__(self):
        self.captures: Dict[bool, Optional[_Capture]] = {True: None, False: None}
        self.candidates: Dict[bool, Optional[tuple]] = {True: None, False: None}
        self.captured: Dict[bool, int] = {True: 0, False: 0}

    def __deepcopy__(self, memo):
        return BlockGraphs()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    @staticmethod
    def applies(x: Tensor) -> bool:
        """Whether a call on x may be captured or replayed (see the module docstring)."""
        return (x.is_cuda and not torch.cuda.is_current_stream_capturing()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)

    def __call__(self, plan, drops, x: Tensor, params) -> Optional[Tensor]:
        """The block's output through its graphs, or None where the call runs eagerly."""
        if not self.applies(x):
            return None
        key = (plan, drops, tuple(x.shape), x.stride(), x.dtype, x.device,
               torch.cuda.current_stream(x.device).cuda_stream,
               tuple(None if p is None else (p.data_ptr(), p.dtype) for p in params))
        mode = plan.needs_grad
        capture = self.captures[mode]
        if capture is None or capture.key != key:
            if self.candidates[mode] != key:
                self.candidates[mode] = key
                return None
            if self.captured[mode] >= self.MAX_CAPTURES:  # shown once (same message and line)
                warnings.warn(f'BiFormer block graphs: {self.MAX_CAPTURES} captures of a block '
                              'for changing inputs; new ones run eagerly from now on '
                              '(graph_blocks helps inputs of a fixed size)')
                return None
            self.captured[mode] += 1
            self.captures[mode] = None  # its memory goes back first
            capture = self.captures[mode] = _Capture(key, plan, drops, x, params)
        else:
            self.candidates[mode] = None  # a new key must come twice in a row to be captured
            if not capture.may_replay_forward():
                return None
        if mode:
            return _GraphedBlock.apply(capture, x, *params)
        return capture.replay_forward(x)
