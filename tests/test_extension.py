"""fastgpt._extension: an extension built for another torch is refused at import with a fix.

The loader runs again here against stand-ins for fastgpt._C (sys.modules / importlib), so
these tests need neither a second torch nor a broken build; monkeypatch restores the
loader's state afterwards.
"""
import sys
import types

import pytest
import torch

from fastgpt import _extension


@pytest.fixture
def loader(monkeypatch):
    """_extension._load() from the state it runs in at import; its globals are restored after the test."""
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    return _extension._load


def test_an_extension_built_for_another_torch_is_refused_with_the_fix(monkeypatch, loader):
    stale = types.ModuleType("fastgpt._C")
    stale.torch_version = "1.13.1+cu117"
    monkeypatch.setitem(sys.modules, "fastgpt._C", stale)
    loader()
    assert _extension._C is None
    message = _extension.LOAD_ERROR
    assert "built against torch 1.13.1+cu117" in message
    assert f"torch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation --no-deps -e ." in message and "make build" in message


def test_a_different_cuda_tag_of_the_same_torch_release_loads(monkeypatch, loader):
    """'2.x.y+cu130' and '2.x.y+cpu' share the C++ ABI: only the release must match."""
    release = torch.__version__.split("+")[0]
    same_release = types.ModuleType("fastgpt._C")
    same_release.torch_version = release + "+some-other-build"
    monkeypatch.setitem(sys.modules, "fastgpt._C", same_release)
    loader()
    assert _extension.LOAD_ERROR is None and _extension._C is same_release


def test_undefined_symbols_are_reported_as_an_abi_mismatch(monkeypatch, loader):
    def import_module(name):
        raise ImportError("/site-packages/fastgpt/_C.so: undefined symbol: _ZN3c106detail14torchCheckFailEPKc")

    monkeypatch.setattr(_extension, "importlib", types.SimpleNamespace(import_module=import_module))
    loader()
    assert _extension._C is None
    assert f"does not match the installed torch {torch.__version__}" in _extension.LOAD_ERROR
    assert "undefined symbol" in _extension.LOAD_ERROR and "pip install --no-build-isolation" in _extension.LOAD_ERROR


def test_a_missing_build_says_how_to_build(monkeypatch, loader):
    def import_module(name):
        raise ModuleNotFoundError("No module named 'fastgpt._C'")

    monkeypatch.setattr(_extension, "importlib", types.SimpleNamespace(import_module=import_module))
    loader()
    assert _extension._C is None
    assert _extension.LOAD_ERROR.startswith("fastgpt._C is not built") and "make build" in _extension.LOAD_ERROR
