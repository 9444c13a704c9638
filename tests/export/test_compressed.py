"""`lptrain export --format compressed-tensors` (lptrain/export/compressed.py): every layer kind
of the fold stored as compressed-tensors stores it (codes, scales, zero points, the input
quantizer), the reload in `transformers` against lptrain's forward, the layers written dense,
the refusals; and a fine-tune's export loaded in a process where lptrain cannot be imported,
its loss against `lptrain eval` of the int export."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

from tests.helpers import FAST, REPO, sets, tiny_llama
from tests.trainer.test_finetune import in_process

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from lptrain import lora, qat  # noqa: E402
from lptrain.errors import ConfigError  # noqa: E402
from lptrain.export import compressed, fold  # noqa: E402
from lptrain.models.hf import HFCausalLM  # noqa: E402
from lptrain.nn.select import set_module  # noqa: E402
from lptrain.qat import QuantizedLinear  # noqa: E402

BYTE = type("Byte", (), {"name": "byte"})()  # the byte tokenizer: no files to copy
TOKENS = torch.randint(1, 257, (2, 33), generator=torch.Generator().manual_seed(1))


def _logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=TOKENS).logits


def mixed_llama(path) -> HFCausalLM:
    """The tiny Llama with one layer of each kind the fold makes, folded as `lptrain export`
    folds a run: L4Q 4-bit (offset: a float zero point), LSQ with signed 8-bit inputs, LSQ+
    with unsigned inputs and offsets, and int4 / int8 / fp8 / bf16 bases."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama(path)))
    layer0, layer1 = "model.layers.0", "model.layers.1"
    l4q = [f"{layer0}.self_attn.q_proj", f"{layer0}.self_attn.k_proj"]
    lora.apply(hf, {"type": "l4q", "r": 4, "bits": 4, "group_size": 32, "targets": l4q})
    qat.prepare(hf, {"method": "lsq", "weight_granularity": "group", "group_size": 32,
                     "act_bits": 8}, targets=[f"{layer0}.mlp.down_proj"])  # fmt: skip
    qat.prepare(hf, {"method": "lsq+", "act_bits": 8, "act_signed": False},
                targets=[f"{layer1}.self_attn.*"])  # fmt: skip
    torch.manual_seed(2)
    with torch.no_grad():  # a trained adapter and offsets: nothing at its zero init
        for name, p in hf.named_parameters():
            if name.endswith(("lora_B", "offset")):
                p.copy_(torch.randn_like(p) * 0.02)
    qat.calibrate(hf, input_ids=TOKENS)
    fold(hf)
    for name, fmt in [(f"{layer0}.self_attn.v_proj", "fp8"), (f"{layer0}.self_attn.o_proj", "int8"),
                      (f"{layer0}.mlp.gate_proj", "int4"), (f"{layer0}.mlp.up_proj", "bf16"),
                      (f"{layer1}.mlp.up_proj", "nvfp4")]:  # fmt: skip
        w = hf.get_submodule(name).weight
        set_module(hf, name, QuantizedLinear.from_weight(w, fmt, group_size=32))
    return HFCausalLM(hf.eval())


def test_every_layer_kind_is_stored_quantized_and_reloads_to_the_same_logits(tmp_path):
    from safetensors.torch import load_file

    model = mixed_llama(tmp_path / "base")
    ref = _logits(model.model)
    codes = {n: m.integer_codes() for n, m in model.model.named_modules()
             if isinstance(m, QuantizedLinear)}  # fmt: skip
    how = compressed.write(model, BYTE, tmp_path / "ct")
    got = _logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")))
    # Same weights, the same input quantization; (q - z)·s for s·q + β and other GEMMs:
    # measured max |Δ| 2.1e-7 on logits of std 0.16.
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)

    l0, l1 = "model.layers.0.", "model.layers.1."
    assert how[l0 + "self_attn.q_proj"] == "naive-quantized int4 per group 32 + float zero point"
    assert how[l0 + "mlp.down_proj"] == "pack-quantized int4 per group 32, int8 inputs per tensor"
    assert how[l1 + "self_attn.k_proj"] == (
        "naive-quantized int4 per channel + float zero point, int8 inputs per tensor"
    )
    assert how[l0 + "self_attn.v_proj"] == "float-quantized fp8 e4m3 per channel"
    assert how[l0 + "self_attn.o_proj"] == "pack-quantized int8 per channel"
    assert how[l0 + "mlp.up_proj"].startswith("dense float32: a bf16 weight")
    assert how[l1 + "mlp.up_proj"].startswith("dense float32: compressed-tensors 0.20 decompre")
    assert len(how) == 12  # layer 1's gate and down projections stay as they were

    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    gate = l0 + "mlp.gate_proj"  # 4-bit codes, 8 per int32, as lptrain rounded them
    assert state[gate + ".weight_packed"].dtype == torch.int32
    unpacked = unpack_from_int32(state[gate + ".weight_packed"], 4, torch.Size([128, 64]))
    assert torch.equal(unpacked.to(torch.int16), codes[gate])
    q = l0 + "self_attn.q_proj"  # L4Q: one int8 per code, a float zero point per group
    assert torch.equal(state[q + ".weight"].to(torch.int16), codes[q])
    assert state[q + ".weight_zero_point"].dtype == torch.float32
    assert state[l0 + "self_attn.v_proj.weight"].dtype == torch.float8_e4m3fn
    assert state[l1 + "self_attn.k_proj.input_zero_point"].dtype == torch.float32
    assert state[l0 + "mlp.up_proj.weight"].dtype == torch.float32  # dense
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_conv1d_is_written_dense_in_its_own_layout(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=257, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                  tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    conv = hf.transformer.h[0].attn.c_attn  # transformers' Conv1D: weight (in, out) = (32, 96)
    q = QuantizedLinear.from_weight(conv.weight.t(), "int4", bias=conv.bias, group_size=16)
    set_module(hf, "transformer.h.0.attn.c_attn", q)
    set_module(hf, "lm_head", QuantizedLinear.from_weight(hf.lm_head.weight, "int8"))
    ref = _logits(hf)
    how = compressed.write(HFCausalLM(hf), BYTE, tmp_path / "ct")
    assert how == {
        "transformer.h.0.attn.c_attn": "dense float32: compressed-tensors quantizes no Conv1D "
        "(GPT-2)",
        "lm_head": "pack-quantized int8 per channel",
    }
    got = _logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # GPT-2 as it is fine-tuned (every linear layer a Conv1D, the head left alone): refused.
    set_module(hf, "lm_head", torch.nn.Linear(32, 257, bias=False))
    set_module(hf, "transformer.h.0.attn.c_attn", q)
    with pytest.raises(ConfigError, match=r"quantizes no Conv1D \(GPT-2\)\); use --format hf"):
        compressed.write(HFCausalLM(hf), BYTE, tmp_path / "ct2")


def test_a_precision_recipe_is_reported_as_not_expressible(tmp_path):
    import lptrain.nn as lpnn

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama(tmp_path / "base")))
    q = QuantizedLinear.from_weight(hf.model.layers[0].mlp.up_proj.weight, "int4", group_size=32)
    q.recipe_layer = lpnn.Linear(64, 128, False, recipe="fp8-current")  # as qat.convert keeps it
    set_module(hf, "model.layers.0.mlp.up_proj", q)
    how = compressed.write(HFCausalLM(hf), BYTE, tmp_path / "ct")
    assert how == {"model.layers.0.mlp.up_proj": "pack-quantized int4 per group 32; the "
                   "precision recipe's GEMMs are not expressible (float32 GEMM)"}  # fmt: skip


