"""ops.gather_attention: torch reference, Triton kernels (interpreter on CPU), custom-op glue."""
import random

import pytest
import torch

import ops
from ops import _triton_gather_attention as kernels
from ops import _triton_map_attention as map_backward
from ops import _triton_single_block as single_block
from ops._triton_gather_attention import _transpose_index, gather_attention_fwd
from ops.gather_attention import gather_attention_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if HAS_CUDA else 'cpu'
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _gathered_kernels_by_default():
    """The gathered kernels at every shape, unless a test asks for :func:`whole_map` or
    :func:`single_block_kernels`."""
    map_backward.set_map_backward('off')
    single_block.set_single_block_kernels(False)
    yield
    map_backward.set_map_backward('auto')
    single_block.set_single_block_kernels(True)


@pytest.fixture
def single_block_kernels():
    """The single-block kernels (ops._triton_single_block) wherever they take the call."""
    single_block.set_single_block_kernels(True)


@pytest.fixture
def whole_map():
    """The whole-map backward wherever it applies (ops._triton_map_attention)."""
    map_backward.set_map_backward('on')


def make_inputs(batch, heads, groups, block_q, blocks, block_k, slots, head_dim,
                dtype=torch.float32, per_head=False, masked_fraction=0.0, empty_fraction=0.2,
                device=DEVICE):
    """Random q, k, v, index (with -1 slots) and key padding mask (or None)."""
    def rand(n):
        return torch.randn(batch, heads, n, head_dim, device=device).to(dtype)
    q, k, v = rand(groups * block_q), rand(blocks * block_k), rand(blocks * block_k)
    shape = (batch, heads, groups, slots) if per_head else (batch, groups, slots)
    index = torch.randint(0, max(blocks, 1), shape, device=device)
    index = index.masked_fill(torch.rand(shape, device=device) < empty_fraction, -1)
    mask = None
    if masked_fraction:
        mask = torch.rand(batch, blocks * block_k, device=device) < masked_fraction
    return q, k, v, index, mask


def counted_softmax_oracle(q, k, v, count, mask=None):
    """fp64 dense attention with each (query, key) score weighted by ``count`` (B, H, Nq, Nk):
    how often the query's group routes to the key's block; padded keys count 0."""
    if mask is not None:
        count = count.masked_fill(mask[:, None, None, :].cpu(), 0)
    scores = (q.double().cpu() @ k.double().cpu().transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * count
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)
    return weights @ v.double().cpu()


def dense_attention_oracle(q, k, v, index, block_q, block_k, mask=None):
    """Independent fp64 oracle: dense softmax weighted by how often each key is routed."""
    batch, heads, num_q, _ = q.shape
    num_k = k.shape[2]
    if index.dim() == 3:
        index = index.unsqueeze(1).expand(-1, heads, -1, -1)
    count = torch.zeros(batch, heads, num_q, num_k, dtype=torch.float64)
    for b, h, g, s in torch.nonzero(index >= 0).tolist():
        block = int(index[b, h, g, s])
        count[b, h, g * block_q:(g + 1) * block_q, block * block_k:(block + 1) * block_k] += 1
    return counted_softmax_oracle(q, k, v, count, mask)


def forward_and_grads(fn, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


def max_errors(results, exact):
    return [(r.double().cpu() - e.double().cpu()).abs().max().item() if r.numel() else 0.0
            for r, e in zip(results, exact)]


class SmallDevice:
    """A kernel on a GPU with little shared memory: launches for which ``refuses(meta)`` holds
    raise ``error`` (default OutOfResources, as Triton does before running), the others are
    recorded by ``record(meta)`` and run."""

    def __init__(self, kernel, refuses, record, error=None):
        from triton.runtime.errors import OutOfResources
        self.kernel, self.refuses, self.record = kernel, refuses, record
        self.error = error or OutOfResources(300_000, 100_000, 'shared memory')

    def __getitem__(self, grid):
        def launch(*args, **meta):
            if self.refuses(meta):
                raise self.error
            self.record(meta)
            return self.kernel[grid](*args, **meta)
        return launch


def compare_to_fp64(q, k, v, index, mask, block_q, block_k, backend='triton', scale=None,
                    map_width=None):
    """Assert |backend - fp64| <= 2 |torch same dtype - fp64| + atol for out, dq, dk, dv."""
    grad_out = torch.randn_like(q)

    def run(backend_name, cast):
        def fn(q_, k_, v_):
            return ops.gather_attention(q_, k_, v_, index, block_q=block_q, block_k=block_k,
                                        map_width=map_width, key_padding_mask=mask, scale=scale,
                                        backend=backend_name)
        return forward_and_grads(fn, *(cast(x) for x in (q, k, v)), cast(grad_out))

    tested = run(backend, lambda x: x)
    same_dtype = run('torch', lambda x: x)
    exact = run('torch', lambda x: x.double())
    atol = ATOL[q.dtype]
    for name, err, base in zip(('out', 'dq', 'dk', 'dv'), max_errors(tested, exact),
                               max_errors(same_dtype, exact)):
        assert err <= 2 * base + atol, f'{name}: error {err:.3g} vs torch {base:.3g}'
    for t in tested:
        assert torch.isfinite(t).all()
    return tested


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize('per_head', [False, True])
def test_reference_matches_dense_oracle(per_head):
    q, k, v, index, mask = make_inputs(2, 3, 5, 4, 6, 3, 4, 16, dtype=torch.float64,
                                       per_head=per_head, masked_fraction=0.3, device='cpu')
    index[0, ..., 1] = index[0, ..., 0]  # a block routed twice counts twice
    out = gather_attention_reference(q, k, v, index, block_q=4, block_k=3, key_padding_mask=mask)
    torch.testing.assert_close(out, dense_attention_oracle(q, k, v, index, 4, 3, mask))


def test_reference_gradcheck_fp64():
    q, k, v, index, mask = make_inputs(1, 2, 3, 2, 4, 3, 2, 4, dtype=torch.float64,
                                       masked_fraction=0.3, device='cpu')
    index[0, 0] = -1  # a query group with no key
    inputs = tuple(x.requires_grad_() for x in (q, k, v))

    def fn(q_, k_, v_):
        return ops.gather_attention(q_, k_, v_, index, block_q=2, block_k=3,
                                    key_padding_mask=mask, backend='torch')
    assert torch.autograd.gradcheck(fn, inputs)


def test_auto_backend_exports_with_torch_export():
    q, k, v, index, _ = make_inputs(1, 2, 4, 4, 4, 4, 2, 16, device='cpu')

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, index):
            return ops.gather_attention(q, k, v, index, block_q=4, block_k=4)
    program = torch.export.export(Attend(), (q, k, v, index))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any('dsa_ops' in t for t in targets)
    torch.testing.assert_close(program.module()(q, k, v, index), Attend()(q, k, v, index))


# ----------------------------------------------------------------------------- triton vs fp64

TRITON_CASES = {
    # name: (batch, heads, groups, block_q, blocks, block_k, slots, head_dim, per_head, masked)
    'packed_4x4': (2, 2, 6, 4, 6, 4, 3, 16, False, 0.0),
    'block_size_1': (1, 2, 9, 1, 7, 1, 5, 32, False, 0.0),
    'odd_49_topk_1': (1, 1, 3, 49, 4, 49, 1, 32, False, 0.2),
    'detection_s3_24': (1, 2, 3, 24, 4, 24, 2, 32, False, 0.2),
    'odd_q7_k5_topk_all': (1, 2, 4, 7, 3, 5, 3, 64, False, 0.3),
    'group_spans_tiles_70': (1, 1, 2, 70, 3, 6, 2, 16, True, 0.0),
    'per_head_16': (1, 3, 4, 16, 5, 16, 2, 32, True, 0.3),
    'head_dim_128_b1_h1': (1, 1, 2, 16, 3, 16, 2, 128, False, 0.0),
    'query_rows_past_a_tile_256_keys': (1, 1, 10, 4, 64, 4, 16, 16, False, 0.1),
}


