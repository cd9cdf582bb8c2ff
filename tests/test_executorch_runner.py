"""The executorch bundle in ExecuTorch's stock LLM runner: `MultimodalRunner` (extension/llm/runner, the C++ runner of
ExecuTorch's Android and iOS demo apps, through the wheel's Python bindings) loads model.pte with its .ptd and
generates from it unchanged, giving the float PyTorch model's greedy text for a text prompt, an image, an audio clip
and both (backend executorch-runner: runtime_py/executorch_runner_session.py hands the runner our prompt's ids and
media). The config sweep (tests/test_config_sweep.py) runs the runner on other shapes of model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import InputError
from runtime_py.engine import open_bundle

ASSETS = Path(__file__).resolve().parents[1] / "models" / "assets"
SAMPLE_IMAGE, SAMPLE_AUDIO = ASSETS / "sample.png", ASSETS / "sample.wav"

PROMPT, STEPS = "Write a short story about a robot.", 16


def _text(session, prompt, **media) -> str:
    # The runner's tokenizer decodes the first piece with its leading space, ours drops it: the same tokens.
    return "".join(session.generate(prompt, max_new_tokens=STEPS, **media)).lstrip(" ")


def test_text_prompt_gives_the_float_models_tokens(default_bundles):
    bundle = default_bundles / "executorch"
    runner = open_bundle(bundle, "executorch-runner")
    text = _text(runner, PROMPT)
    assert text and text == _text(open_bundle(bundle, "torch"), PROMPT)
    assert runner.timing.generated_tokens == STEPS and runner.timing.prompt_tokens > 5
    # The runner's KV cache is emptied before each prompt: the same prompt gives the same text again.
    assert _text(runner, PROMPT) == text


@pytest.mark.heavy
@pytest.mark.parametrize("media", [{"images": SAMPLE_IMAGE}, {"audio": SAMPLE_AUDIO},
                                   {"images": SAMPLE_IMAGE, "audio": SAMPLE_AUDIO}], ids=["image", "audio", "both"])
def test_media_prompts_give_the_float_models_tokens(multimodal_bundles, media):
    bundle = multimodal_bundles / "executorch"
    text = _text(open_bundle(bundle, "executorch-runner"), "Describe this.", **media)
    assert text and text == _text(open_bundle(bundle, "torch"), "Describe this.", **media)


def test_refuses_what_the_runner_cannot_do(default_bundles, multimodal_bundles):
    runner = open_bundle(default_bundles / "executorch", "executorch-runner")
    with pytest.raises(InputError, match="temperature only"):
        list(runner.generate(PROMPT, top_k=5))
    with pytest.raises(InputError, match="no encoders"):
        list(runner.generate(PROMPT, images=SAMPLE_IMAGE))
    with pytest.raises(InputError, match="256 px"):
        list(open_bundle(multimodal_bundles / "executorch", "executorch-runner").generate(
            "Describe this.", images=SAMPLE_IMAGE, image_size=512))
    with pytest.raises(InputError, match="runs executorch bundles"):
        open_bundle(default_bundles / "android", "executorch-runner")
