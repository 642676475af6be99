"""What every training test shares: one thread, and a few short plays as the training text."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Three short plays (20k characters each): enough rows for a few dozen steps, fast to pack."""
    from clex.sources.corpus import split_plays

    folder = tmp_path_factory.mktemp("texts")
    for name, text in list(split_plays()[0].items())[:3]:
        (folder / f"{name}.txt").write_text(text[:20_000])
    return folder