@pytest.mark.parametrize('backward', ['gathered', 'whole_map'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('case', list(TRITON_CASES), ids=list(TRITON_CASES))
def test_triton_matches_fp64(case, dtype, backward, monkeypatch):
    """Each case also holds a group routed nowhere (zero output and dQ) and a block named by
    every slot of a group (counted that often); ``whole_map``: the backward of
    ops._triton_map_attention, where it applies."""
    batch, heads, groups, block_q, blocks, block_k, slots, head_dim, per_head, masked = \
        TRITON_CASES[case]
    if backward == 'whole_map':
        if not map_backward.applies(blocks * block_k, head_dim, slots):
            pytest.skip('the whole-map backward does not apply')
        map_backward.set_map_backward('on')
    q, k, v, index, mask = make_inputs(batch, heads, groups, block_q, blocks, block_k, slots,
                                       head_dim, dtype=dtype, per_head=per_head,
                                       masked_fraction=masked)
    index[0, ..., 0, :] = -1
    index[-1, ..., -1, :] = index[-1, ..., -1, :1]
    calls = []
    launch = map_backward.backward
    monkeypatch.setattr(map_backward, 'backward',
                        lambda *args, **kwargs: (calls.append(1), launch(*args, **kwargs)))
    out, dq, _, _ = compare_to_fp64(q, k, v, index, mask, block_q, block_k)
    assert len(calls) == (backward == 'whole_map')
    assert not out[0, :, :block_q].any() and not dq[0, :, :block_q].any()


@pytest.fixture
def backward_mode(request):
    """Run the test under ``kernels.set_backward_mode(request.param)``, then restore 'auto'."""
    kernels.set_backward_mode(request.param)
    yield request.param
    kernels.set_backward_mode('auto')


BACKWARD_CASES = {
    # as TRITON_CASES; each reaches a different DQ_MODE of the one-kernel backward
    'one_slot_4_blocks_per_tile': (1, 2, 8, 4, 8, 4, 1, 16, False, 0.2),    # dQ stored
    'one_slot_block_wider_than_tile': (1, 1, 2, 8, 2, 300, 1, 16, False, 0.1),  # atomics
    'three_slots_per_head': (1, 2, 4, 8, 5, 8, 3, 32, True, 0.2),          # atomics
}


@pytest.mark.parametrize('backward_mode', ['split', 'fused'], indirect=True)
@pytest.mark.parametrize('case', list(BACKWARD_CASES), ids=list(BACKWARD_CASES))
def test_backward_modes_match_fp64(case, backward_mode):
    batch, heads, groups, block_q, blocks, block_k, slots, head_dim, per_head, masked = \
        BACKWARD_CASES[case]
    q, k, v, index, mask = make_inputs(batch, heads, groups, block_q, blocks, block_k, slots,
                                       head_dim, per_head=per_head, masked_fraction=masked)
    index[0, ..., 0, :] = -1  # group 0 routes nowhere: its dQ must be zero in every mode
    compare_to_fp64(q, k, v, index, mask, block_q, block_k)


@pytest.fixture
def aligned_tiles(request):
    """Run the test under ``kernels.set_aligned_tiles(request.param)``, then restore True."""
    kernels.set_aligned_tiles(request.param)
    yield request.param
    kernels.set_aligned_tiles(True)


ALIGNED_CASES = {
    # as TRITON_CASES, plus the map width (None: block-major tokens); tiles divide the blocks,
    # so the kernels take their ALIGNED form (and the general one with it turned off)
    'two_slots_per_head_masked': (1, 1, 2, 64, 4, 16, 2, 16, True, 0.2, None),
    'one_slot_dq_stored': (1, 1, 2, 64, 3, 16, 1, 16, False, 0.1, None),
    'window_8x8_two_slots': (1, 1, 4, 64, 4, 64, 2, 16, False, 0.1, 16),
}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('aligned_tiles', [True, False], indirect=True, ids=['aligned', 'general'])
@pytest.mark.parametrize('case', list(ALIGNED_CASES), ids=list(ALIGNED_CASES))
def test_aligned_and_general_tiles_match_fp64(case, aligned_tiles, dtype):
    batch, heads, groups, block_q, blocks, block_k, slots, head_dim, per_head, masked, width = \
        ALIGNED_CASES[case]
    q, k, v, index, mask = make_inputs(batch, heads, groups, block_q, blocks, block_k, slots,
                                       head_dim, dtype=dtype, per_head=per_head,
                                       masked_fraction=masked)
    index[0, ..., 0, :] = -1  # a group routed nowhere
    window = None if width is None else (8, 8)
    plans = [kernels._query_plan(kind, batch, heads, groups * block_q, head_dim, block_q,
                                 block_k, slots, dtype == torch.float32, None)[2]
             for kind in ('fwd', 'dq')]
    plans.append(kernels._key_plan('dkdv', batch, heads, blocks * block_k, head_dim, block_k,
                                   block_q, slots, dtype == torch.float32, None)[3])
    assert [plan['ALIGNED'] for plan in plans] == [aligned_tiles] * 3
    compare_to_fp64(q, k, v, index, mask, window or block_q, window or block_k, map_width=width)


@pytest.mark.parametrize('backward_mode', ['auto', 'split'])
def test_key_tail_rows_stay_out_of_gradients(backward_mode, monkeypatch):
    """Sets of 36 keys in 64-row dK/dV tiles (a key tail): every real score is so negative
    (lse below -128) that a tail row's zero key, scoring 0, would get a probability of
    2^128 = inf and, through dS^T K, NaN in dQ of the one-kernel backward."""
    monkeypatch.setattr(kernels, '_backward_mode', backward_mode)
    sets, size, head_dim = 3, 36, 32
    plan = kernels._key_plan('bwd' if backward_mode == 'auto' else 'dkdv', sets, 1, size,
                             head_dim, size, size, 1, True, None)[3]
    assert plan['ALIGNED'] and plan['KEY_TAIL']
    gen = torch.Generator().manual_seed(0)
    k = 1 + 0.1 * torch.rand(sets, 1, size, head_dim, generator=gen)
    q = -20 * k.mean(2, keepdim=True).expand(-1, -1, size, -1).contiguous()
    v = torch.randn(sets, 1, size, head_dim, generator=gen)
    index = torch.zeros(sets, 1, 1, dtype=torch.int64)
    compare_to_fp64(q, k, v, index, None, size, size)


SINGLE_BLOCK_CASES = {
    # name: (batch, heads, block_q, block_k, head_dim, per_head, masked): one query group
    # over one key block per batch entry (DSVT's sets)
    'dsvt_set_36': (3, 2, 36, 36, 32, False, 0.2),
    'queries_7_keys_20_per_head': (2, 3, 7, 20, 16, True, 0.3),
    'block_size_1': (4, 1, 1, 1, 16, False, 0.0),
    'set_90_head_dim_64': (2, 1, 90, 90, 64, False, 0.1),
}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('case', list(SINGLE_BLOCK_CASES), ids=list(SINGLE_BLOCK_CASES))
def test_single_block_kernels_match_fp64(case, dtype, single_block_kernels, monkeypatch):
    """Two programs loop over all (entry, head) pairs; entry 0 routes nowhere (-1 slot), the
    last has every key padded: both give zero outputs and gradients."""
    batch, heads, block_q, block_k, head_dim, per_head, masked = SINGLE_BLOCK_CASES[case]
    q, k, v, index, _ = make_inputs(batch, heads, 1, block_q, 1, block_k, 1, head_dim,
                                    dtype=dtype, per_head=per_head, empty_fraction=0.0)
    index[0] = -1
    mask = torch.rand(batch, block_k, device=DEVICE) < masked
    mask[-1] = True
    calls = []
    for name in ('forward', 'backward'):
        launch = getattr(single_block, name)
        monkeypatch.setattr(single_block, name, lambda *a, _launch=launch, _name=name, **kw:
                            (calls.append(_name), _launch(*a, **kw))[1])
    monkeypatch.setattr(single_block, '_grid', lambda pairs, *_: (min(pairs, 2),))
    out, dq, dk, dv = compare_to_fp64(q, k, v, index, mask, block_q, block_k)
    assert calls == ['forward', 'backward']
    for t in (out, dq, dk, dv):
        assert not t[0].any() and not t[-1].any()


def test_single_block_query_steps_cover_the_set_not_the_tile(single_block_kernels,
                                                              monkeypatch):
    """Sets of 36 in a 64-row tile, 16 query rows a step: three steps (rows 0-47), the last
    one partial; the tile's fourth step is not run, and every row of the set is written. The
    row's register cap reaches the launch."""
    row = (1, 1, 0, 16, 80)
    monkeypatch.setattr(single_block, 'tile_config', lambda *args: row)
    q, k, v, index, _ = make_inputs(2, 2, 1, 36, 1, 36, 1, 16, per_head=False,
                                    empty_fraction=0.0)
    mask = torch.rand(2, 36, device=DEVICE) < 0.2
    meta = single_block._launch_args(q, k, kernels._mask_args(mask, index), row)[2]
    assert (meta['QUERY_ROWS'], meta['QUERY_STEPS'], meta['maxnreg']) == (16, 3, 80)
    compare_to_fp64(q, k, v, index, mask, 36, 36)


def test_single_block_rows_shrink_cap_then_stages_then_query_rows():
    """A row the device cannot hold loses its register cap, then its pipeline stages, then
    halves its query rows a step down to 16."""
    row, tried = (4, 2, 8, 64, 96), []
    while row is not None:
        tried.append(row)
        row = single_block._smaller_config(128, row)
    assert tried == [(4, 2, 8, 64, 96), (4, 2, 8, 64, 0), (4, 1, 8, 64, 0), (4, 1, 8, 32, 0),
                     (4, 1, 8, 16, 0)]
    assert single_block._smaller_config(64, (4, 1, 8, 0, 0)) == (4, 1, 8, 32, 0)


@pytest.mark.parametrize('backward_mode', ['split', 'fused'], indirect=True)
def test_single_block_forward_feeds_the_gathered_backward(backward_mode, single_block_kernels):
    """The forced backward modes run the gathered kernels on the single-block forward's out and
    lse (the layouts the two share)."""
    q, k, v, index, mask = make_inputs(2, 2, 1, 36, 1, 36, 1, 32, masked_fraction=0.2)
    compare_to_fp64(q, k, v, index, mask, 36, 36)


def test_gathered_forward_feeds_the_single_block_backward(single_block_kernels, monkeypatch):
    monkeypatch.setitem(single_block.MAX_HEAD_DIM, 'fwd', 0)
    calls = []
    launch = single_block.backward
    monkeypatch.setattr(single_block, 'backward',
                        lambda *a, **kw: (calls.append(1), launch(*a, **kw))[1])
    q, k, v, index, mask = make_inputs(2, 2, 1, 36, 1, 36, 1, 32, masked_fraction=0.2)
    compare_to_fp64(q, k, v, index, mask, 36, 36)
    assert calls == [1]


@pytest.mark.parametrize('scale', [0.3, -0.2])
def test_single_block_kernels_strided_inputs_and_scale(scale, single_block_kernels):
    """Token-major (B, N, H, D) storage seen as (B, H, N, D), a per-head index sliced from a
    wider one, a mask sliced from a wider one; positive and negative scales."""
    q, k, v, index, _ = make_inputs(3, 2, 1, 20, 1, 20, 1, 16, per_head=True,
                                    empty_fraction=0.0)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    index = torch.cat([index, index], dim=-1)[..., :1]
    mask = (torch.rand(3, 40, device=DEVICE) < 0.3)[:, ::2]
    assert not q.is_contiguous() and not index.is_contiguous() and not mask.is_contiguous()
    compare_to_fp64(q, k, v, index, mask, 20, 20, scale=scale)


def test_single_block_choice(monkeypatch):
    single_block.set_single_block_kernels(True)
    for kind in ('fwd', 'bwd'):
        def takes(*args):
            return single_block.takes_call(kind, *args)
        assert takes(36, 36, 36, 36, 1, 32, None) and takes(7, 128, 7, 128, 1, 64, None)
        assert not takes(72, 72, 36, 36, 1, 32, None)     # two query groups and key blocks
        assert not takes(36, 36, 36, 36, 2, 32, None)     # two slots
        assert not takes(129, 129, 129, 129, 1, 32, None)  # over one tile
        assert not takes(36, 36, 36, 36, 1, 128, None)    # head dim over 64
        assert not takes(16, 16, 16, 16, 1, 32, (4, 4, 4))  # window layout
    monkeypatch.setitem(single_block.MAX_HEAD_DIM, 'fwd', 32)
    assert not single_block.takes_call('fwd', 36, 36, 36, 36, 1, 64, None)
    assert single_block.takes_call('bwd', 36, 36, 36, 36, 1, 64, None)
    single_block.set_single_block_kernels(False)
    assert not single_block.takes_call('bwd', 36, 36, 36, 36, 1, 32, None)


@pytest.fixture
def tile_rows():
    """``kernels.set_tile_configs`` for the test; the tuned table comes back afterwards."""
    saved = {kind: dict(classes) for kind, classes in kernels._CONFIGS.items()}
    yield kernels.set_tile_configs
    kernels.set_tile_configs(saved)


KEY_STEP_CASES = {
    # name: (block_q, q_window, block_k, k_window, map_width, BLOCK_N, (STEPS_PER_BLOCK,
    #        BLOCKS_PER_STEP)): 16-key steps inside 32-key blocks (one scalar index load a
    #        step), 64-key steps of two whole blocks, and 16-key steps across 24-key blocks'
    #        edges (runtime divisions)
    'one_block_steps': (32, (4, 8), 32, (4, 8), 16, 16, (2, 0)),
    'several_blocks_a_step': (32, (4, 8), 32, (4, 8), 16, 64, (0, 2)),
    'steps_across_block_edges': (48, (4, 12), 24, (4, 6), 12, 16, (0, 0)),
}


@pytest.mark.parametrize('case', list(KEY_STEP_CASES), ids=list(KEY_STEP_CASES))
@pytest.mark.parametrize('width', [False, True], ids=['block_major', 'windows'])
def test_aligned_key_steps_within_and_across_blocks_match_fp64(case, width, tile_rows):
    """ALIGNED forward and dQ key steps of each kind, with -1 slots, padding and a per-head
    index; the plans give the compile-time step divisors."""
    block_q, q_window, block_k, k_window, map_width, block_n, divisors = KEY_STEP_CASES[case]
    tile_rows({kind: {32: [(None, (16, block_n, 2, 1, 0))]} for kind in ('fwd', 'dq')})
    groups, blocks = 192 // block_q, 192 // block_k
    q, k, v, index, mask = make_inputs(1, 2, groups, block_q, blocks, block_k, 2, 16,
                                       per_head=True, masked_fraction=0.2)
    index[0, 1, 0, :] = -1
    plans = [kernels._query_plan(kind, 1, 2, 192, 16, block_q, block_k, 2, True, None)[2]
             for kind in ('fwd', 'dq')]
    assert [(plan['ALIGNED'], plan['STEPS_PER_BLOCK'], plan['BLOCKS_PER_STEP'])
            for plan in plans] == [(True, *divisors)] * 2
    if width:
        compare_to_fp64(q, k, v, index, mask, q_window, k_window, map_width=map_width)
    else:
        compare_to_fp64(q, k, v, index, mask, block_q, block_k)


PACKED_CASES = {
    # name: (groups, block_q, window, blocks, block_k, slots, map_width, PACKED): 16-row tiles
    # of whole groups whose 32-key steps hold whole blocks, so the packing geometry is
    # compile-time; a tail tile of fewer groups; 3-token blocks do not fill a group's 8
    # columns a step, so that case keeps the runtime geometry
    'four_groups_a_tile': (10, 4, (2, 2), 8, 4, 4, 4, 4),
    'eight_groups_a_tile': (13, 2, (1, 2), 11, 2, 4, 2, 8),
    'blocks_across_steps': (10, 4, (2, 2), 12, 3, 4, None, 0),
}


@pytest.mark.parametrize('case', list(PACKED_CASES), ids=list(PACKED_CASES))
@pytest.mark.parametrize('width', [False, True], ids=['block_major', 'windows'])
def test_packed_tiles_match_fp64(case, width, tile_rows):
    """Forward and dQ tiles that pack several small groups, with -1 slots, padding and a
    per-head index; the plans say when the packing geometry is compile-time (``PACKED``)."""
    groups, block_q, window, blocks, block_k, slots, map_width, packed = PACKED_CASES[case]
    if width and map_width is None:
        pytest.skip('no window form')
    tile_rows({kind: {32: [(None, (16, 32, 1, 1, 0))]} for kind in ('fwd', 'dq')})
    q, k, v, index, mask = make_inputs(1, 2, groups, block_q, blocks, block_k, slots, 16,
                                       per_head=True, masked_fraction=0.2)
    index[0, 1, 0, :] = -1
    index[0, 0, 1, 1] = -1
    plans = [kernels._query_plan(kind, 1, 2, groups * block_q, 16, block_q, block_k, slots,
                                 True, None)[2] for kind in ('fwd', 'dq')]
    assert [(plan['ALIGNED'], plan['PACKED']) for plan in plans] == [(False, packed)] * 2
    if width:
        compare_to_fp64(q, k, v, index, mask, window, window, map_width=map_width)
    else:
        compare_to_fp64(q, k, v, index, mask, block_q, block_k)


def test_backward_mode_choice():
    choose = kernels.backward_dq_mode
    assert choose(1, 64, 32, 'auto') == 1 and choose(1, 64, 32, 'fused') == 1
    # no atomics unless forced: dQ stored, or the split backward
    assert choose(1, 300, 32, 'auto') == 0 and choose(1, 300, 32, 'fused') == 2
    assert choose(4, 16, 32, 'auto') == 0 and choose(4, 16, 32, 'fused') == 2
    assert choose(1, 64, 32, 'split') == 0
    with pytest.raises(ValueError, match='mode must be one of'):
        kernels.set_backward_mode('atomic')


def test_triton_fully_masked_queries_give_zeros():
    q, k, v, index, _ = make_inputs(1, 2, 4, 4, 3, 4, 2, 16)
    mask = torch.zeros(1, 12, dtype=torch.bool, device=DEVICE)
    mask[:, :4] = True                 # block 0 entirely padded
    index[0, 0] = torch.tensor([0, 0])  # group 0 sees only padded keys
    index[0, 1] = -1                    # group 1 has only empty slots
    for backend in ('triton', 'torch'):
        out, dq, dk, dv = compare_to_fp64(q, k, v, index, mask, 4, 4, backend=backend)
        assert (out[:, :, :8] == 0).all() and (dq[:, :, :8] == 0).all()


def test_triton_noncontiguous_inputs_and_scale():
    q, k, v, index, mask = make_inputs(2, 4, 3, 4, 4, 4, 2, 16, masked_fraction=0.2)
    # (B, N, H, D) storage viewed as (B, H, N, D); index transposed in memory.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    index = index.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous() and not index.is_contiguous()
    compare_to_fp64(q, k, v, index, mask, 4, 4, scale=0.3)


@pytest.mark.parametrize('mode', ['split', 'fused'])
def test_triton_output_and_gradients_are_token_major(mode):
    """Out, dQ, dK, dV are (B, N, H, D) memory viewed as (B, H, N, D), in both backwards."""
    q, k, v, index, _ = make_inputs(2, 3, 3, 4, 3, 4, 2, 16)
    kernels.set_backward_mode(mode)
    try:
        results = forward_and_grads(
            lambda q_, k_, v_: ops.gather_attention(q_, k_, v_, index, block_q=4, block_k=4,
                                                    backend='triton'),
            q, k, v, torch.randn_like(q))
    finally:
        kernels.set_backward_mode('auto')
    for t in results:
        assert t.transpose(1, 2).is_contiguous(), t.stride()
    reference = gather_attention_reference(q, k, v, index, block_q=4, block_k=4)
    torch.testing.assert_close(results[0], reference, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize('backend', ['triton', 'torch'])
@pytest.mark.parametrize('shape', [
    (0, 2, 2, 4, 2, 4, 2),   # B = 0
    (1, 2, 0, 4, 2, 4, 2),   # Nq = 0
    (1, 2, 2, 4, 0, 4, 2),   # Nk = 0 (every slot empty)
    (1, 2, 2, 4, 2, 4, 0),   # K = 0
], ids=['batch0', 'queries0', 'keys0', 'slots0'])
def test_zero_size_inputs(shape, backend):
    batch, heads, groups, block_q, blocks, block_k, slots = shape
    q, k, v, index, _ = make_inputs(batch, heads, groups, block_q, blocks, block_k, slots, 16)
    if blocks == 0:
        index.fill_(-1)
    out, dq, dk, dv = forward_and_grads(
        lambda q_, k_, v_: ops.gather_attention(q_, k_, v_, index, block_q=block_q,
                                                block_k=block_k, backend=backend),
        q, k, v, torch.randn_like(q))
    assert out.shape == q.shape and dk.shape == k.shape
    assert not out.any() and not dq.any() and not dk.any() and not dv.any()


@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
@pytest.mark.parametrize('tiles', [(4, 256), (4, 512), (16, 1024)],
                         ids=['4x256', '4x512', '16x1024'])
def test_transpose_index_is_a_stable_counting_sort(per_head, tiles, monkeypatch):
    # Tilings of the kernel: 20 blocks span several programs; the groups x 3 slots span two
    # steps of BLOCK_E entries.
    monkeypatch.setattr(kernels, '_transpose_tiles', lambda entries: tiles)
    blocks, groups, slots = 20, {256: 90, 512: 180, 1024: 350}[tiles[1]], 3
    shape = (2, 2, groups, slots) if per_head else (2, groups, slots)
    index = torch.randint(-1, blocks, shape, device=DEVICE)
    index = index.transpose(-1, -2).contiguous().transpose(-1, -2)  # strided index
    order, offsets = _transpose_index(index, blocks)
    rows = index.reshape(-1, groups * slots).cpu()
    for row, row_order, row_offsets in zip(rows, order.cpu(), offsets.cpu()):
        expected_offsets = [int(((row >= 0) & (row < m)).sum()) for m in range(blocks + 1)]
        assert row_offsets.tolist() == expected_offsets
        for m in range(blocks):
            groups_of_m = (torch.nonzero(row == m).flatten() // slots).tolist()
            assert row_order[expected_offsets[m]:expected_offsets[m + 1]].tolist() == groups_of_m


@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
def test_dq_launch_builds_the_same_transposed_index(per_head):
    """The split backward's dQ launch runs the transposition programs first, beside its own:
    the same order and offsets as the transposition alone, and the same dQ and delta."""
    q, k, v, index, mask = make_inputs(2, 2, 6, 4, 5, 4, 3, 16, per_head=per_head,
                                       masked_fraction=0.2)
    out, lse = kernels.forward(q, k, v, index, mask, 4, 4, 0.25)
    grad_out = torch.randn_like(q)
    plain = kernels.backward_dq(grad_out, q, k, v, out, lse, index, mask, 4, 4, 0.25)
    transpose = kernels._transpose_launch(index, 5)
    with_transpose = kernels.backward_dq(grad_out, q, k, v, out, lse, index, mask, 4, 4, 0.25,
                                         transpose=transpose)
    order, offsets = _transpose_index(index, 5)
    assert torch.equal(transpose[1], offsets)
    for row, row_offsets in enumerate(offsets.tolist()):  # entries past the last are unwritten
        assert torch.equal(transpose[0][row, :row_offsets[-1]], order[row, :row_offsets[-1]])
    for got, expected in zip(with_transpose, plain):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- window layout

WINDOW_CASES = {
    # name: (batch, heads, q_window, q_map_height, k_window, k_map_height, map_width, slots,
    #        head_dim, masked); one slot reaches the one-kernel backward, several the split one
    'square_4x4_one_slot': (1, 2, (4, 4), 8, (4, 4), 8, 8, 1, 16, 0.2),
    'non_square_2x3_three_slots': (2, 1, (2, 3), 4, (2, 3), 4, 6, 3, 32, 0.0),
    'q_1x2_k_3x1_per_head': (1, 2, (1, 2), 3, (3, 1), 6, 4, 2, 16, 0.3),
}


def window_ids(map_height, map_width, window):
    """Window (row-major over the window grid) of every token of a row-major map."""
    rows = torch.arange(map_height).repeat_interleave(map_width)
    cols = torch.arange(map_width).repeat(map_height)
    return (rows // window[0]) * (map_width // window[1]) + cols // window[1]


def window_oracle(q, k, v, index, q_window, k_window, map_width, mask=None):
    """Independent fp64 oracle of the window layout: dense softmax weighted by how often each
    key's window is routed from each query's window."""
    batch, heads, num_q, _ = q.shape
    q_win = window_ids(num_q // map_width, map_width, q_window)
    k_win = window_ids(k.shape[2] // map_width, map_width, k_window)
    if index.dim() == 3:
        index = index.unsqueeze(1).expand(-1, heads, -1, -1)
    routed = index.cpu()[:, :, q_win]                                 # (B, H, Nq, K)
    count = (routed.unsqueeze(-1) == k_win.view(1, 1, 1, 1, -1)).sum(3).double()
    return counted_softmax_oracle(q, k, v, count, mask)


def make_window_inputs(case, dtype=torch.float32, device=DEVICE):
    batch, heads, q_window, q_rows, k_window, k_rows, width, slots, head_dim, masked = \
        WINDOW_CASES[case]
    groups = q_rows * width // (q_window[0] * q_window[1])
    blocks = k_rows * width // (k_window[0] * k_window[1])
    q, k, v, index, mask = make_inputs(batch, heads, groups, q_window[0] * q_window[1], blocks,
                                       k_window[0] * k_window[1], slots, head_dim, dtype=dtype,
                                       per_head='per_head' in case, masked_fraction=masked,
                                       device=device)
    return q, k, v, index, mask, q_window, k_window, width


@pytest.mark.parametrize('case', list(WINDOW_CASES), ids=list(WINDOW_CASES))
def test_window_layout_reference_matches_oracle(case):
    q, k, v, index, mask, q_window, k_window, width = make_window_inputs(
        case, torch.float64, 'cpu')
    out = ops.gather_attention(q, k, v, index, block_q=q_window, block_k=k_window,
                               map_width=width, key_padding_mask=mask, backend='torch')
    torch.testing.assert_close(out, window_oracle(q, k, v, index, q_window, k_window, width,
                                                  mask))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('case', list(WINDOW_CASES), ids=list(WINDOW_CASES))
def test_window_layout_triton_matches_fp64(case, dtype):
    q, k, v, index, mask, q_window, k_window, width = make_window_inputs(case, dtype)
    compare_to_fp64(q, k, v, index, mask, q_window, k_window, map_width=width)


def test_window_layout_reads_strided_maps():
    """q, k, v as head slices of one (B, H*W, 3 * heads * D) projection, as BiFormer passes them."""
    q, k, v, index, mask, q_window, k_window, width = make_window_inputs('square_4x4_one_slot')
    qkv = torch.cat([t.transpose(1, 2).flatten(2) for t in (q, k, v)], dim=-1)
    batch, tokens, _ = qkv.shape
    q, k, v = (t.view(batch, tokens, 2, 16).transpose(1, 2) for t in qkv.split(32, dim=-1))
    assert not q.is_contiguous()
    compare_to_fp64(q, k, v, index, mask, q_window, k_window, map_width=width)


@pytest.mark.parametrize('overrides, message', [
    (dict(block_q=(2, 2)), r'\(h, w\) window blocks need map_width'),
    (dict(block_q=(2, 2), block_k=(2, 2), map_width=5), 'windows must tile the map'),
    (dict(block_q=(3, 2), block_k=(2, 2), map_width=4), 'windows must tile the map'),
    (dict(block_q=(2, 2, 1), block_k=(2, 2), map_width=4), r'or an \(h, w\) pair'),
    (dict(block_q=(2, 2), block_k=(2, 2), map_width=0), 'map_width must be a positive int'),
])
def test_window_layout_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


# ----------------------------------------------------------------------------- random problems


def random_problem(seed: int):
    """One random call: (q, k, v, index, mask, block_q, block_k, map_width, scale) and the
    kernel choice (backward mode, whole-map backward, single-block kernels). Block sizes 1-40
    (up to 100 for single-block calls), (h, w) windows of a map, 1-3 heads, D 8-64, slots up to
    M, per-head or shared index with -1 slots, padding, scales 0.3 and -0.2, token-major q,
    fp32 or fp16."""
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float16])
    batch, heads, head_dim = rng.randint(1, 2), rng.randint(1, 3), rng.choice([8, 16, 24, 32, 64])
    map_width, shape = None, rng.choice(['windows', 'single', 'gathered', 'gathered'])
    if shape == 'windows':  # one window grid over one map for q and k
        win_h, win_w, grid_h, grid_w = (rng.randint(1, 3) for _ in range(4))
        block_q = block_k = (win_h, win_w)
        groups = blocks = grid_h * grid_w
        num_q = num_k = groups * win_h * win_w
        map_width = grid_w * win_w
    elif shape == 'single':
        groups = blocks = 1
        block_q, block_k = num_q, num_k = rng.randint(1, 100), rng.randint(1, 100)
    else:
        groups, blocks = rng.randint(1, 4), rng.randint(1, 4)
        block_q, block_k = rng.randint(1, 40), rng.randint(1, 40)
        num_q, num_k = groups * block_q, blocks * block_k
    slots = rng.randint(1, blocks)
    index_shape = (batch, heads, groups, slots) if rng.random() < 0.3 else (batch, groups, slots)
    index = torch.randint(0, blocks, index_shape, device=DEVICE)
    index = index.masked_fill(torch.rand(index_shape, device=DEVICE) < 0.15, -1)
    mask = None
    if rng.random() < 0.6:
        mask = torch.rand(batch, num_k, device=DEVICE) < rng.choice([0.0, 0.2, 0.6])
    q = torch.randn(batch, heads, num_q, head_dim, device=DEVICE).to(dtype)
    if rng.random() < 0.3:
        q = torch.randn(batch, num_q, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, heads, num_k, head_dim, device=DEVICE).to(dtype) for _ in 'kv')
    choice = (rng.choice(['auto', 'split', 'fused']), rng.choice(['auto', 'off', 'on']),
              rng.random() < 0.8)
    scale = rng.choice([None, 0.3, -0.2])
    return (q, k, v, index, mask, block_q, block_k, map_width, scale), choice


@pytest.mark.parametrize('seed', range(100))
def test_random_problems_match_fp64(seed, monkeypatch):
    """Random calls (:func:`random_problem`) under a random kernel choice against fp64. 1500
    seeds passed when this was written (2026-12-08), 100 run here."""
    (q, k, v, index, mask, block_q, block_k, map_width, scale), choice = random_problem(seed)
    backward_mode, map_mode, single = choice
    monkeypatch.setattr(kernels, '_backward_mode', backward_mode)
    map_backward.set_map_backward(map_mode)
    single_block.set_single_block_kernels(single)
    compare_to_fp64(q, k, v, index, mask, block_q, block_k, scale=scale, map_width=map_width)


# ----------------------------------------------------------------------------- whole-map backward

@pytest.mark.parametrize('case', list(WINDOW_CASES), ids=list(WINDOW_CASES))
def test_whole_map_backward_window_layout_matches_fp64(case, whole_map):
    q, k, v, index, mask, q_window, k_window, width = make_window_inputs(case, torch.float16)
    compare_to_fp64(q, k, v, index, mask, q_window, k_window, map_width=width)


def test_whole_map_backward_strided_inputs_and_token_major_gradients(whole_map):
    q, k, v, index, mask = make_inputs(2, 4, 3, 4, 4, 4, 2, 16, masked_fraction=0.2)
    # (B, N, H, D) storage viewed as (B, H, N, D), then a head-dim slice: rows 16 apart
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)[..., :8] for x in (q, k, v))
    index = index.transpose(1, 2).contiguous().transpose(1, 2)
    results = compare_to_fp64(q, k, v, index, mask, 4, 4, scale=0.3)
    for t in results[1:]:
        assert t.transpose(1, 2).is_contiguous(), t.stride()


def test_whole_map_and_gathered_backward_agree():
    """The same forward, both backwards: one meaning, fp32 rounding apart."""
    q, k, v, index, mask = make_inputs(1, 2, 6, 4, 6, 4, 3, 16, masked_fraction=0.2)
    index[0, 0] = -1
    grad_out = torch.randn_like(q)
    out, lse = kernels.forward(q, k, v, index, mask, 4, 4, 0.25)
    results = []
    for mode in ('on', 'off'):
        map_backward.set_map_backward(mode)
        results.append(kernels.backward(grad_out, q, k, v, out, lse, index, mask, 4, 4, 0.25))
    for ours, gathered in zip(*results):
        torch.testing.assert_close(ours, gathered, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('path', ['split', 'one_kernel_stored', 'one_kernel_atomics',
                                  'whole_map', 'no_slots'])
def test_backward_writes_into_given_gradient_views(path, monkeypatch):
    """``backward(..., grads=...)``: the gradients land in views of a caller's buffers (as
    BiFormer's qkv gradient: token rows 2-3 heads' widths apart), equal to the ones the kernels
    allocate themselves."""
    slots, block_k = {'one_kernel_stored': (1, 4), 'one_kernel_atomics': (1, 300),
                      'no_slots': (0, 4)}.get(path, (2, 4))
    q, k, v, index, mask = make_inputs(2, 2, 3, 4, 3, block_k, slots, 16, masked_fraction=0.2)
    if path == 'whole_map':
        map_backward.set_map_backward('on')
    if path == 'one_kernel_atomics':  # 'auto' never takes atomics
        monkeypatch.setattr(kernels, '_backward_mode', 'fused')
    scale = 0.25
    out, lse = kernels.forward(q, k, v, index, mask, 4, block_k, scale)
    grad_out = torch.randn_like(q)
    expected = kernels.backward(grad_out, q, k, v, out, lse, index, mask, 4, block_k, scale)
    q_buffer = torch.full((2, q.shape[2], 2, 2, 16), float('nan'), device=DEVICE)
    kv_buffer = torch.full((2, k.shape[2], 2, 2, 16), float('nan'), device=DEVICE)
    views = [q_buffer[:, :, 1].transpose(1, 2)] + [t.transpose(1, 2)
                                                   for t in kv_buffer.unbind(2)]
    got = kernels.backward(grad_out, q, k, v, out, lse, index, mask, 4, block_k, scale,
                           grads=views)
    assert kernels.backward_dq_mode(slots, block_k, 16) == {
        'one_kernel_stored': 1, 'one_kernel_atomics': 2}.get(path, 0) or path == 'no_slots'
    for view, result, want in zip(views, got, expected):
        assert result.data_ptr() == view.data_ptr()
        torch.testing.assert_close(view, want, rtol=1e-6, atol=1e-6)
    assert q_buffer[:, :, 0].isnan().all()


def test_count_table_counts_named_blocks():
    index = torch.tensor([[[0, 2, 2, -1], [5, -1, -1, 3], [-2, 1, 4, 9]]])  # (1, 3, 4)
    counts = map_backward.count_table(index.to(DEVICE), 5)
    expected = torch.zeros(1, 1, 3, 5, dtype=torch.uint8)
    for g, row in enumerate(index[0].tolist()):
        for block in row:
            if 0 <= block < 5:
                expected[0, 0, g, block] += 1
    assert counts.dtype == torch.uint8 and torch.equal(counts.cpu(), expected)
    per_head = torch.stack([index, index.flip(-1)], dim=1)   # (1, 2, 3, 4), strided per head
    counts = map_backward.count_table(per_head.transpose(2, 3).contiguous().transpose(2, 3), 5)
    assert counts.shape == (1, 2, 3, 5) and torch.equal(counts.cpu()[:, 1], expected[:, 0])
    many = torch.zeros(1, 1, 255, dtype=torch.long, device=DEVICE)  # 255 slots name block 0
    assert map_backward.count_table(many, 2).cpu().tolist() == [[[[255, 0]]]]
    with pytest.raises(ValueError, match='at most 255 slots'):
        map_backward.count_table(torch.zeros(1, 1, 256, dtype=torch.long), 2)
    assert map_backward.count_table(index[:, :0].to(DEVICE), 5).shape == (1, 1, 0, 5)
    assert not map_backward.count_table(index[..., :0].to(DEVICE), 5).any()  # no slots


def test_whole_map_backward_choice():
    takes = map_backward.takes_map_backward
    map_backward.set_map_backward('auto')
    assert takes(196, 32, 4, 4, 16, 1024)       # BiFormer stage 3 at 224 px, batch 128
    assert not takes(196, 32, 4, 4, 16, 128)    # too few (batch, head) programs
    assert not takes(196, 32, 4, 4, 8, 1024)    # a sixth of the keys: the gathered kernels
    assert not takes(256, 32, 16, 16, 8, 1024)  # 16-token groups fill the gathered tiles
    assert not takes(441, 32, 9, 9, 16, 1024)   # more keys than a tile holds
    assert not takes(196, 128, 4, 4, 16, 1024)  # head dim over 64
    map_backward.set_map_backward('on')
    assert takes(256, 32, 16, 16, 1, 1) and not takes(257, 16, 1, 1, 1, 1)
    assert not takes(256, 32, 1, 1, 256, 1)     # more slots than the uint8 count table holds
    map_backward.set_map_backward('off')
    assert not takes(196, 32, 4, 4, 16, 1024)
    with pytest.raises(ValueError, match='mode must be one of'):
        map_backward.set_map_backward('dense')


@pytest.mark.parametrize('backward_mode', ['auto', 'split', 'fused'], indirect=True)
def test_forced_backward_modes_keep_the_gathered_kernels(backward_mode, whole_map, monkeypatch):
    """``set_backward_mode('split' | 'fused')`` chooses among the gathered kernels; only 'auto'
    hands over to the whole-map backward."""
    calls = []
    launch = map_backward.backward
    monkeypatch.setattr(map_backward, 'backward',
                        lambda *args, **kwargs: (calls.append(1), launch(*args, **kwargs)))
    q, k, v, index, _ = make_inputs(1, 1, 3, 4, 3, 4, 2, 16)
    compare_to_fp64(q, k, v, index, None, 4, 4)
    assert len(calls) == (backward_mode == 'auto')


def test_whole_map_rows_too_large_for_the_device_shrink(monkeypatch, whole_map):
    """A row the device cannot hold halves its query rows until one launches, with a warning."""
    monkeypatch.setattr(map_backward, '_FITTED', {})
    monkeypatch.setattr(map_backward, '_TILES', {32: (64, 4, 1), 64: (64, 4, 1)})
    launched = []
    monkeypatch.setattr(map_backward, '_map_bwd_kernel', SmallDevice(
        map_backward._map_bwd_kernel, lambda meta: meta['BLOCK_M'] > 16,
        lambda meta: launched.append(meta['BLOCK_M'])))
    q, k, v, index, _ = make_inputs(1, 1, 3, 4, 3, 4, 2, 16, empty_fraction=0.0)
    with pytest.warns(UserWarning, match='whole-map attention backward'):
        compare_to_fp64(q, k, v, index, None, 4, 4)
    assert launched == [16] and list(map_backward._FITTED.values()) == [(16, 4, 1)]


# ----------------------------------------------------------------------------- custom op


def test_custom_op_opcheck():
    q, k, v, index, mask = make_inputs(1, 2, 2, 4, 3, 4, 2, 16, masked_fraction=0.2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(gather_attention_fwd, (q, k, v, index, mask, 4, 4, 0.25, None),
                          test_utils=('test_schema', 'test_faketensor',
                                      'test_autograd_registration'))


@pytest.mark.parametrize('backend', ['triton', 'auto'])
def test_torch_compile_fullgraph(backend):
    q, k, v, index, mask = make_inputs(1, 2, 3, 4, 3, 4, 2, 16, masked_fraction=0.2)

    def layer(q_, k_, v_):
        out = ops.gather_attention(q_ * 2, k_, v_, index, block_q=4, block_k=4,
                                   key_padding_mask=mask, backend=backend)
        return out.sigmoid()
    grad_out = torch.randn_like(q)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    for got, expected in zip(forward_and_grads(compiled, q, k, v, grad_out),
                             forward_and_grads(layer, q, k, v, grad_out)):
        torch.testing.assert_close(got, expected)



def test_is_exporting_under_compile_and_export(monkeypatch):
    """Compiled callers take the Triton custom ops, exported ones the references. Dynamo folds
    ``torch.compiler.is_exporting()`` to True whenever it traces (torch <= 2.11; simulated
    here), so ``ops.is_exporting`` must read the flag torch.export sets instead."""
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True)

    class Flagged(torch.nn.Module):
        def forward(self, x):
            return x + (1.0 if ops.is_exporting() else 0.0)

    x = torch.zeros(2)
    assert not ops.is_exporting()
    assert torch.compile(Flagged(), fullgraph=True, backend='eager')(x).tolist() == [0.0, 0.0]
    exported = torch.export.export(Flagged(), (x,))
    assert exported.module()(x).tolist() == [1.0, 1.0]



def test_custom_ops_do_not_cache_window_rows():
    """The compile path's custom ops make their window-row tables afresh (a cached one would
    outlive the memory pool of Inductor's CUDA-graph warm-up); the eager path caches them."""
    q, k, v, index, _ = make_inputs(1, 1, 4, 4, 4, 4, 2, 16)  # a 4x4 map of 2x2 windows
    args = (q, k, v, index, None, 4, 4, 0.25, [2, 2, 4])
    kernels._WINDOW_ROWS_CACHE.clear()
    out, lse = kernels.gather_attention_fwd(*args)
    kernels.gather_attention_bwd(torch.ones_like(q), q, k, v, out, lse, *args[3:])
    assert not kernels._WINDOW_ROWS_CACHE
    expected = ops.gather_attention(q, k, v, index, block_q=(2, 2), block_k=(2, 2), map_width=4,
                                    scale=0.25, backend='triton')
    assert len(kernels._WINDOW_ROWS_CACHE) == 1
    torch.testing.assert_close(out, expected)
    kernels._WINDOW_ROWS_CACHE.clear()
    with kernels._uncached_window_rows():
        with kernels._uncached_window_rows():  # nested: the outer context stays uncached
            pass
        kernels.window_rows(16, (2, 2), 4, q.device)
    assert not kernels._WINDOW_ROWS_CACHE


@pytest.mark.gpu
def test_window_rows_under_capture_neither_cached_nor_read_from_the_cache():
    """A graph captured after eager calls makes its own table: one read from the cache would be
    baked into the graph and outlive the cache's entry."""
    device = torch.device('cuda')
    kernels._WINDOW_ROWS_CACHE.clear()
    cached = kernels.window_rows(16, (2, 2), 4, device)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            captured = kernels.window_rows(16, (2, 2), 4, device)
        finally:
            graph.capture_end()
    graph.replay()
    torch.cuda.synchronize()
    assert captured.data_ptr() != cached.data_ptr() and len(kernels._WINDOW_ROWS_CACHE) == 1
    assert torch.equal(captured, cached)


@pytest.mark.gpu
def test_torch_compile_takes_the_custom_op_on_cuda():
    """Under torch.compile a CUDA caller's graph holds the Triton custom op, not the
    reference's gathers."""
    q, k, v, index, _ = make_inputs(2, 2, 4, 16, 4, 16, 2, 32, dtype=torch.bfloat16)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward

    compiled = torch.compile(lambda q_: ops.gather_attention(q_, k, v, index, block_q=16,
                                                             block_k=16),
                             fullgraph=True, backend=recording_backend)
    torch.testing.assert_close(compiled(q), ops.gather_attention(q, k, v, index, block_q=16,
                                                                 block_k=16))
    assert any('gather_attention_fwd' in target for target in targets), targets
    assert not any('gather' in target and 'dsa_ops' not in target for target in targets), targets


# ----------------------------------------------------------------------------- bad input


def _call(**overrides):
    q, k, v, index, _ = make_inputs(1, 2, 3, 4, 3, 4, 2, 16, device='cpu')
    args = dict(q=q, k=k, v=v, index=index, block_q=4, block_k=4, key_padding_mask=None,
                backend='torch')
    args.update(overrides)
    return ops.gather_attention(args.pop('q'), args.pop('k'), args.pop('v'), args.pop('index'),
                                **args)


@pytest.mark.parametrize('overrides, message', [
    (dict(q=torch.randn(2, 12, 16)), 'q must be a 4-D'),
    (dict(k=torch.randn(1, 2, 12, 8)), 'k must have shape'),
    (dict(v=torch.randn(1, 2, 8, 16)), 'v must have the shape'),
    (dict(v=torch.randn(1, 2, 12, 16, dtype=torch.float64)), 'share one dtype'),
    (dict(q=torch.ones(1, 2, 12, 16, dtype=torch.int32)), 'q must be a floating'),
    (dict(block_q=5), 'block_q=5 must divide'),
    (dict(block_k=0), 'block_k must be a positive int'),
    (dict(block_q=2.0), 'block_q must be a positive int'),
    (dict(index=torch.zeros(1, 3, 2)), 'index must be an int32 or int64'),
    (dict(index=torch.zeros(1, 4, 2, dtype=torch.int64)), r'index must have shape \(B, G, K\)'),
    (dict(index=torch.zeros(1, 3, 3, 2, dtype=torch.int64)), r'index must have shape \(B, H'),
    (dict(index=torch.zeros(3, 2, dtype=torch.int64)), 'index must be 3-D'),
    (dict(index=torch.full((1, 3, 2), 3)), r'index entries must lie in \[-1, M\)'),
    (dict(index=torch.full((1, 3, 2), -2)), r'index entries must lie in \[-1, M\)'),
    (dict(key_padding_mask=torch.zeros(1, 12)), 'key_padding_mask must be a bool'),
    (dict(key_padding_mask=torch.zeros(1, 11, dtype=torch.bool)), 'key_padding_mask must have'),
    (dict(scale='0.5'), 'scale must be a float'),
    (dict(backend='cuda'), 'backend must be one of'),
    (dict(backend='triton', q=torch.randn(1, 2, 12, 16, dtype=torch.float64),
          k=torch.randn(1, 2, 12, 16, dtype=torch.float64),
          v=torch.randn(1, 2, 12, 16, dtype=torch.float64)), 'triton backend supports q dtypes'),
])
def test_bad_arguments_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_debug_mode_checks_index_on_triton_path():
    ops.set_debug(True)
    try:
        with pytest.raises(ValueError, match='index entries'):
            _call(index=torch.full((1, 3, 2), 7), backend='triton')
    finally:
        ops.set_debug(False)


# ----------------------------------------------------------------------------- GPU, bf16

GPU_SHAPES = {
    # name: (batch, heads, groups, block_q, blocks, block_k, slots, head_dim, masked)
    'biformer_t224_s1': (8, 2, 49, 64, 49, 64, 1, 32, 0.0),
    'biformer_t224_s2': (8, 4, 49, 16, 49, 16, 4, 32, 0.0),
    'biformer_t224_s3': (8, 8, 49, 4, 49, 4, 16, 32, 0.0),
    'biformer_s_det_s1': (1, 2, 256, 273, 256, 273, 1, 32, 0.05),
    'biformer_s_det_s2': (1, 4, 256, 77, 256, 77, 4, 32, 0.05),
    'biformer_s_det_s3': (1, 8, 256, 24, 256, 24, 16, 32, 0.05),
    'dsvt_set_90_d64': (256, 4, 1, 90, 1, 90, 1, 64, 0.2),
    'head_dim_128': (2, 4, 64, 64, 64, 64, 4, 128, 0.0),
    'biformer_b1024_s2': (2, 4, 64, 64, 64, 64, 8, 32, 0.05),
}


@pytest.mark.gpu
@pytest.mark.parametrize('backward_mode', ['auto', 'split', 'fused'], indirect=True)
@pytest.mark.parametrize('case', list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_triton_bf16_matches_fp64_on_gpu(case, backward_mode):
    batch, heads, groups, block_q, blocks, block_k, slots, head_dim, masked = GPU_SHAPES[case]
    q, k, v, index, mask = make_inputs(batch, heads, groups, block_q, blocks, block_k, slots,
                                       head_dim, dtype=torch.bfloat16, masked_fraction=masked,
                                       empty_fraction=0.0)
    compare_to_fp64(q, k, v, index, mask, block_q, block_k)


GPU_WINDOW_SHAPES = {
    # name: (batch, heads, map side, window side, slots, masked): BiFormer-T at 224, n_win 7
    'biformer_t224_s1_map': (8, 2, 56, 8, 1, 0.0),
    'biformer_t224_s2_map': (8, 4, 28, 4, 4, 0.1),
    'biformer_t224_s3_map': (8, 8, 14, 2, 16, 0.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize('head_dim', [32, 64])
@pytest.mark.parametrize('set_size', [36, 48, 90])
def test_single_block_kernels_bf16_match_fp64_on_gpu(set_size, head_dim, single_block_kernels):
    """DSVT's sets over about 25,000 voxels, 4 heads, 10% padding."""
    q, k, v, index, mask = make_inputs(25_000 // set_size, 4, 1, set_size, 1, set_size, 1,
                                       head_dim, dtype=torch.bfloat16, masked_fraction=0.1,
                                       empty_fraction=0.0)
    compare_to_fp64(q, k, v, index, mask, set_size, set_size)


@pytest.mark.gpu
@pytest.mark.parametrize('case', list(GPU_WINDOW_SHAPES), ids=list(GPU_WINDOW_SHAPES))
def test_triton_bf16_window_layout_matches_fp64_on_gpu(case):
    batch, heads, side, window, slots, masked = GPU_WINDOW_SHAPES[case]
    groups = (side // window) ** 2
    q, k, v, index, mask = make_inputs(batch, heads, groups, window * window, groups,
                                       window * window, slots, 32, dtype=torch.bfloat16,
                                       masked_fraction=masked, empty_fraction=0.0)
    compare_to_fp64(q, k, v, index, mask, (window, window), (window, window), map_width=side)


@pytest.mark.gpu
@pytest.mark.parametrize('layout', ['blocks', 'windows'])
def test_whole_map_backward_bf16_matches_fp64_on_gpu(layout, whole_map):
    """BiFormer-T at 224 px, stage 3: a 14x14 map of 2x2 regions, 16 routed per region."""
    q, k, v, index, _ = make_inputs(8, 8, 49, 4, 49, 4, 16, 32, dtype=torch.bfloat16,
                                    empty_fraction=0.0)
    if layout == 'blocks':
        compare_to_fp64(q, k, v, index, None, 4, 4)
    else:
        compare_to_fp64(q, k, v, index, None, (2, 2), (2, 2), map_width=14)


@pytest.mark.gpu
def test_window_layout_under_cuda_graph_capture():
    """A window geometry first seen during capture: replays match eager, and the row table made
    during capture (valid only in replays) is not cached."""
    q, k, v, index, _ = make_inputs(2, 2, 9, 4, 9, 4, 2, 32, dtype=torch.bfloat16,
                                    empty_fraction=0.0)

    def attend():
        return ops.gather_attention(q, k, v, index, block_q=(2, 2), block_k=(2, 2),
                                    map_width=6)

    kernels._WINDOW_ROWS_CACHE.clear()
    ops.gather_attention(q, k, v, index, block_q=4, block_k=4)  # compile outside capture
    expected = attend()
    kernels._WINDOW_ROWS_CACHE.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend()
    assert not kernels._WINDOW_ROWS_CACHE
    graph.replay()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


@pytest.mark.parametrize('slots', [1, 3], ids=['one_kernel_backward', 'split_backward'])
def test_tile_configs_too_large_for_the_device_shrink_and_are_remembered(monkeypatch, slots):
    """A GPU with less shared memory than the H200 the table was tuned on: configs whose launch
    raises OutOfResources are replaced by smaller ones (one stage, then smaller tiles), with one
    warning, and the results stay right."""
    monkeypatch.setattr(kernels, '_FITTED', {})
    launched = []

    def refuses(meta):  # more than one stage or tiles over 16 x 32
        return meta['num_stages'] > 1 or meta['BLOCK_M'] > 16 or meta['BLOCK_N'] > 32
    for name in ('_fwd_kernel', '_bwd_dq_kernel', '_bwd_dkdv_kernel'):
        monkeypatch.setattr(kernels, name, SmallDevice(
            getattr(kernels, name), refuses,
            lambda meta: launched.append((meta['BLOCK_M'], meta['BLOCK_N'],
                                          meta['num_stages']))))
    q, k, v, index, _ = make_inputs(1, 2, 4, 16, 4, 16, slots, 16, empty_fraction=0.0)
    grad = torch.randn_like(q)

    def run(backend):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = ops.gather_attention(*leaves, index, block_q=16, block_k=16, backend=backend)
        return [out] + list(torch.autograd.grad(out, leaves, grad))
    with pytest.warns(UserWarning, match='does not fit'):
        got = run('triton')
    for result, expected in zip(got, run('torch')):
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)
    assert launched and all(m <= 16 and n <= 32 and stages == 1 for m, n, stages in launched)
    assert kernels._FITTED
    launched.clear()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # remembered: no second warning, no failed launch
        run('triton')
    assert launched


def test_single_block_rows_too_large_for_the_device_shrink_and_are_remembered(
        monkeypatch, single_block_kernels):
    """As above for the single-block kernels: one stage, then fewer query rows a step."""
    monkeypatch.setattr(single_block, '_FITTED', {})
    launched = []
    for name in ('_single_block_fwd_kernel', '_single_block_bwd_kernel'):
        monkeypatch.setattr(single_block, name, SmallDevice(
            getattr(single_block, name),
            lambda meta: meta['num_stages'] > 1 or meta['QUERY_ROWS'] > 16,
            lambda meta: launched.append((meta['QUERY_ROWS'], meta['num_stages']))))
    q, k, v, index, mask = make_inputs(2, 2, 1, 36, 1, 36, 1, 16, masked_fraction=0.2)
    with pytest.warns(UserWarning, match='does not fit'):
        compare_to_fp64(q, k, v, index, mask, 36, 36)
    assert launched and set(launched) == {(16, 1)}
    assert len(single_block._FITTED) == 2
    launched.clear()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # remembered: no second warning, no failed launch
        compare_to_fp64(q, k, v, index, mask, 36, 36)
    assert set(launched) == {(16, 1)}


def test_register_capped_configs_that_ptxas_cannot_compile_run_uncapped(monkeypatch, tile_rows):
    """A table row whose register cap ptxas refuses (``PTXASError``, e.g. for a kernel variant
    the sweep did not compile) is launched without the cap, once, with a warning."""
    from ops._launch import PTXASError
    monkeypatch.setattr(kernels, '_FITTED', {})
    tile_rows({kind: {32: [(None, (16, 32, 2, 1, 80))]} for kind in ('fwd', 'dq')})
    launched = []
    for name in ('_fwd_kernel', '_bwd_dq_kernel'):
        monkeypatch.setattr(kernels, name, SmallDevice(
            getattr(kernels, name), lambda meta: meta['maxnreg'] is not None,
            lambda meta: launched.append(meta['maxnreg']),
            PTXASError('Insufficient registers (80) to compile instruction')))
    q, k, v, index, _ = make_inputs(1, 2, 4, 16, 4, 16, 3, 16, empty_fraction=0.0)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with pytest.warns(UserWarning, match='does not fit'):
        out = ops.gather_attention(*leaves, index, block_q=16, block_k=16, backend='triton')
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    expected = ops.gather_attention(q, k, v, index, block_q=16, block_k=16, backend='torch')
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert all(g.isfinite().all() for g in grads)
    assert launched == [None, None]  # forward and dQ kernels, uncapped
    assert set(kernels._FITTED.values()) == {(16, 32, 2, 1, 0)}


@pytest.mark.parametrize('scale', [0.3, -0.3, 0.0], ids=['positive', 'negative', 'zero'])
def test_one_block_steps_take_unscaled_logits_only_for_positive_scales(scale, tile_rows):
    """One-block key steps fold the scale and the step's bias into one multiply-add when the
    scale is positive (the row maximum is then the scaled maximum of q k^T); negative and zero
    scales keep the scaled logits. Both match fp64, with -1 slots and key padding."""
    tile_rows({kind: {32: [(None, (16, 16, 2, 1, 0))]} for kind in ('fwd', 'dq')})
    q, k, v, index, mask = make_inputs(1, 2, 4, 32, 8, 32, 2, 16, masked_fraction=0.2)
    index[0, 1, :] = -1
    plans = [kernels._query_plan(kind, 1, 2, 128, 16, 32, 32, 2, True, None, scale > 0)[2]
             for kind in ('fwd', 'dq')]
    assert [plan['UNSCALED'] for plan in plans] == [scale > 0] * 2
    compare_to_fp64(q, k, v, index, mask, 32, 32, scale=scale)
