"""The core imports with torch, timm and triton alone; missing extras are named in the error."""
import subprocess
import sys
import textwrap

import pytest

from backbones._deps import require

# Make the optional packages unimportable in a child interpreter (sys.modules[name] = None).
_BLOCK_EXTRAS = textwrap.dedent('''
    import sys
    for name in ('mmengine', 'mmcv', 'mmdet', 'pycocotools', 'spconv', 'torch_pruning',
                 'onnx', 'onnxruntime', 'onnxscript', 'tensorrt'):
        sys.modules[name] = None
''')


def _run(code):
    return subprocess.run([sys.executable, '-c', _BLOCK_EXTRAS + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_core_imports_and_runs_without_extras():
    result = _run('''
        import torch, timm, ops, backbones
        model = timm.create_model('biformer_tiny', num_classes=3)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        assert not any(m.startswith(('mmengine', 'mmdet', 'onnx')) for m in sys.modules
                       if sys.modules[m] is not None)
        print('core ok')
    ''')
    assert result.returncode == 0, result.stderr
    assert 'core ok' in result.stdout


@pytest.mark.parametrize('use_feature, extra', [
    ('import backbones.mm', 'mm'),
    ('from backbones.deploy import export_model; export_model("biformer_tiny")', 'export'),
])
def test_feature_without_its_extra_names_the_extra(use_feature, extra):
    result = _run(f'''
        try:
            {use_feature}
        except ImportError as err:
            print('ImportError:', err)
    ''')
    assert result.returncode == 0, result.stderr
    assert f"pip install 'dsa-backbones[{extra}]'" in result.stdout, result.stdout


def test_require_names_the_extra_of_a_known_module():
    with pytest.raises(ImportError, match=r"the demo needs `spconv_missing_x`.*pip install"):
        require('spconv_missing_x', 'the demo')
