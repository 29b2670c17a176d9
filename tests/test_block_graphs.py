"""BiFormer(graph_blocks=True): fused blocks replayed from CUDA graphs give the eager fused
path's results, keep outputs apart, and run eagerly wherever a replay would be wrong."""
import copy
import io
import pickle

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones import _fused_block
from backbones.biformer import BiFormer, BiFormerBlock


def _model(drop_path_rate=0.0, **kwargs):
    torch.manual_seed(0)
    return BiFormer(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), num_classes=10,
                    drop_path_rate=drop_path_rate, **kwargs)


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, BiFormerBlock)]


def test_switch_and_copies():
    model = _model(graph_blocks=True)
    assert all(b.graphs is not None for b in _blocks(model))
    clone = copy.deepcopy(model)
    assert all(b.graphs is not None and b.graphs is not a.graphs
               and b.graphs.captures == {True: None, False: None}
               for a, b in zip(_blocks(model), _blocks(clone)))
    buffer = io.BytesIO()
    torch.save(model, buffer)  # whole-model pickles hold no graphs
    assert pickle.loads(pickle.dumps(model.stages[0].blocks[0].graphs)).captures[True] is None
    assert set(model.state_dict()) == set(_model().state_dict())
    model.set_graph_blocks(False)
    assert all(b.graphs is None for b in _blocks(model))
    with pytest.raises(ValueError, match='graph_blocks needs fused_block=True'):
        _model(graph_blocks=True, fused_block=False)
    with pytest.raises(ValueError, match="attn_impl='fused'"):
        timm.create_model('biformer_tiny', graph_blocks=True, attn_impl='gather')


def test_mm_backbone_and_classifier_switch():
    pytest.importorskip('mmengine')
    from backbones.mm.biformer import BiFormer as MMBiFormer
    from backbones.mm.classifier import TimmClassifier
    for model in (MMBiFormer(arch='tiny', graph_blocks=True),
                  TimmClassifier('biformer_tiny', graph_blocks=True)):
        assert all(b.graphs is not None for b in _blocks(model)) and _blocks(model)
    assert all(b.graphs is None for b in _blocks(MMBiFormer(arch='tiny')))


def test_cpu_calls_run_eagerly(monkeypatch):
    """On the CPU (the fused block through the Triton interpreter) nothing is captured."""
    monkeypatch.setattr(BiFormerBlock, 'FUSED_BLOCK_DEVICES', ('cuda', 'cpu'))
    x = torch.randn(1, 3, 32, 32)
    expected = _model().eval()(x)
    model = _model(graph_blocks=True).eval()
    for _ in range(2):
        assert torch.equal(model(x), expected)
    assert all(b.graphs.captures == {True: None, False: None} for b in _blocks(model))


def test_capture_policy(monkeypatch):
    """Which calls capture, replay or run eagerly (None), on stand-ins for the CUDA captures:
    a key's second consecutive call captures it, and after MAX_CAPTURES captures new keys
    run eagerly, with one warning."""
    from backbones import _block_graphs
    made = []

    class FakeCapture:
        def __init__(self, key, plan, drops, x, params):
            self.key = key
            made.append(x.shape)

        def may_replay_forward(self):
            return True

        def replay_forward(self, x):
            return ('replayed', x.shape)

    monkeypatch.setattr(_block_graphs, '_Capture', FakeCapture)
    monkeypatch.setattr(_block_graphs.BlockGraphs, 'applies', staticmethod(lambda x: True))
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: type(
        'Stream', (), {'cuda_stream': 0})())
    graphs = _block_graphs.BlockGraphs()
    plan = _fused_block.BlockPlan(False, 7, 4, 2, 0.1, False, False, 1e-6, 1e-6,
                                  torch.float32)
    params = (torch.zeros(3),)

    def call(size):
        return graphs(plan, None, torch.zeros(size), params)

    assert call(1) is None                      # first sighting: eager
    assert call(1) == ('replayed', (1,))        # captured, then replayed
    assert call(1) == ('replayed', (1,)) and len(made) == 1
    assert call(2) is None and call(1) == ('replayed', (1,))  # one-off key: eager
    for size in (2, 3, 4):
        assert call(size) is None and call(size) == ('replayed', (size,))
    assert len(made) == graphs.MAX_CAPTURES == 4
    assert call(5) is None
    with pytest.warns(UserWarning, match='4 captures of a block'):
        assert call(5) is None
    assert call(4) == ('replayed', (4,)) and len(made) == 4


# ----------------------------------------------------------------------------------- CUDA


@pytest.fixture
def same_kernels(monkeypatch):
    """Eager fused calls choose the MLP kernel as captured ones do, so both paths run the same
    kernels and agree to the last bit but for cuBLAS's choices."""
    monkeypatch.setattr(_fused_block, 'MLP_KERNEL_MAX_CHANNELS', {'eager': 128, 'captured': 128})


def _pair(**kwargs):
    eager = _model(**kwargs).cuda().train()
    graphed = copy.deepcopy(eager)
    graphed.set_graph_blocks(True)
    return eager, graphed


