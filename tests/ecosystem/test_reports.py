"""gpu_session and the pytest plugin report a leak held by a transformers ModelOutput as a leak.

A ``ModelOutput`` is an ``OrderedDict`` whose values are also attributes: a
holder search that evaluated ``x in output`` on it raised ``TypeError``, so
``gpu_session`` failed with that instead of ``VramLeakError`` and the plugin
reported the leaking test as passed plus an internal error at teardown.
"""

from __future__ import annotations

import gc
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ecosystem import _models
from vramkit import gpu_session
from vramkit.errors import VramLeakError

pytest_plugins = ["pytester"]

KEPT: list[Any] = []


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    KEPT.clear()
    gc.collect()


def test_gpu_session_names_a_model_output_holder(hf_paths: dict[str, Path]) -> None:
    model = _models.hf_loader(hf_paths["gpt2"], "gpt2")()
    model(**_models.hf_inputs("gpt2"))  # lazily made buffers are not the leak
    with (
        pytest.raises(VramLeakError) as info,
        gpu_session("cpu", tolerance=0, cleanup=False, retries=0),
        torch.enable_grad(),
    ):
        KEPT.append(model(**_models.hf_inputs("gpt2")))
    message = str(info.value)
    assert f"held by {__name__}.KEPT[0] -> CausalLMOutputWithCrossAttentions.logits" in message


_PROJECT = """
import torch
import pytest
import transformers

transformers.utils.logging.set_verbosity_error()
KEPT = []


@pytest.fixture(scope="module")
def model():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    gpt2(input_ids=torch.tensor([[1, 2]]))
    return gpt2


@pytest.mark.no_vram_leak(tolerance="0B")
def test_keeps_the_output(model):
    KEPT.append(model(input_ids=torch.tensor([[1, 2, 3]])))
"""


@pytest.mark.slow
def test_the_plugin_fails_the_test_and_names_the_output(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:hypothesispytest\nvram_device = cpu\n")
    pytester.makepyfile(test_output=textwrap.dedent(_PROJECT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*held by test_output.KEPT[[]0[]] -> CausalLMOutput*.logits*"])
