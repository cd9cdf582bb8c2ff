"""Writes models/assets/sample.png and sample.wav: the fixed media of `make run` and of the bundles' golden media.

Run `python models/assets/make_media.py`. Both are models.encoders' golden inputs, so they only change when
golden_image() or golden_audio() does: sample.png is golden_image() (600x400 RGB, lossless PNG) and sample.wav is
golden_audio() (2.5 s, 16 kHz mono) as 16-bit PCM, which reads back within 1/32768 of the float clip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from models.audio import SAMPLE_RATE  # noqa: E402
from models.encoders import golden_audio, golden_image  # noqa: E402

IMAGE, AUDIO = Path(__file__).with_name("sample.png"), Path(__file__).with_name("sample.wav")


def main() -> None:
    import soundfile
    from PIL import Image

    # No timestamps or text chunks: the same pixels always give the same bytes.
    Image.fromarray(golden_image()).save(IMAGE, format="PNG", optimize=True)
    pcm = np.clip(np.round(golden_audio() * 32767.0), -32768, 32767).astype(np.int16)
    soundfile.write(AUDIO, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    for path in (IMAGE, AUDIO):
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
