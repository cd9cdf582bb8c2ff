"""The comparer (runtime_py.compare, runtime_py.compare.debug_export, `g3n compare`) held to known answers.

- Metrics against torch's own cosine similarity and KL divergence, and the teacher-forced greedy count against a real
  free-running generation.
- A backend with a known injected error: the LiteRT (and, marked heavy, the ExecuTorch) debug export of a model whose
  layer K weights were perturbed is flagged against the unperturbed float model, and layer K is named as the first
  divergent stage.
- `g3n compare` on a float Android bundle: the report files (JSON keys, the Markdown table, a valid PNG), exit 0 within
  the limits, exit 1 naming the cell past a limit, one error line for a bad thresholds file; the encoders "not in
  bundle" there.
- The encoders: their metrics against torch's, limits held at every image size, and on the session's multimodal
  bundles (multimodal_bundles) each backend's encoder rows against the float PyTorch encoders, an encoder limit
  failing the report.

The model is the tiny preset cut to 4 layers (sliding, global, then one KV-shared layer of each type), every parameter
random; conversions (one debug export, one bundle: about 2 minutes on 2 cores) dominate the run time.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from exporters.spec import ExportSpec
from models.config import TINY_4_LAYERS
from models.errors import InputError
from models.random_init import randomise_
from models.text import TextDecoder
from runtime_py import compare
from runtime_py.cli import main
from runtime_py.compare.debug_export import export_debug, open_debug

SMALL = TINY_4_LAYERS
CACHE_LEN, PREFILL_LEN, STEPS = 48, 8, 6
PERTURBED_LAYER = 1
PROMPT_IDS = [2] + list(range(10, 30))  # 21 tokens: prefill_8 twice, then the last 8 (overlapping), then decode


@pytest.fixture(scope="module")
def model():
    m = TextDecoder(SMALL)
    randomise_(m, 11)
    return m.eval()


def perturbed(model: TextDecoder, layer: int) -> TextDecoder:
    """A copy with noise of 20% of the weights' mean magnitude added to one layer's FFN up projection: enough to move
    the logits by ~0.4 and change a greedy token within 13. (Scaling a weight would not do: most of a Gemma 3n block's
    outputs pass through an RMSNorm, which undoes any scale.)"""
    bad = copy.deepcopy(model)
    weight = bad.layers[layer].mlp.up_proj.weight
    with torch.no_grad():
        weight.add_(0.2 * weight.abs().mean() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    return bad


# --- metrics --------------------------------------------------------------------------------------------------------


def test_metrics_equal_torch_cosine_and_kl():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 384, generator=gen) * 3
    got = ref + 0.3 * torch.randn(5, 384, generator=gen)
    got[2] = -ref[2]  # one position entirely wrong: its argmax cannot agree
    m = compare.position_metrics(ref.numpy(), got.numpy())
    np.testing.assert_allclose(m["cosine"], F.cosine_similarity(ref.double(), got.double(), dim=-1).numpy(), rtol=1e-12)
    kl = F.kl_div(F.log_softmax(got.double(), -1), F.log_softmax(ref.double(), -1), log_target=True,
                  reduction="none").sum(-1)
    np.testing.assert_allclose(m["kl"], kl.numpy(), rtol=1e-9)
    np.testing.assert_allclose(m["max_abs"], (got - ref).abs().amax(-1).numpy(), rtol=1e-6)
    assert m["top1"][2] == 0 and m["cosine"][2] == pytest.approx(-1)
    same = compare.position_metrics(ref.numpy(), ref.numpy())
    assert same["max_abs"].max() == 0 and same["kl"].max() == 0 and same["top1"].min() == 1


def test_teacher_forced_greedy_count_is_the_free_running_agreement(model):
    """The comparer counts leading positions whose argmax agrees under teacher forcing; that must be exactly how many
    tokens a free-running greedy generation on the backend shares with the float model's."""
    from runtime_py.executors.torch_executor import TorchExecutor

    bad = perturbed(model, PERTURBED_LAYER)
    reference = compare.FloatReference(model)
    ref_trace, ref_tokens = reference.trace(PROMPT_IDS, 12, CACHE_LEN, (PREFILL_LEN,))
    lookups = compare.FloatReference(bad).lookups
    forced, _ = compare.run_trace(TorchExecutor(bad, CACHE_LEN, (PREFILL_LEN,)), lookups.per_layer_rows, PROMPT_IDS,
                                  12, ref_tokens[:-1])
    _, free_tokens = compare.run_trace(TorchExecutor(bad, CACHE_LEN, (PREFILL_LEN,)), lookups.per_layer_rows,
                                       PROMPT_IDS, 12)
    counted = compare.decoder_metrics(ref_trace.logits, forced.logits)["decoder.decode"]["greedy_count"]
    assert counted == f"{compare.leading_agreement(ref_tokens, free_tokens)}/13"
    assert 0 < compare.leading_agreement(ref_tokens, free_tokens) < 13  # the perturbation shows, but not at once


