import atexit
import os
import shutil
import tempfile

import pytest
import torch

# The kernels torch.compile builds in tests (test_kernels.py, test_rounding.py) go to a
# cache of this session: inductor's on-disk cache does not key on the CPU's vector ISA
# setting, and a kernel cached by a run with AVX-512 gave wrong bits, then crashed, in a
# later run with ATEN_CPU_CAPABILITY=avx2 (the AVX2 emulation of CI's slower machine).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lomotune-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path_factory, monkeypatch):
    """Tokenized-data cache in a fresh folder per test: tests never see each other's
    (the model cache stays shared: converting SmolLM2 takes half a minute)."""
    folder = tmp_path_factory.mktemp("data-cache")
    monkeypatch.setattr("lomotune.data.cache.cache_root", lambda: folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """The tiny models' ops take microseconds: a second thread only adds sync cost
    (measured: test_resume 70 s -> 14 s on a loaded 2-core machine). Slow tests on the
    real model keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
