"""Runner checkpoints load weights-only (torch >= 2.6) and resume; crafted pickles are refused."""
import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmengine')
import backbones  # noqa: E402,F401  (registers safe globals and the weights-only loader)
from backbones.mm.checkpoint import UnsafeCheckpointError, load_weights_only  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


class _Regression(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, targets, mode='loss'):
        out = self.linear(inputs)
        return dict(loss=((out - targets) ** 2).mean())


class _Data(torch.utils.data.Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(4, generator=g), targets=torch.randn(1, generator=g))


def _runner(work_dir, max_epochs, resume=False):
    return Runner(
        model=_Regression(), work_dir=str(work_dir), resume=resume,
        train_dataloader=dict(dataset=_Data(), batch_size=4, collate_fn=dict(type='default_collate'),
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1]),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        experiment_name=f'exp_{max_epochs}_{resume}')


def test_runner_checkpoint_loads_weights_only_and_resumes(tmp_path):
    _runner(tmp_path, max_epochs=1).train()
    ckpt_path = tmp_path / 'epoch_1.pth'
    # the file holds HistoryBuffer logs, numpy arrays and optimizer state, yet loads weights-only
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt['meta']['epoch'] == 1 and 'message_hub' in ckpt and 'optimizer' in ckpt
    resumed = _runner(tmp_path, max_epochs=2, resume=True)
    resumed.train()
    assert resumed.epoch == 2 and resumed.iter == 4  # continued from iteration 2, not restarted
    assert (tmp_path / 'epoch_2.pth').is_file()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r'refusing to load .*evil.pth.*GLOBAL posix.system'):
        load_weights_only(str(path))
    with pytest.raises(UnsafeCheckpointError):  # the path mmengine's load_checkpoint/resume takes
        from mmengine.runner.checkpoint import _load_checkpoint
        _load_checkpoint(str(path))
    assert not marker.exists()


def test_getattr_is_only_allowed_for_history_buffer_statistics(tmp_path):
    path = tmp_path / 'getattr.pth'

    class _GetattrExploit:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    torch.save({'x': _GetattrExploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match='only HistoryBuffer statistics'):
        load_weights_only(str(path))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_weights_only(str(tmp_path / 'nope.pth'))
