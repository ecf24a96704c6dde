"""``model.transformer_file``: a single safetensors file in place of the folder's transformer, read through diffusers'
``from_single_file`` with the folder's config. Training and predict on the file equal the folder's; a file of
another model is refused naming its first mismatched tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qflux.config.parse import load_config
from qflux.lora.__main__ import main as lora_main
from qflux.models.flux_kontext.config import FluxKontextConfig
from recipes.flux_kontext_lora import main, train
from tests.gguf_q4k import quantize_q4_k


def _cfg(model: Path, out: Path, **more: object) -> FluxKontextConfig:
    return load_config(FluxKontextConfig, None, {
        "model.pretrained_model_name_or_path": str(model), "model.dtype": "float32", "model.max_sequence_length": 8,
        "train.max_train_steps": 2, "logging.output_dir": str(out), "logging.write_sample": False,
        "logging.report_to": "none", **more,
    })  # fmt: skip


def test_training_and_predict_on_a_single_file_equal_the_folders(tiny_flux_dir: Path, tmp_path: Path) -> None:
    weights = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "flux1-kontext-tiny.safetensors"
    save_file(weights, str(single))
    folder = train(_cfg(tiny_flux_dir, tmp_path / "folder"))
    filed = train(_cfg(tiny_flux_dir, tmp_path / "file", **{"model.transformer_file": str(single)}))
    assert folder.losses == filed.losses
    assert all(torch.equal(folder.state.lora[k], filed.state.lora[k]) for k in folder.state.lora)
    # predict through the file: the folder's image; a merged file (the LoRA baked in) is the LoRA's image
    control = tmp_path / "control.png"
    Image.new("RGB", (32, 32), (200, 40, 90)).save(control)
    lora = tmp_path / "folder" / "pytorch_lora_weights.safetensors"
    lora_main(["merge", str(lora), f"--into={tiny_flux_dir}", "--family=flux_kontext", "--dtype=float32",
               f"--out={tmp_path / 'merged.safetensors'}"])  # fmt: skip
    common = [f"--image={control}", "--prompt=invert", "--num_inference_steps=2", "--model.dtype=float32",
              f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--model.max_sequence_length=8"]  # fmt: skip
    images = {}
    for name, extra in {"folder": [], "file": [f"--model.transformer_file={single}"], "lora": [f"--lora={lora}"],
                        "merged": [f"--model.transformer_file={tmp_path / 'merged.safetensors'}"]}.items():  # fmt: skip
        main(["predict", *common, *extra, f"--out={tmp_path / name}.png"])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.array_equal(images["folder"], images["file"])
    assert np.abs(images["merged"] - images["lora"]).max() <= 1 and not np.array_equal(images["lora"], images["file"])


def test_a_file_of_another_model_is_refused_naming_its_tensor(tiny_flux_dir: Path, tmp_path: Path, capsys) -> None:
    weights = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("to_q.weight"))
    wrong = dict(weights) | {name: torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    save_file({k: v for k, v in weights.items() if k != name}, str(tmp_path / "short.safetensors"))
    gguf = tmp_path / "model.gguf"  # refused before anything loads: its contents are never read
    for file, more, message in [
        (tmp_path / "wrong.safetensors", [], f"{name} is [{weights[name].shape[0] + 1}, "),
        (
            tmp_path / "short.safetensors",
            [],
            f"lacks 1 tensor(s) the config at '{tiny_flux_dir / 'transformer'}' makes ",
        ),
        (tmp_path / "none.safetensors", [], "does not exist"),
        (gguf, ["--model.lora.kind=dora"], "set model.lora.kind: lora, or give a .safetensors transformer_file"),
        (gguf, ["--train.blocks_to_swap=1"], "set train.blocks_to_swap: 0, or give a .safetensors transformer_file"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["train", f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--train.max_train_steps=1",
                  f"--model.transformer_file={file}", f"--logging.output_dir={tmp_path / 'out'}", *more])  # fmt: skip
        assert info.value.code == 2 and message in capsys.readouterr().err


def _fp8_scaled(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8-scaled layout: each 2-D linear weight as float8_e4m3fn with one ``scale_weight`` per layer
    (w ≈ scale·w₈, scale = amax/448), every other tensor as it is."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".weight") and v.ndim == 2 and not k.startswith(("x_embedder", "proj_out")):
            scale = v.abs().max().clamp_min(1e-12) / 448
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k.removesuffix(".weight") + ".scale_weight"] = scale.float().reshape(1)
        else:
            out[k] = v
    return out


def test_an_fp8_scaled_file_trains_kept_in_fp8(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """The file's fp8 weights stay fp8 in the model (qflux's fp8 storage), and its edit is within what the
    folder with model.quantize=fp8 gives (both against the folder at full precision)."""
    from qflux.models.flux_kontext.loaders import load_flux_kontext
    from qflux.weights.quantize import Float8StorageLinear

    weights = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    fp8 = tmp_path / "flux1-kontext-tiny_fp8_scaled.safetensors"
    save_file(_fp8_scaled(weights), str(fp8))
    models = load_flux_kontext(tiny_flux_dir, torch.float32, include=("transformer",), files={"transformer": fp8})
    stored = [m for m in models.transformer.modules() if isinstance(m, Float8StorageLinear)]
    assert stored and all(m.weight.dtype == torch.float8_e4m3fn for m in stored)
    result = train(_cfg(tiny_flux_dir, tmp_path / "fp8", **{"model.transformer_file": str(fp8)}))
    assert all(np.isfinite(result.losses))
    control = tmp_path / "control.png"
    Image.new("RGB", (32, 32), (200, 40, 90)).save(control)
    common = [f"--image={control}", "--prompt=invert", "--num_inference_steps=2", "--model.dtype=float32",
              f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--model.max_sequence_length=8"]  # fmt: skip
    images = {}
    for name, extra in {"full": [], "folder_fp8": ["--model.quantize=fp8"],
                        "file_fp8": [f"--model.transformer_file={fp8}"]}.items():  # fmt: skip
        main(["predict", *common, *extra, f"--out={tmp_path / name}.png"])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float64) / 255
    folder_err = np.abs(images["folder_fp8"] - images["full"]).mean()
    file_err = np.abs(images["file_fp8"] - images["full"]).mean()
    print(f"mean |diff| from full precision: folder fp8 {folder_err:.5f}, fp8-scaled file {file_err:.5f}")
    assert file_err <= 2 * folder_err + 1 / 255


def _gguf(weights: dict[str, torch.Tensor], path: Path, qtype: str) -> Path:
    """The weights as GGUF, written with the gguf package's writer and quantizer (Q4_K, which it cannot quantize:
    tests/gguf_q4k.py): each linear weight whose rows fill the type's blocks in ``qtype``, every other tensor in
    float32."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype]
    block = 256 if qtype == "Q4_K" else 32
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for k, v in weights.items():
        a = v.float().numpy()
        if v.ndim == 2 and a.shape[1] % block == 0:
            data = quantize_q4_k(a) if qtype == "Q4_K" else quants.quantize(a, kind)
            writer.add_tensor(k, data, raw_dtype=kind)
        else:
            writer.add_tensor(k, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("qtype", "tolerance"), [("Q8_0", 1 / 255), ("Q4_0", 3 / 255), ("Q4_K", 3 / 255)])
