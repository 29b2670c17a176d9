"""Test helpers: an independent re-implementation of the official BiFormer code, with its key
names, and the renaming of our keys back to the official ones."""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.biformer import BiLevelRoutingAttention

# --- an independent re-implementation of the official code (rayleizhu/BiFormer @1697bbb:
# models/biformer.py, models/_common.py, ops/bra_legacy.py), official key names included ---

def _official_to_windows(x, n_win):  # 'n (j h) (i w) c -> n (j i) h w c'
    n, height, width, c = x.shape
    x = x.view(n, n_win, height // n_win, n_win, width // n_win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, n_win * n_win, height // n_win, width // n_win, c)


def _official_from_windows(x, n_win):  # 'n (j i) h w c -> n (j h) (i w) c'
    n, _, h, w, c = x.shape
    x = x.view(n, n_win, n_win, h, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, n_win * h, n_win * w, c)


class OfficialQKVLinear(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)


class OfficialBRA(nn.Module):
    """``BiLevelRoutingAttention`` of bra_legacy with the released configuration
    (kv_downsample_mode='identity', param_attention='qkvo', hard detached routing)."""

    def __init__(self, dim, num_heads, n_win, topk, auto_pad):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.auto_pad = auto_pad
        self.scale = dim ** -0.5
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.qkv = OfficialQKVLinear(dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x):  # NHWC
        n_win = self.n_win
        if self.auto_pad:
            _, h_in, w_in, _ = x.shape
            pad_r, pad_b = (n_win - w_in % n_win) % n_win, (n_win - h_in % n_win) % n_win
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        n, height, width, c = x.shape
        assert height % n_win == 0 and width % n_win == 0
        x = _official_to_windows(x, n_win)                         # (n, p2, h, w, c)
        q, kv = self.qkv.qkv(x).split([self.dim, 2 * self.dim], dim=-1)
        p2, h, w = n_win * n_win, height // n_win, width // n_win
        q_pix = q.reshape(n, p2, h * w, c)
        kv_pix = kv.reshape(n, p2, h * w, 2 * c)
        q_win, k_win = q.mean([2, 3]), kv[..., :c].mean([2, 3])
        lepe = self.lepe(_official_from_windows(kv[..., c:], n_win).permute(0, 3, 1, 2))
        lepe = lepe.permute(0, 2, 3, 1)
        logit = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        r_idx = torch.topk(logit, k=self.topk, dim=-1).indices
        kv_sel = torch.gather(kv_pix.view(n, 1, p2, h * w, 2 * c).expand(-1, p2, -1, -1, -1), 2,
                              r_idx.view(n, p2, self.topk, 1, 1).expand(-1, -1, -1, h * w, 2 * c))
        k_sel, v_sel = kv_sel.split([c, c], dim=-1)
        m, d = self.num_heads, c // self.num_heads
        k_sel = k_sel.reshape(n * p2, self.topk * h * w, m, d).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(n * p2, self.topk * h * w, m, d).permute(0, 2, 1, 3)
        q_pix = q_pix.reshape(n * p2, h * w, m, d).permute(0, 2, 1, 3)
        attn = ((q_pix * self.scale) @ k_sel).softmax(dim=-1)
        out = (attn @ v_sel).permute(0, 2, 1, 3).reshape(n, p2, h, w, c)
        out = self.wo(_official_from_windows(out, n_win) + lepe)
        if self.auto_pad:
            out = out[:, :h_in, :w_in].contiguous()
        return out


class OfficialAttentionLePE(nn.Module):
    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)

    def forward(self, x):  # NHWC
        n, height, width, c = x.shape
        x = x.reshape(n, height * width, c)
        qkv = self.qkv(x).reshape(n, height * width, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        lepe = self.lepe(x.transpose(1, 2).reshape(n, c, height, width)).flatten(2).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, height * width, c) + lepe
        return self.proj(out).reshape(n, height, width, c)


class OfficialBlock(nn.Module):
    def __init__(self, dim, topk, n_win, auto_pad):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = OfficialBRA(dim, dim // 32, n_win, topk, auto_pad)
        else:
            self.attn = OfficialAttentionLePE(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.Identity(), nn.GELU(),
                                 nn.Linear(3 * dim, dim))

    def forward(self, x):  # NCHW
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class OfficialBiFormer(nn.Module):
    def __init__(self, depths, embed_dims, topks=(1, 4, 16, -2), n_win=7, auto_pad=False,
                 num_classes=1000):
        super().__init__()
        dims = embed_dims
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3, dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(dims[0] // 2), nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1),
                                                        nn.BatchNorm2d(dims[i + 1])))
        self.stages = nn.ModuleList([
            nn.Sequential(*[OfficialBlock(dims[i], topks[i], n_win, auto_pad)
                            for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.head(self.norm(x).flatten(2).mean(-1))


def randomize(model):
    """Random weights and BatchNorm statistics, so that a mis-mapped tensor shows."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                if name.endswith('running_var'):
                    tensor.uniform_(0.5, 1.5)
                else:
                    tensor.normal_(0, 0.2 if tensor.dim() > 1 else 0.5)
    return model.eval()


_OUR_TO_OFFICIAL = (
    (r'^stem\.', 'downsample_layers.0.'),
    (r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.'),
    (r'\.mlp\.fc1\.', '.mlp.0.'),
    (r'\.mlp\.fc2\.', '.mlp.3.'),
    (r'^head\.fc\.', 'head.'),
)


def to_official_keys(state_dict, model):
    """Rename our keys to the official layout (routing-attention blocks use qkv.qkv / wo)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OUR_TO_OFFICIAL:
            key = re.sub(pattern, replacement, key)
        match = re.match(r'^(stages\.(\d+)\.\d+\.attn\.)(qkv|proj)\.(.*)$', key)
        if match and isinstance(model.stages[int(match.group(2))].blocks[0].attn,
                                BiLevelRoutingAttention):
            key = match.group(1) + ('qkv.qkv.' if match.group(3) == 'qkv' else 'wo.') + \
                match.group(4)
        out[key] = value
    return out
