"""Options -> BackendConfig: defaults, normalisation, and errors that name key, value, accepted."""

import dataclasses

import pytest
import torch

from agpe_compile.config import BackendConfig


def test_defaults_and_normalisation():
    config = BackendConfig.from_options({"exclude": ["head", "lm_*"], "include": "blocks.*"})
    assert config.exclude == ("head", "lm_*")
    assert config.include == ("blocks.*",)
    assert config.resolved_block_size == 32
    assert BackendConfig.from_options(None) == BackendConfig()


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BackendConfig().block_size = 8


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"blocksize": 32}, r"unknown option 'blocksize' \(value 32\); accepted: one of the keys \['block_size'"),
        ({"block_size": 0}, r"option 'block_size' got 0; expected an int in \[1, 1024\]"),
        ({"block_size": 32.0}, r"option 'block_size' got 32.0"),
        ({"block_size": True}, r"option 'block_size' got True"),
        ({"saliency": "fisher"}, r"option 'saliency' got 'fisher'; expected one of \('taylor'"),
        ({"inductor": "yes"}, r"option 'inductor' got 'yes'; expected True or False"),
        ({"exclude": [""]}, r"option 'exclude' got \('',\); expected a list of non-empty fnmatch"),
        ({"include": [3]}, r"option 'include' got \(3,\)"),
    ],
)
def test_bad_options_raise_value_error_naming_key_value_and_accepted(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        BackendConfig.from_options(options)


def test_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="option 'options' got"):
        BackendConfig.from_options(["block_size", 32])


def test_backend_unknown_option_lists_the_zero_code_fields_too():
    import agpe_compile

    with pytest.raises(ValueError, match=r"unknown option 'foo'.*or, for zero-code mode, one of \[.*'target_sparsity'"):
        agpe_compile.AgpeBackend({"block_size": 8, "target_sparsity": 0.5, "foo": 1})
    with pytest.raises(ValueError) as error:  # prepare takes backend options only: no zero-code list
        agpe_compile.prepare(torch.nn.Linear(8, 8), {"target_sparsity": 0.5})
    assert "zero-code" not in str(error.value)


def test_backend_unknown_option_lists_mode_which_the_backend_accepts():
    import agpe_compile

    with pytest.raises(ValueError, match=r"unknown option 'modes'.*one of the keys \[.*'mode'"):
        agpe_compile.AgpeBackend({"modes": "max-autotune"})
    agpe_compile.AgpeBackend({"mode": "max-autotune"})  # what the message offers is accepted


def test_a_numpy_integer_block_size_is_an_option_stored_as_int():
    # re-audit CT: AGPEConfig took numpy integers, the backend options and prepare() refused them
    import numpy as np

    from agpe_compile.config import BackendConfig

    config = BackendConfig.from_options({"block_size": np.int64(8)})
    assert config.block_size == 8 and type(config.block_size) is int
    with pytest.raises(ValueError, match="block_size"):
        BackendConfig.from_options({"block_size": np.float64(8.0)})
    with pytest.raises(ValueError, match="block_size"):
        BackendConfig.from_options({"block_size": True})