def test_a_gguf_file_trains_kept_quantized(tiny_flux_dir: Path, tmp_path: Path, qtype: str, tolerance: float) -> None:
    """Q8_0, Q4_0 and Q4_K: the layers stay GGUF-quantized (diffusers' GGUFLinear, dequantized in forward), a LoRA
    trains on them, and the edit is within a stated mean |diff| of the folder's (measured 0.00021, 0.00595 and, with
    only the tiny model's 256-wide rows in Q4_K, less)."""
    from qflux.models.flux_kontext.loaders import load_flux_kontext

    weights = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    file = _gguf(weights, tmp_path / f"flux1-kontext-tiny-{qtype}.gguf", qtype)
    models = load_flux_kontext(tiny_flux_dir, torch.float32, include=("transformer",), files={"transformer": file})
    kinds = {type(m).__name__ for m in models.transformer.modules()}
    assert "GGUFLinear" in kinds
    result = train(_cfg(tiny_flux_dir, tmp_path / "run", **{"model.transformer_file": str(file)}))
    assert all(np.isfinite(result.losses))
    assert any(v.abs().sum() > 0 for k, v in result.state.lora.items() if ".lora_B." in k)  # B left 0: it trained
    control = tmp_path / "control.png"
    Image.new("RGB", (32, 32), (200, 40, 90)).save(control)
    common = [f"--image={control}", "--prompt=invert", "--num_inference_steps=2", "--model.dtype=float32",
              f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--model.max_sequence_length=8"]  # fmt: skip
    images = {}
    for name, extra in {"full": [], "gguf": [f"--model.transformer_file={file}"]}.items():
        main(["predict", *common, *extra, f"--out={tmp_path / name}.png"])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float64) / 255
    err = np.abs(images["gguf"] - images["full"]).mean()
    print(f"{qtype}: mean |diff| from full precision {err:.5f}")
    assert err <= tolerance


