"""The litert backend: the .litertlm's TFLite sections run by ai_edge_litert's Interpreter (XNNPACK), with the KV
cache carried between calls as numpy arrays under LiteRT-LM's tensor names; and the litertlm backend: Google's own
LiteRT-LM engine on the same file."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from models.errors import InputError


def litertlm_sections(path: Path) -> dict[str, bytes]:
    """The TFLite models of a .litertlm by model type (prefill_decode, embedder, per_layer_embedder, ...)."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema
    from litert_lm_builder import litertlm_peek

    try:
        header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
    except (ValueError, OSError, IndexError) as e:
        raise InputError(f"{path}: not a readable .litertlm file ({e})") from None
    sections = header.SectionMetadata()
    out = {}
    with open(path, "rb") as f:
        for i in range(sections.ObjectsLength()):
            obj = sections.Objects(i)
            if obj.DataType() != schema.AnySectionDataType.TFLiteModel:
                continue
            f.seek(obj.BeginOffset())
            model_type = (litertlm_peek.get_model_type(obj) or "").removeprefix("tf_lite_")
            out[model_type] = f.read(obj.EndOffset() - obj.BeginOffset())
    return out


class LiteRtExecutor:
    name = "litert"

    def __init__(self, litertlm: Path, cache_len: int, prefill_lengths: tuple[int, ...], threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        sections = litertlm_sections(litertlm)
        missing = {"prefill_decode", "embedder", "per_layer_embedder"} - set(sections)
        if missing:
            raise InputError(f"{litertlm}: no {', '.join(sorted(missing))} section")
        self.decoder = Interpreter(model_content=sections["prefill_decode"], num_threads=threads)
        self.embedder = Interpreter(model_content=sections["embedder"], num_threads=threads)
        self.per_layer_embedder = Interpreter(model_content=sections["per_layer_embedder"], num_threads=threads)
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self._runners = {name: self.decoder.get_signature_runner(name) for name in self.decoder.get_signature_list()}
        self._cache_inputs = {
            name: detail for name, detail in self.decoder.get_signature_runner("decode").get_input_details().items()
            if name.startswith("kv_cache_")
        }
        self.reset()

    def _lookup(self, interpreter, ids: np.ndarray) -> np.ndarray:
        runner = interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))
        rows = [runner(token_ids=np.array([[i]], dtype=np.int32))["embeddings"] for i in ids]
        return np.concatenate(rows, axis=1)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup(self.embedder, ids)

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup(self.per_layer_embedder, ids)[0]

    def _call(self, signature: str, embeds, rows, start: int) -> dict[str, np.ndarray]:
        """One signature call; the KV cache outputs become the next call's inputs. Returns every output."""
        T = embeds.shape[1]
        out = self._runners[signature](
            embeddings=embeds.astype(np.float32),
            per_layer_embeddings=rows.astype(np.float32),
            input_pos=np.arange(start, start + T, dtype=np.int32),
            mask=np.zeros((1, 1, T, self.cache_len), np.float32),  # not read: the graph builds its masks
            **self.cache,
        )
        self.cache = {k: out[k] for k in self.cache}
        return out

    def _run(self, signature: str, embeds, rows, start: int) -> np.ndarray:
        return self._call(signature, embeds, rows, start)["logits"][0, -1]

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(f"prefill_{embeds.shape[1]}", embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run("decode", embeds, rows, pos)

    def reset(self) -> None:
        self.cache = {name: np.zeros(d["shape"], np.float32) for name, d in self._cache_inputs.items()}


class LitertLmSession:
    """Google's LiteRT-LM engine on a .litertlm. The engine tokenizes, samples and stops by itself and its Python API
    returns text, so this session offers text generation only; the prompt is rendered with our chat template and the
    engine adds BOS (the metadata's start token)."""

    def __init__(self, litertlm: Path, cache_len: int, threads: int = 2):
        import litert_lm

        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)  # the engine logs every section it skips
        self.litert_lm, self.cache_len = litert_lm, cache_len
        try:
            # The engine caches XNNPACK-packed weights beside the model unless told otherwise: never inside a bundle.
            cache_dir = Path(tempfile.gettempdir()) / "g3n-litert-lm-cache"
            cache_dir.mkdir(exist_ok=True)
            self.engine = litert_lm.Engine(str(litertlm), backend=litert_lm.Backend.CPU(thread_count=threads),
                                           activation_data_type=litert_lm.ActivationDataType.FLOAT32,
                                           cache_dir=str(cache_dir))
        except Exception as e:  # the engine raises RuntimeError subclasses for unreadable files
            raise InputError(f"{litertlm}: LiteRT-LM cannot open it ({e})") from None
        self.notice = ""
        self.timing = None

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0):
        import time

        from runtime_py.components.chat_template import render
        from runtime_py.session import Timing

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if isinstance(prompt, str) and not prompt.strip():
            raise InputError("empty prompt")
        sampler = self.litert_lm.SamplerConfig(top_k=1) if temperature == 0 else self.litert_lm.SamplerConfig(
            top_k=top_k or 40, top_p=top_p, temperature=temperature, seed=seed)
        session = self.engine.create_session(apply_prompt_template=False, sampler_config=sampler,
                                             max_output_tokens=max_new_tokens)
        text = render(messages)
        self.timing = timing = Timing(prompt_tokens=1 + len(self.engine.tokenize(text)), stopped_by="engine")
        t0 = time.perf_counter()
        session.run_prefill([text])
        timing.prefill_s = time.perf_counter() - t0
        pieces = []
        try:
            for response in session.run_decode_async():
                if not pieces:
                    timing.time_to_first_token_s = time.perf_counter() - t0
                pieces.append(response.texts[0])
                yield response.texts[0]
        finally:
            session.close()
        timing.decode_s = time.perf_counter() - t0 - timing.time_to_first_token_s
        # The engine reports text only (its benchmark counters need a benchmark-enabled engine): count by re-encoding.
        timing.generated_tokens = len(self.engine.tokenize("".join(pieces))) if pieces else 0
