"""The diffusers internals the engine reads are checked when a model is built: a release
that renamed or reshaped one fails at start-up with the versions that were tested."""
from __future__ import annotations

import pytest
import torch

from memflow.config import PRESETS
from memflow.internals import UnsupportedDiffusers, check_transformer, check_vae
from memflow.transformer import build_transformer
from memflow.vae import WanVAE


def test_the_installed_diffusers_has_what_the_engine_reads():
    check_transformer(build_transformer(PRESETS["tiny"].transformer))
    check_vae(WanVAE.from_config(PRESETS["tiny"].vae).model)


def test_a_renamed_or_reshaped_internal_fails_naming_it_and_the_tested_versions():
    model = build_transformer(PRESETS["tiny"].transformer)
    del model.norm_out
    with pytest.raises(UnsupportedDiffusers, match=r"no norm_out; .* tested with diffusers [0-9.]+ to [0-9.]+"):
        check_transformer(model)
    model = build_transformer(PRESETS["tiny"].transformer)
    model.blocks[0].scale_shift_table = torch.nn.Parameter(torch.zeros(6, model.blocks[0].scale_shift_table.shape[-1]))
    with pytest.raises(UnsupportedDiffusers, match=r"blocks.0.scale_shift_table is \(6, 48\), not \(1, 6, 48\)"):
        check_transformer(model)
