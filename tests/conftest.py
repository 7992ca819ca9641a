import pytest
import torch


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