def test_plan_reports_the_files_stored_bytes(tiny_flux_dir: Path, tmp_path: Path, capsys) -> None:
    """fp8 stores the linear weights in half of bf16's bytes, Q4_0 in fewer still; an fp8 file is planned as fp8
    storage (it stays fp8), so its peak is the folder's with model.quantize=fp8."""
    import json

    source = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    weights = {k: v.to(torch.bfloat16) for k, v in source.items()}
    files = {"bf16": tmp_path / "bf16.safetensors", "fp8": tmp_path / "fp8.safetensors"}
    save_file(weights, str(files["bf16"]))
    save_file(_fp8_scaled(weights), str(files["fp8"]))
    files["q4"] = _gguf(weights, tmp_path / "q4.gguf", "Q4_0")
    files["q4k"] = _gguf(weights, tmp_path / "q4k.gguf", "Q4_K")

    def plan(*more: str) -> dict:  # type: ignore[type-arg]
        try:
            main(["plan", f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--vram=24", "--json", *more])
        except SystemExit as e:
            assert e.code in (0, None)
        return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]

    got = {k: plan(f"--model.transformer_file={f}") for k, f in files.items()}
    stored = {k: v["transformer_file"]["bytes"] for k, v in got.items()}
    scales = _fp8_scaled(weights).keys() - weights.keys()  # one float32 scale_weight per fp8 layer
    saved = sum(weights[k.replace(".scale_weight", ".weight")].numel() for k in scales)  # 2 bytes → 1 each
    assert stored["bf16"] - stored["fp8"] == saved - 4 * len(scales)
    assert stored["q4"] < stored["fp8"]
    # the file's own bytes: Q4_K's 144 per 256 weights (0.28 of bf16's 512), float32 elsewhere
    q4k = sum(
        v.numel() * 144 // 256 if v.ndim == 2 and v.shape[1] % 256 == 0 else v.numel() * 4 for v in weights.values()
    )
    assert stored["q4k"] == q4k and got["fp8"]["transformer_file"]["stored_as"].startswith("F8_E4M3")
    assert got["fp8"]["peak_gib"] == plan("--model.quantize=fp8")["peak_gib"]
    assert got["bf16"]["peak_gib"] == plan()["peak_gib"]


def test_the_tests_q4k_writer_is_ggml_layout() -> None:
    """The Q4_K bytes decode, through the gguf package's own dequantizer, to the values within Q4_0's error."""
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 0.1
    back = quants.dequantize(quantize_q4_k(x), GGMLQuantizationType.Q4_K)
    q4_0 = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    assert back.shape == x.shape and np.abs(back - x).mean() <= np.abs(q4_0 - x).mean()