def test_a_bf16_models_reference_is_its_float32_copys_and_leaves_it_bf16(model):
    """A real-size checkpoint is bf16: the reference computes what its float32 copy computes, bit for bit (layer
    outputs and logits), a part at a time (models.float32), and the caller's model stays bf16 (model.float() cast
    E2B whole: 22 GB)."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    expected = compare.FloatReference(copy.deepcopy(bf16).float()).trace(PROMPT_IDS, STEPS, CACHE_LEN, (PREFILL_LEN,))
    got = compare.FloatReference(bf16).trace(PROMPT_IDS, STEPS, CACHE_LEN, (PREFILL_LEN,))
    assert got[1] == expected[1]
    np.testing.assert_array_equal(got[0].logits, expected[0].logits)
    for got_call, expected_call in zip(got[0].calls, expected[0].calls, strict=True):
        np.testing.assert_array_equal(np.stack(got_call), np.stack(expected_call))
    assert {t.dtype for t in bf16.parameters()} == {torch.bfloat16}


def test_real_size_bundles_are_held_to_the_limits_measured_at_real_size():
    """Bundles of a model of a billion parameters or more take ci/thresholds-real.json (measured on the E2B-shaped
    bundles), smaller ones ci/thresholds.json; both in one comparison is one clear error."""
    def manifest(total):
        return {"model": {"parameters": {"total": total}}}

    assert compare.default_thresholds([manifest(5_418_464_192)]) == compare.REAL_SCALE_THRESHOLDS
    assert compare.default_thresholds([manifest(3_000_000), manifest(999_999_999)]) == compare.DEFAULT_THRESHOLDS
    with pytest.raises(InputError, match="real-size and small models take different limits"):
        compare.default_thresholds([manifest(5_418_464_192), manifest(3_000_000)])
    real = compare.load_thresholds(compare.REAL_SCALE_THRESHOLDS)["cells"]
    assert set(real) == {"litert/int4", "litertlm/int4", "executorch/int4", "coreml-mil/int4"}
    # measured at real size: the int4 decoders' logits far from the float model's, the int8 encoders close to it
    measured = real["coreml-mil/int4"]["measured"]
    assert measured["decoder.decode"]["cosine"] < 0.5 < measured["vision_encoder"]["cosine"]


# --- thresholds -------------------------------------------------------------------------------------------------------


def _write(tmp_path, obj, name="thresholds.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ({"cells": {}}, "non-empty object \"cells\""),
    ({"cells": {"litert": {}}}, "cells.litert"),
    ({"cells": {"litert/none": {"decoder.encode": {}}}}, "cells.litert/none.decoder.encode: unknown component"),
    ({"cells": {"litert/none": {"decoder.decode": {"max_err": 1}}}}, "decoder.decode.max_err: unknown metric"),
    ({"cells": {"litert/none": {"decoder.decode": {"max_abs": "1"}}}}, "max_abs: expected a finite number"),
])
def test_bad_thresholds_files_name_the_key(tmp_path, content, fragment):
    path = _write(tmp_path, content)
    with pytest.raises(InputError, match=fragment.replace(".", r"\.")) as e:
        compare.load_thresholds(path)
    assert str(path) in str(e.value)


def test_limits_bound_errors_from_above_and_agreements_from_below():
    metrics = {"decoder.decode": {"max_abs": 0.5, "cosine": 0.99, "greedy": 0.5, "kl": 0.01}}
    limits = {"decoder.decode": {"max_abs": 0.4, "cosine": 0.999, "greedy": 0.5, "kl": 0.02}, "measured": {}}
    breaches = [str(b) for b in compare.check_cell("litert/int8", metrics, limits)]
    assert breaches == ["litert/int8 decoder.decode max_abs = 0.5 > limit 0.4",
                        "litert/int8 decoder.decode cosine = 0.99 < limit 0.999"]


def test_derived_limits_hold_the_measurement_they_came_from():
    row = {"cell": "litert/int4", "status": "pass", "localisation": None, "metrics": {
        "decoder.prefill": {"max_abs": 0.61, "mean_abs": 0.1, "cosine": 0.9876, "kl": 0.0123, "top1": 1.0},
        "decoder.decode": {"max_abs": 1.3, "mean_abs": 0.2, "cosine": 0.97, "kl": 0.05, "top1": 0.75, "greedy": 0.2353,
                           "greedy_count": "4/17"}}}
    limits = compare.thresholds_from_report({"inputs": {"decode_steps": 16}, "rows": [row]}, "c")["cells"]["litert/int4"]
    assert compare.check_cell("litert/int4", row["metrics"], limits) == []
    assert limits["decoder.decode"]["max_abs"] == 2.6 and limits["decoder.decode"]["cosine"] == pytest.approx(0.94)
    assert limits["decoder.decode"]["top1"] == 0.5  # lost 4 of 16 positions; may lose 8
    assert compare.check_cell("litert/int4", {"decoder.decode": {"max_abs": 2.7}}, limits) != []


def test_embedding_metrics_equal_torchs():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(1, 188, 64, generator=gen)
    got = ref + 0.05 * torch.randn(1, 188, 64, generator=gen)
    m = compare.embedding_metrics(ref.numpy(), got.numpy())
    assert m["cosine"] == pytest.approx(F.cosine_similarity(ref.double().flatten(), got.double().flatten(), 0).item(),
                                        abs=1e-12)
    assert m["max_abs"] == pytest.approx((got - ref).abs().max().item(), rel=1e-6)
    assert m["mean_abs"] == pytest.approx((got - ref).abs().mean().item(), rel=1e-5)


def test_encoder_limits_hold_at_every_image_size_and_name_it():
    entries = [{"component": "vision_encoder", "input": f"{s} px", "size": s,
                "metrics": {"max_abs": 0.01, "mean_abs": 1e-3, "cosine": c}} for s, c in ((256, 0.999), (768, 0.98))]
    entries.append({"component": "audio_encoder", "input": "30 s window", "size": None,
                    "metrics": {"max_abs": 0.5, "mean_abs": 1e-3, "cosine": 0.999}})
    limits = {"vision_encoder": {"cosine": 0.99, "max_abs": 0.1}, "audio_encoder": {"max_abs": 0.1}}
    breaches = [str(b) for b in compare.check_encoders("executorch/int8", entries, limits)]
    assert breaches == ["executorch/int8 vision_encoder (768 px) cosine = 0.98 < limit 0.99",
                        "executorch/int8 audio_encoder (30 s window) max_abs = 0.5 > limit 0.1"]
    assert entries[0]["breaches"] == [] and entries[1]["breaches"] == breaches[:1]
    # Derived limits come from the worst size; a quantized cell's encoder cosine limit stays at 0.99 or above.
    row = {"cell": "executorch/int8", "quant": "int8", "status": "pass", "metrics": {}, "localisation": None,
           "encoders": entries[:2]}
    derived = compare.thresholds_from_report({"inputs": None, "rows": [row]}, "c")["cells"]["executorch/int8"]
    assert derived["vision_encoder"] == {"max_abs": 0.02, "mean_abs": 0.002, "cosine": 0.99}
    assert derived["measured"]["vision_encoder"]["cosine"] == 0.98
    assert compare.check_encoders("executorch/int8", entries[:1], derived) == []


# --- a backend with a known injected error ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["litert", pytest.param("executorch", marks=pytest.mark.heavy)])
def perturbed_backend(request, model, tmp_path_factory):
    """The debug export (float, fp32 PLE) of the model with layer PERTURBED_LAYER perturbed, on LiteRT (about 40 s
    of conversion) or ExecuTorch (XNNPACK lowering: minutes, so marked heavy)."""
    bad = perturbed(model, PERTURBED_LAYER)
    spec = ExportSpec(request.param, cache_len=CACHE_LEN, prefill_lengths=(PREFILL_LEN,), ple_storage="fp32")
    path = export_debug(bad, spec, tmp_path_factory.mktemp("debug"))
    return open_debug(path, bad, spec)


def test_perturbed_layer_is_flagged_and_named(model, perturbed_backend):
    reference = compare.FloatReference(model)
    ref_trace, ref_tokens = reference.trace(PROMPT_IDS, STEPS, CACHE_LEN, (PREFILL_LEN,))
    trace, _ = compare.run_trace(perturbed_backend, perturbed_backend.per_layer_rows, PROMPT_IDS, STEPS,
                                 ref_tokens[:-1])
    metrics = compare.decoder_metrics(ref_trace.logits, trace.logits)
    # Float limits: what an unperturbed float export meets (~1e-6 logit error, see test_export_litert and
    # test_export_executorch).
    limits = {"decoder.prefill": {"max_abs": 1e-4}, "decoder.decode": {"max_abs": 1e-4, "cosine": 0.99999},
              "stages": {"*": 1e-3}}
    breaches = compare.check_cell("backend/none", metrics, limits)
    assert [(b.component, b.metric) for b in breaches][:2] == [("decoder.prefill", "max_abs"),
                                                                 ("decoder.decode", "max_abs")]

    result = compare.localise(reference, perturbed_backend, PROMPT_IDS, STEPS, ref_tokens[:-1], limits)
    errors = {s["stage"]: s["relative_error"] for s in result["stages"]}
    assert result["first_divergent"]["stage"] == f"layer_{PERTURBED_LAYER}"
    # Below the perturbed layer the export is the float model (XNNPACK rounding only); from it on, the injected error.
    assert all(errors[f"layer_{i}"] < 1e-5 for i in range(PERTURBED_LAYER))
    assert all(errors[f"layer_{i}"] > 1e-2 for i in range(PERTURBED_LAYER, SMALL.num_layers))


# --- the command -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def android_bundle(model, tmp_path_factory):
    from runtime_py.bundle import build_bundles

    out = build_bundles(model, tmp_path_factory.mktemp("bundle") / "out", ["android"], cache_len=CACHE_LEN,
                        prefill_lengths=(PREFILL_LEN,))
    return out / "android"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_files_and_a_passing_gate(android_bundle, tmp_path, capsys):
    limits = {"cells": {"litert/none": {"decoder.prefill": {"max_abs": 1.0}, "decoder.decode": {"greedy": 0.5}},
                        "litertlm/none": {"decoder.decode": {"greedy": 0.5}}}}
    code, out, err = _run(capsys, "compare", "--bundle", android_bundle, "--report", tmp_path / "r", "--steps", STEPS,
                          "--thresholds", _write(tmp_path, limits))
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {"schema", "model", "inputs", "thresholds", "components", "rows", "breaches", "passed", "seconds"} <= set(report)
    assert report["components"] == {"decoder.prefill": "compared", "decoder.decode": "compared",
                                    "vision_encoder": "not in bundle", "audio_encoder": "not in bundle"}
    assert all(row["encoders"] == [] for row in report["rows"])
    litert, litertlm = report["rows"]
    assert (litert["cell"], litertlm["cell"]) == ("litert/none", "litertlm/none")
    # A float bundle: logits within the int8 PLE storage's rounding (~1e-2), every greedy token the float model's.
    assert litert["metrics"]["decoder.decode"]["max_abs"] < 0.1
    assert litert["metrics"]["decoder.decode"]["greedy_count"] == f"{STEPS + 1}/{STEPS + 1}"
    assert litertlm["metrics"]["decoder.decode"]["greedy"] == 1.0 and "max_abs" not in litertlm["metrics"]["decoder.decode"]
    assert len(litert["per_step_max_abs"]) == STEPS + 1
    md = (tmp_path / "r" / "report.md").read_text()
    assert md in out and "| backend | quant | scheme | prefill max abs |" in md
    assert "| litertlm | none | none | - |" in md and "vision_encoder (not in bundle)" in md
    assert "| encoder |" not in md
    with Image.open(tmp_path / "r" / "plot.png") as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 100
    # Without localisation the float model is dropped before any backend runs (at real size both do not fit): the
    # rows come from what was computed before, the same numbers.
    code, _, err = _run(capsys, "compare", "--bundle", android_bundle, "--report", tmp_path / "r2", "--steps", STEPS,
                        "--thresholds", _write(tmp_path, limits), "--localise", "never")
    assert code == 0, err
    again = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert [row["metrics"] for row in again["rows"]] == [row["metrics"] for row in report["rows"]]


def test_a_breach_exits_1_naming_the_cell_and_localises(android_bundle, tmp_path, capsys):
    limits = {"cells": {"litert/none": {"decoder.decode": {"max_abs": 1e-9}}, "litertlm/none": {}}}
    code, out, err = _run(capsys, "compare", "--bundle", android_bundle, "--report", tmp_path / "r", "--steps", STEPS,
                          "--thresholds", _write(tmp_path, limits))
    assert code == 1
    assert "threshold exceeded: litert/none decoder.decode max_abs" in err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not report["passed"] and report["breaches"][0].startswith("litert/none decoder.decode max_abs")
    # The float bundle's first lossy stage is its int8 PLE storage; the decoder layers themselves stay float-exact.
    stages = report["rows"][0]["localisation"]["stages"]
    assert report["rows"][0]["localisation"]["first_divergent"]["stage"] == "per_layer_embedding"
    assert stages[0]["stage"] == "token_embedding" and stages[0]["relative_error"] < 1e-6
    assert "FAIL: decoder.decode max_abs" in out and "first divergent stage: per_layer_embedding" in out


def test_under_the_real_size_limits_a_breach_is_not_localised_unless_asked(android_bundle, tmp_path, capsys,
                                                                            monkeypatch):
    """A real-size reference and a backend do not both fit in memory, and localising needs the reference: with the
    real-size limits file, --localise defaults to never (the row says the breach, and nothing is exported)."""
    limits = _write(tmp_path, {"cells": {"litert/none": {"decoder.decode": {"max_abs": 1e-9}}, "litertlm/none": {}}})
    monkeypatch.setattr(compare, "REAL_SCALE_THRESHOLDS", limits)
    code, _, err = _run(capsys, "compare", "--bundle", android_bundle, "--report", tmp_path / "r", "--steps", 2,
                        "--thresholds", limits)
    assert code == 1 and "threshold exceeded: litert/none decoder.decode max_abs" in err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"][0]["localisation"] is None and not (tmp_path / "r" / "debug").exists()


def test_missing_cell_and_bad_flags_are_one_error_line(android_bundle, tmp_path, capsys):
    path = _write(tmp_path, {"cells": {"litert/none": {}}})
    code, _, err = _run(capsys, "compare", "--bundle", android_bundle, "--report", tmp_path / "r", "--thresholds", path)
    assert code == 2 and err.strip().splitlines() == [f"error: {path}: no limits for cell litertlm/none "
                                                      "(add \"litertlm/none\" under \"cells\")"]
    assert not (tmp_path / "r").exists()
    code, _, err = _run(capsys, "compare", "--report", tmp_path / "r", "--quant", "int3")
    assert code == 2 and "unknown value int3" in err


# --- the encoders of a multimodal bundle --------------------------------------------------------------------------


def test_encoder_rows_and_an_encoder_breach_fail_the_report(multimodal_bundles, tmp_path, capsys):
    """The session's float bundles of the default whole model (256 px): each backend's encoder rows against the float
    PyTorch encoders, and a limit that no real encoder meets (max |error| of 1e-12: 84 convolution blocks do not
    round like eager PyTorch) fails the cell, names the encoder and its input, and exits 1."""
    bundles = [multimodal_bundles / "android", multimodal_bundles / "executorch"]
    # The decoder as every float row meets it (the int8 PLE rows' ~5e-3), with a whole model's prompt embedding: the
    # tiny vocabulary's text pieces 320..383 are the media vocabularies' ids, which the .litertlm's embedder (and so
    # Google's engine) gives the embedders' rows, as Gemma3n.embed_prompt does.
    decoder = {"decoder.prefill": {"max_abs": 0.02}, "decoder.decode": {"max_abs": 0.02, "greedy": 1.0}}
    float_encoder = {"max_abs": 1e-3, "cosine": 0.9999}
    limits = {"cells": {"litert/none": {**decoder, "audio_encoder": float_encoder, "vision_encoder": {"max_abs": 1e-12}},
                        "litertlm/none": {"decoder.decode": {"greedy": 1.0}},
                        "executorch/none": {**decoder, "audio_encoder": float_encoder, "vision_encoder": float_encoder}}}
    # --localise never: the float encoders are dropped once their outputs on every golden input are computed.
    code, out, err = _run(capsys, "compare", *[a for b in bundles for a in ("--bundle", b)], "--report",
                          tmp_path / "r", "--steps", 2, "--thresholds", _write(tmp_path, limits), "--localise", "never")
    assert code == 1
    assert "threshold exceeded: litert/none vision_encoder (256 px) max_abs" in err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [b.split(" = ")[0] for b in report["breaches"]] == ["litert/none vision_encoder (256 px) max_abs"]
    assert report["components"]["vision_encoder"] == report["components"]["audio_encoder"] == "compared"
    rows = {row["cell"]: row for row in report["rows"]}
    assert rows["litertlm/none"]["encoders"] == []  # the litert rows stand for the same sections
    for cell in ("litert/none", "executorch/none"):
        entries = {e["component"]: e for e in rows[cell]["encoders"]}
        assert [e["input"] for e in rows[cell]["encoders"]][0] == "256 px" and set(entries) == {"vision_encoder",
                                                                                                 "audio_encoder"}
        # Float graphs: XNNPACK's rounding only (embeddings of unit RMS after the adapter's norm).
        for entry in entries.values():
            assert 0 < entry["metrics"]["max_abs"] < 1e-3 and entry["metrics"]["cosine"] > 0.99999, (cell, entry)
    assert rows["litert/none"]["status"] == "fail" and rows["executorch/none"]["status"] == "pass"
    assert rows["litert/none"]["localisation"] is None  # the decoder passed: nothing to localise
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| backend | quant | encoder scheme | encoder | input | max abs | mean abs | cosine | result |" in md
    assert "| executorch | none | none | audio_encoder |" in md and "| litert | none | none | vision_encoder | 256 px |" in md
    assert "FAIL: max_abs = " in md and "Not compared" not in md