def _step(model, x):
    with torch.autocast('cuda', dtype=torch.bfloat16):
        logits = model(x)
    loss = logits.float().square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return logits, grads


def _close(got, expected, rtol=1e-3):
    return (got.float() - expected.float()).norm() <= rtol * expected.float().norm() + 1e-6


def _replays(model, training=True):
    """Forward replays so far of every block's capture (None where there is none)."""
    return [None if b.graphs.captures[training] is None else
            b.graphs.captures[training].generation for b in _blocks(model)]


@pytest.mark.gpu
def test_training_steps_match_eager(same_kernels):
    """Six SGD steps: the first eager, the second captures, the rest replay. Logits and every
    gradient match the eager fused path at each step, and weight updates reach the graphs."""
    eager, graphed = _pair()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, graphed)]
    x = torch.randn(4, 3, 224, 224, device='cuda')
    for step in range(6):
        results = []
        for model, optimizer in zip((eager, graphed), optimizers):
            logits, grads = _step(model, x)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            optimizer.step()
            results.append((logits, grads))
        (logits, grads), (g_logits, g_grads) = results
        assert _close(g_logits, logits), step
        assert all(_close(g, e) for g, e in zip(g_grads, grads)), step
    # the forward replays of blocks captured before a block count as its generation bumps
    assert all(r is not None and r >= 4 for r in _replays(graphed))


@pytest.mark.gpu
def test_gradients_accumulate_into_grad(same_kernels):
    """loss.backward() twice without zeroing, after the capture: .grad holds both steps'
    sum and is none of the captures' buffers (which the next replay overwrites)."""
    eager, graphed = _pair()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    for _ in range(2):
        _step(graphed, x)  # first sighting, then the capture
    for model in (eager, graphed):
        for _ in range(2):
            with torch.autocast('cuda', dtype=torch.bfloat16):
                model(x).float().square().mean().backward()
    buffers = {b.data_ptr() for block in _blocks(graphed)
               for b in block.graphs.captures[True].param_grads if b is not None}
    for e, g in zip(eager.parameters(), graphed.parameters()):
        assert _close(g.grad, e.grad) and g.grad.data_ptr() not in buffers


@pytest.mark.gpu
def test_inference_and_shape_changes(same_kernels):
    eager, graphed = _pair()
    eager.eval(), graphed.eval()
    small = torch.randn(2, 3, 224, 224, device='cuda')
    large = torch.randn(2, 3, 256, 320, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        kept = graphed(small)
        for x in (small, small, small, large, large, large, small, small):
            out = graphed(x)
            assert _close(out, eager(x))
        assert _close(kept, eager(small))  # outputs are not the graphs' buffers
    assert all(r is not None for r in _replays(graphed, training=False))


@pytest.mark.gpu
def test_two_forwards_before_backward(same_kernels):
    """A block called again before its backward runs eagerly; both backwards are right."""
    eager, graphed = _pair()
    x1, x2 = (torch.randn(2, 3, 224, 224, device='cuda') for _ in range(2))
    for _ in range(3):
        _step(graphed, x1)  # capture and replay
    for model in (eager, graphed):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model(x1).float().square().mean() + model(x2).float().abs().mean()
        loss.backward()
    for e, g in zip(eager.parameters(), graphed.parameters()):
        assert _close(g.grad, e.grad)


@pytest.mark.gpu
def test_backward_after_a_later_forward_raises(same_kernels):
    _, graphed = _pair()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    for _ in range(3):
        _step(graphed, x)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        first = graphed(x).float().square().mean()
    first.backward(retain_graph=True)
    _step(graphed, x)  # replays over the first forward's saved tensors
    with pytest.raises(RuntimeError, match='overwritten by a later forward'):
        first.backward()


@pytest.mark.gpu
def test_dropped_forward_releases_its_graphs(same_kernels):
    """A training forward without a backward (its graph dropped) does not keep the next
    call from replaying."""
    _, graphed = _pair()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    for _ in range(3):
        _step(graphed, x)
    before = _replays(graphed)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        graphed(x)  # dropped at once
    _step(graphed, x)
    assert all(a >= b + 2 for a, b in zip(_replays(graphed), before))


@pytest.mark.gpu
def test_drop_path_masks_are_new_each_replay():
    _, graphed = _pair(drop_path_rate=0.5)
    x = torch.randn(8, 3, 224, 224, device='cuda')
    outputs = []
    for _ in range(5):
        logits, grads = _step(graphed, x)
        assert all(torch.isfinite(g).all() for g in grads)
        outputs.append(logits)
    assert not torch.equal(outputs[3], outputs[4])
    assert all(r is not None for r in _replays(graphed))


@pytest.mark.gpu
def test_checkpointed_stages_run_eagerly(same_kernels):
    eager, graphed = _pair()
    for model in (eager, graphed):
        model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 224, 224, device='cuda')
    for _ in range(3):
        (logits, grads), (g_logits, g_grads) = _step(eager, x), _step(graphed, x)
        assert _close(g_logits, logits)
        assert all(_close(g, e) for g, e in zip(g_grads, grads))
    assert _replays(graphed) == [None] * len(_blocks(graphed))
