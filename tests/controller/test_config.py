"""AGPEConfig: every bad value raises ValueError naming field, value and what is accepted;
bad models (block size not dividing a layer, no eligible layer) are reported."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier

from .helpers import TinyMLP


@pytest.mark.parametrize(
    "field,value,accepted",
    [
        ("target_sparsity", 1.0, "a number in [0, 1)"),
        ("target_sparsity", -0.1, "a number in [0, 1)"),
        ("target_sparsity", float("nan"), "a number in [0, 1)"),
        ("target_sparsity", "0.9", "a number in [0, 1)"),
        ("policy", "lottery", "one of ('dense', 'static', 'set', 'rigl', 'gmp', 'snfs', 'agpe')"),
        ("saliency", "fisher", "one of ('taylor', 'gradient', 'magnitude', 'movement')"),
        ("distribution", "random", "one of ('erk', 'uniform')"),
        ("block_size", 0, "an int >= 1, <= 1024"),
        ("block_size", 8.0, "an int >= 1, <= 1024"),
        ("update_interval", 0, "an int >= 1"),
        ("end_step", 0, "a step after begin_step=0"),
        ("drop_fraction", 1.5, "a number in [0, 1]"),
        ("saliency_decay", 1.0, "a number in [0, 1)"),
        ("protect_grown", -1, "an int >= 0"),
        ("protect_grown", 1.5, "an int >= 0"),
        ("buckets", (0.5, 0.25), "a list or tuple of densities in (0, 1] that includes 1.0"),
        ("patience", 0, "an int >= 1"),
        ("regret_threshold", 0.0, "a number > 0"),
        ("noise_z", -1.0, "a number in [0, 10]"),
        ("noise_z", float("inf"), "a number in [0, 10]"),
        ("initial_density", 0.05, "a density >= the final density 0.1"),
        ("max_density", 0.05, "a density >= the final density 0.1"),
        ("include", ("",), "a list or tuple of non-empty fnmatch pattern strings"),
        ("rescale_init", 1, "True or False"),
        ("version", 99, "1"),
    ],
)
def test_bad_values_name_field_value_and_accepted(field, value, accepted):
    expected = f"agpe: AGPEConfig.{field} got {value!r}; expected {accepted}"
    with pytest.raises(ValueError) as info:
        AGPEConfig(**{field: value})
    assert str(info.value) == expected


def test_max_density_below_the_start_is_refused_not_ignored():
    # audit AY F2: the ladder's top is max(start, max_density), so a lower value did nothing
    with pytest.raises(ValueError, match=r"AGPEConfig.max_density got 0.5; expected a density >= the start "
                                         r"density 1.0 \(the highest density back-offs may return to"):
        AGPEConfig(target_sparsity=0.9, max_density=0.5)
    assert AGPEConfig(target_sparsity=0.9, initial_density=0.25, max_density=0.5).max_density == 0.5
    assert AGPEConfig(policy="gmp", target_sparsity=0.9, max_density=0.5).max_density == 0.5  # ignored there
    # ... and does not raise the layer cap's minimum there either (re-audit BB F5)
    assert AGPEConfig(policy="rigl", target_sparsity=0.9, max_density=0.9, max_layer_density=0.5).max_density == 0.9


def test_end_before_begin_names_both():
    with pytest.raises(ValueError, match=r"AGPEConfig.end_step got 50; expected a step after begin_step=100"):
        AGPEConfig(begin_step=100, end_step=50)


def test_frozen_and_round_trip_through_json_types():
    config = AGPEConfig(policy="rigl", block_size=8, exclude=("head",), buckets=(1.0, 0.5, 0.1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policy = "set"
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    assert AGPEConfig.from_dict(as_json) == config


def test_policy_defaults_for_start_density():
    assert AGPEConfig(policy="agpe").start_density == 1.0
    assert AGPEConfig(policy="gmp").start_density == 1.0
    assert AGPEConfig(policy="rigl", target_sparsity=0.75).start_density == 0.25
    assert AGPEConfig(policy="dense", target_sparsity=0.9).final_density == 1.0


def test_block_size_not_dividing_a_layer_names_layer_and_shape():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"AGPEConfig.block_size got 8; expected a common divisor of the "
                                         r"dimensions of every included layer; '2' is 10x32 \(keep it dense with "
                                         r"exclude=\['2'\]\)"):
        Sparsifier(model, opt, AGPEConfig(block_size=8))
    assert agpe_compile.layer_states(model) == {} and not list(model.buffers())  # refused before preparing
    Sparsifier(model, opt, AGPEConfig(block_size=8, exclude=("2",)))  # excluding it is the way out


def test_every_layer_the_block_size_does_not_divide_is_named_in_one_error():
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'0' is 256x784, '4' is 10x256 \(keep them dense with exclude=\['0', '4'\]; "
                                         r"or block_size=16 with exclude=\['4'\], which keeps 2 of 3 included layers "
                                         r"prunable\)"):
        Sparsifier(model, opt, AGPEConfig())  # one at a time before: fix one, meet the next
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48))
    with pytest.raises(ValueError, match=r"exclude=\['0', '2'\], which leaves no layer to prune, or block_size=16, "
                                         r"which divides every included"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig())


def test_the_hint_keeps_a_layer_prunable_where_excluding_every_misfit_would_not():
    # audit CS: the README's typical case (a 784-input layer and a 10-class head) at the default
    # block 32 was told exclude=['1', '3'], which leaves nothing to prune; block 16 keeps '1'
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"exclude=\['1', '3'\], which leaves no layer to prune; or block_size=16 "
                                         r"with exclude=\['3'\], which keeps 1 of 2 included layers prunable\)"):
        Sparsifier(model, opt, AGPEConfig(target_sparsity=0.9))
    sparsifier = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.9, block_size=16, exclude=("3",)))
    assert list(sparsifier.layers) == ["1"]  # the hint works as given


def test_no_eligible_layer_warns_once_and_trains_dense():
    model = nn.Sequential(nn.Conv1d(1, 1, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no eligible linear layer; the model trains dense"):
        sparsifier = Sparsifier(model, opt, AGPEConfig(update_interval=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sparsifier.step(torch.tensor(1.0))
    assert sparsifier.global_density == 1.0 and sparsifier.densities() == {}
    assert sparsifier.flops.ratio == 1.0


def test_config_type_checked():
    with pytest.raises(TypeError, match="expected an AGPEConfig, got dict"):
        Sparsifier(TinyMLP(), None, {"target_sparsity": 0.9})


def test_patterns_and_buckets_accept_lists_as_the_backend_options_do():
    config = AGPEConfig(include="fc*", exclude=["head"], buckets=[1.0, 0.5])
    assert (config.include, config.exclude, config.buckets) == (("fc*",), ("head",), (1.0, 0.5))
    assert config == AGPEConfig(include=("fc*",), exclude=("head",), buckets=(1.0, 0.5))


def test_the_suggested_exclude_list_keeps_the_users_excludes_and_the_block_size_counts_attention():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    with pytest.raises(ValueError, match=r"exclude=\['4', '0', '2'\], which leaves no layer to prune, or block_size=16"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig(exclude=("4",)))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(48, 4, kdim=40, vdim=40)
            self.fc = nn.Linear(48, 48)

    model = Attn()
    with pytest.raises(ValueError, match=r"or block_size=8, which divides"):  # 40 rules out 16
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig())


def test_the_hint_on_a_model_prepared_before_counts_its_layers_and_offers_no_other_block_size():
    # re-audit CT: the prepared layers were not counted ("leaves no layer to prune") and a
    # block size they cannot take was offered
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    assert sorted(agpe_compile.prepare(model)) == ["2"]  # 32 divides only the middle layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as raised:
        Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5))
    message = str(raised.value)
    assert "exclude=['0', '4']; 1 included layer(s) were prepared before" in message
    assert "leaves no layer" not in message and "block_size=16" not in message
    assert sorted(Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, exclude=("0", "4"))).layers) == ["2"]


def test_the_hint_counts_attention_projections_only_where_the_block_size_fits_them():
    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp = nn.Linear(64, width)
            self.attn = nn.MultiheadAttention(width, 2)

    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    model = Block(36)  # no block size fits 36: excluding both linear layers leaves nothing
    with pytest.raises(ValueError, match=r"exclude=\['inp', 'attn.out_proj'\], which leaves no layer to prune\)"):
        Sparsifier(model, opt(model), AGPEConfig())
    model = Block(48)  # 16 fits all: the projections are counted among the weights
    with pytest.raises(ValueError, match=r"or block_size=16, which divides every included layer"):
        Sparsifier(model, opt(model), AGPEConfig())


def test_a_prepared_layer_the_config_excludes_is_not_counted_as_prunable():
    # re-audit CU: the prepared layer was counted before the config's exclude was read
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    assert sorted(agpe_compile.prepare(model)) == ["2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"exclude=\['2', '0', '4'\], which leaves no layer to prune; or block_size=16 "
                                         r"with exclude=\['2', '4'\], which keeps 1 of 2 included layers prunable\)"):
        Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, exclude=("2",)))
    assert sorted(Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, block_size=16, exclude=("2", "4"))).layers) == ["0"]
