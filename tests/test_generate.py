import torch

from nanobooth.generate import grid, render
from nanobooth.models import load_pipeline


def test_render_is_seeded_per_prompt_and_leaves_global_rng_alone(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = render(pipe, ["a sks dog", "a dog"], num_images=2, seed=3, steps=2, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = render(pipe, ["a sks dog"], num_images=2, seed=3, steps=2, batch_size=1)
    import numpy as np

    for j in range(2):
        diff = np.abs(np.asarray(a[0][j], dtype=float) - np.asarray(b[0][j], dtype=float)).max()
        assert diff <= 2  # same picture whatever the batch composition
    assert np.abs(np.asarray(a[0][0], dtype=float) - np.asarray(a[0][1], dtype=float)).max() > 0
    g = grid(a, ["a sks dog", "a dog"], title="t")
    assert g.size[0] >= 2 * 128 and g.size[1] > 2 * 128