def test_nothing_to_store_quantized_is_refused(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama(tmp_path / "base")))
    with pytest.raises(ConfigError, match=r"no layer was folded\); use --format hf"):
        compressed.write(HFCausalLM(hf), BYTE, tmp_path / "ct")
    lin = hf.model.layers[0].mlp.up_proj
    set_module(hf, "model.layers.0.mlp.up_proj", QuantizedLinear.from_weight(lin.weight, "bf16"))
    with pytest.raises(ConfigError, match=r"a bf16 weight is not a quantization format"):
        compressed.write(HFCausalLM(hf), BYTE, tmp_path / "ct")
    with pytest.raises(ConfigError, match=r"needs a base loaded from a Hugging Face directory"):
        compressed.write(torch.nn.Linear(2, 2), BYTE, tmp_path / "ct")


# A process that cannot import lptrain: isolated (-I), no site hook (-S, so no .pth file and no
# editable install of lptrain), only the installed packages' folder on the path.
CLEAN_LOSS = """
import sys
sys.path.append(sys.argv[1])
try:
    import lptrain
    sys.exit("lptrain is importable")
except ModuleNotFoundError:
    pass
import numpy as np, torch, torch.nn.functional as F, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], local_files_only=True)
blocks, batch, total = torch.from_numpy(np.load(sys.argv[3])), int(sys.argv[4]), 0.0
with torch.no_grad():
    for i in range(0, len(blocks), batch):
        b = blocks[i : i + batch]
        logits = model(input_ids=b[:, :-1], use_cache=False).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())) * len(b)
print(repr(total / len(blocks)))
"""


def test_a_fine_tune_loads_without_lptrain_within_the_bound(data_cache, tmp_path, capsys):
    from lptrain.export import evaluate, restore

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lptrain", "train", REPO / "recipes/finetune/l4q-4bit.yaml",
         "--run-dir", run, *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=2",
                                 "data.tokenizer=byte",
                                 f"init.from={tiny_llama(tmp_path / 'base')}")],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, out, err = in_process(capsys, "export", run, "--format", "compressed-tensors",
                                "--blocks", 8)  # fmt: skip
    assert code == 0, err
    assert "compressed-tensors: 12 layers naive-quantized int4 per channel" in out
    code, out, err = in_process(capsys, "export", run, "--blocks", 8)
    code, out, err = in_process(capsys, "eval", run / "export", "--json", "--blocks", 8)
    int_loss = json.loads(out.splitlines()[-1])["loss"]
    report = json.loads((run / "export-ct" / compressed.REPORT).read_text())
    assert report["val_loss"]["compressed-tensors"] == pytest.approx(int_loss, abs=1e-5)

    opened = restore.open_run(run)
    blocks, rows, _ = evaluate.val_blocks(opened.cfg, opened.tok)
    np.save(tmp_path / "blocks.npy", np.stack([blocks[r] for r in rows[:8]]).astype(np.int64))
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CLEAN_LOSS, site, run / "export-ct",
         tmp_path / "blocks.npy", str(opened.cfg.deepspeed.micro_batch)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The bound (docs/finetune.md): |Δ| <= 1e-5 nats; measured 0 on 8 and on 143 blocks.
    assert float(proc.stdout.splitlines()[-1]) == pytest.approx(int_loss, abs=1e-5)
