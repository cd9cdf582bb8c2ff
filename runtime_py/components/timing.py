"""What a generation took: prompt and generated tokens, media, prefill and decode time, and the timing line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Timing:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    media_s: float = 0.0  # preprocessing and encoders
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    stopped_by: str = ""

    def line(self, peak_rss_mb: float) -> str:
        prefill_tps = self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")
        decode_tps = (self.generated_tokens - 1) / self.decode_s if self.decode_s else float("nan")
        media = f"media encoders {self.media_s * 1e3:.1f} ms | " if self.media_s else ""
        return (f"ttft {self.time_to_first_token_s * 1e3:.1f} ms | {media}prefill {prefill_tps:.1f} tok/s "
                f"({self.prompt_tokens} tokens) | decode {decode_tps:.1f} tok/s ({self.generated_tokens} tokens) | "
                f"peak RSS {peak_rss_mb:.0f} MB | stopped by {self.stopped_by}")
