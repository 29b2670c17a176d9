"""ops.region_routing and ops.set_attention (DSVT) against direct torch computations."""
import pytest
import torch
import torch.nn.functional as F

import ops
from ops.gather_attention import to_window_major

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def test_region_routing_matches_region_mean_affinity():
    q, k = torch.randn(2, 6 * 4, 8), torch.randn(2, 5 * 3, 8)
    index = ops.region_routing(q, k, block_q=4, block_k=3, topk=3, scale=0.7)
    affinity = (q.reshape(2, 6, 4, 8).mean(2) * 0.7) @ k.reshape(2, 5, 3, 8).mean(2).transpose(1, 2)
    assert index.dtype == torch.int64 and index.shape == (2, 6, 3)
    assert torch.equal(index, affinity.topk(3, dim=-1).indices)
    picked = affinity.gather(-1, index)
    assert (picked[..., :-1] >= picked[..., 1:]).all()  # best first


def test_region_routing_default_scale_and_no_gradient():
    q = torch.randn(1, 8, 16, requires_grad=True)
    k = torch.randn(1, 8, 16, requires_grad=True)
    index = ops.region_routing(q, k, block_q=2, block_k=2, topk=4)
    assert not index.requires_grad
    assert torch.equal(index, ops.region_routing(q, k, block_q=2, block_k=2, topk=4,
                                                 scale=16 ** -0.5))


def test_region_routing_excludes_padded_keys():
    q, k = torch.randn(1, 4, 4), torch.randn(1, 3 * 2, 4)
    mask = torch.tensor([[False, True, True, True, False, False]])  # block 1 fully padded
    k_padded = k.clone()
    k_padded[0, 1] = 1e3  # a padded key must not move block 0's mean
    index = ops.region_routing(q, k_padded, block_q=2, block_k=2, topk=3, key_padding_mask=mask)
    key_means = torch.stack([k[0, 0], k[0, 2:4].mean(0), k[0, 4:6].mean(0)])
    affinity = (q.reshape(2, 2, 4).mean(1) * 0.5) @ key_means.T
    affinity[:, 1] = float('-inf')
    top2 = affinity.topk(2, dim=-1).indices
    assert torch.equal(index[0, :, :2], top2)
    assert (index[0, :, 2] == -1).all()  # only two blocks hold a real key


@pytest.mark.parametrize('masked', [False, True])
def test_region_routing_window_layout_equals_window_major(masked):
    """(h, w) windows of row-major maps route exactly as the same tokens reordered window-major
    with integer blocks."""
    q, k = torch.randn(2, 4 * 6, 8), torch.randn(2, 6 * 6, 8)
    mask = torch.rand(2, 6 * 6) < 0.4 if masked else None
    windowed = ops.region_routing(q, k, block_q=(2, 3), block_k=(3, 2), map_width=6, topk=3,
                                  key_padding_mask=mask)
    q_major, k_major = to_window_major(q, (2, 3), 6, 1), to_window_major(k, (3, 2), 6, 1)
    mask_major = None if mask is None else to_window_major(mask, (3, 2), 6, 1)
    expected = ops.region_routing(q_major, k_major, block_q=6, block_k=6, topk=3,
                                  key_padding_mask=mask_major)
    assert torch.equal(windowed, expected)


@pytest.mark.parametrize('kwargs, message', [
    (dict(topk=6), r'topk must be an int in \[0, M\]'),
    (dict(block_q=3), 'block_q=3 must divide'),
    (dict(block_k=0), 'block_k must be a positive int'),
    (dict(key_padding_mask=torch.zeros(1, 9, dtype=torch.bool)), 'key_padding_mask must be'),
    (dict(block_q=(2, 2), block_k=(2, 1), map_width=3), 'windows must tile the map'),
])
def test_region_routing_bad_arguments(kwargs, message):
    args = dict(block_q=2, block_k=2, topk=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.region_routing(torch.randn(1, 8, 4), torch.randn(1, 10, 4), **args)


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_set_attention_matches_per_set_masked_attention(backend):
    voxels, heads, dim, sets, size = 20, 2, 16, 3, 6
    q, k, v = (torch.randn(voxels, heads, dim, device=DEVICE) for _ in range(3))
    set_index = torch.randint(0, voxels, (sets, size), device=DEVICE)
    set_index[:, -2:] = set_index[:, -3:-2]  # DSVT repeats voxels to fill a set...
    padding = torch.zeros(sets, size, dtype=torch.bool, device=DEVICE)
    padding[:, -2:] = True                   # ...and masks the repeats as keys
    out = ops.set_attention(q, k, v, set_index, padding, backend=backend)
    gathered = [x[set_index].transpose(1, 2) for x in (q, k, v)]  # (sets, H, S, D)
    expected = F.scaled_dot_product_attention(*gathered, attn_mask=~padding[:, None, None, :])
    assert out.shape == (sets, size, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_set_attention_bad_arguments():
    x = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match='set_padding_mask must be a bool tensor'):
        ops.set_attention(x, x, x, torch.zeros(2, 3, dtype=torch.int64),
                          torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match='k must have the shape of q'):
        ops.set_attention(x, x[:4], x, torch.zeros(2, 3, dtype=torch.int64))
