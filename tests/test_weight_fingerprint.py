"""The weight fingerprints of the sync check (epo_trl.trainers.weight_fingerprint), on the trainer's side.

Against real CPU vLLM engines (colocate and server), through their packed kernels, in tests/test_vllm_real.py and
tests/test_vllm_server_sync.py; here the properties those comparisons rest on, fast: the same weights give the same
sums however vLLM fuses a layer's projections, one weight one bf16 step off shows in its own group only, and a change
that the engine's precision rounds away is not staleness.
"""

from __future__ import annotations

import pytest
import torch

from epo_trl.trainers.weight_fingerprint import (
    FINGERPRINT_TOL,
    group_of,
    mismatches,
    probe_columns,
    trainer_fingerprint,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from epo_trl.models.tiny import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("fp")), hidden_size=64, head_dim=32)
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def test_groups_are_decoder_layers_or_top_level_modules():
    assert group_of("model.layers.12.self_attn.qkv_proj") == "model.layers.12"
    assert group_of("model.layers.3.mlp.gate_up_proj") == group_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert group_of("transformer.h.0.attn.c_attn") == "transformer.h.0"
    assert group_of("model.embed_tokens") == "model.embed_tokens" and group_of("lm_head") == "lm_head"
    assert probe_columns(576) == [0, 72, 144, 216, 288, 360, 432, 504, 575]
    assert probe_columns(4) == [0, 1, 2, 3]


def test_a_fused_projection_has_the_fingerprint_of_its_parts(model):
    """vLLM holds q/k/v (and gate/up) as one layer: its unit-vector outputs are the parts' columns stacked, so the
    group's sums are the same."""
    from epo_trl.trainers.weight_fingerprint import _add

    attn = model.model.layers[0].self_attn
    parts, fused = {}, {}
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _add(parts, "g", proj.weight[:, probe_columns(proj.in_features)].t())
    stacked = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    x = torch.zeros(len(probe_columns(stacked.shape[1])), stacked.shape[1])
    x[torch.arange(x.shape[0]), torch.tensor(probe_columns(stacked.shape[1]))] = 1
    _add(fused, "g", x @ stacked.t())  # what the engine's fused kernel returns for unit inputs
    assert mismatches(fused, parts)["g"] <= FINGERPRINT_TOL


def test_one_weight_one_bf16_step_off_shows_in_its_group_only(model):
    before, before32 = trainer_fingerprint(model, torch.bfloat16), trainer_fingerprint(model, None)
    groups = set(before)
    assert {"model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"} <= groups
    weight = model.model.layers[1].mlp.down_proj.weight
    column = probe_columns(weight.shape[1])[3]
    saved = weight.data.clone()
    try:
        with torch.no_grad():
            w = weight.data[5, column].to(torch.bfloat16)
            weight.data[5, column] = torch.nextafter(w, w + 1).float()  # the next bf16 value: one step off
        after = mismatches(trainer_fingerprint(model, torch.bfloat16), before)
        assert after.pop("model.layers.1") > 100 * FINGERPRINT_TOL  # ~4e-8 here
        assert max(after.values()) <= FINGERPRINT_TOL, after
        with torch.no_grad():  # a change the bf16 engine rounds away: its weights are the trainer's
            weight.data.copy_(saved)
            weight.data[5, column] += saved[5, column].abs() * 2**-12
        assert max(mismatches(trainer_fingerprint(model, torch.bfloat16), before).values()) <= FINGERPRINT_TOL
        # while a fp32 engine holds that change
        assert mismatches(trainer_fingerprint(model, None), before32)["model.layers.1"] > FINGERPRINT_TOL
    finally:
        weight.data.copy_(saved)
