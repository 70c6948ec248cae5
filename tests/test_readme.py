"""The README's "CS in your own training loop" example runs as printed and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_example() -> str:
    section = README.read_text().split("## CS in your own training loop", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README lost its API example"
    return match.group(1)


def test_readme_api_example_runs_and_prunes(capsys) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3200, 1, 8, 8)
    y = (x.flatten(1) @ torch.randn(64, 4)).argmax(1)  # learnable: some weights matter, most do not
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
    namespace = {"model": model, "loader": loader, "epochs": 3}
    exec(compile(readme_api_example(), str(README), "exec"), namespace)  # the README's own code

    plain = namespace["plain"]
    remaining = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 < remaining < 0.6  # a sparse network came out (about 0.4): logits pushed up where it pays
    with torch.no_grad():
        assert (plain(x).argmax(1) == y).float().mean() > 0.8  # and it still solves the task (about 0.96)
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert not any(parametrize.is_parametrized(m) for m in linears)
    kept = sum(int((m.weight != 0).sum()) for m in linears)
    assert kept == round(remaining * sum(m.weight.numel() for m in linears))


def test_readme_selection_of_attention_and_lstm_weights_masks_them() -> None:
    import contsparse as cs

    snippet = re.search(r"`(LayerSelection\(layer_types=.*?in_proj_weight.*?\)\))`", README.read_text(), re.DOTALL)
    assert snippet, "the README lost its example of selecting attention and LSTM weights"
    selection = eval(snippet.group(1), {"LayerSelection": cs.LayerSelection, "nn": nn})  # the README's text

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2)
            self.lstm = nn.LSTM(4, 3)

    masks = cs.attach_masks(Model(), selection=selection)
    assert sorted(masks.masks) == ["attention.in_proj_weight", "attention.out_proj.weight",
                                   "lstm.weight_hh_l0", "lstm.weight_ih_l0"]
