"""Tests mirror the code: every module of lptrain/ has its own test file,
tests/<package>/test_<module>.py (a package's __init__ with code: tests/test_<package>.py), or
an entry below naming the test that covers it. Both ways: no module without one, no stale entry."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> the test that exercises it (end to end, or beside the code it serves)
COVERED_BY = {
    "lptrain.checkpoint.base": "tests/checkpoint/test_trust.py",  # a fine-tune outlives its base
    "lptrain.config.finetune": "tests/config/test_schema.py",  # and tests/test_errors.py
    "lptrain.config.init_source": "tests/config/test_schema.py",  # what init.from names
    "lptrain.config.precision": "tests/models/test_converters.py",
    "lptrain.config.reference": "tests/test_docs.py",  # every key documented, page generated
    "lptrain.corpora": "tests/data/test_dataset.py",  # snapshots verified by SHA-256
    "lptrain.data.datacheck": "tests/data/test_dataset.py",  # bad corpus file: file and line
    "lptrain.distributed.kept": "tests/distributed/test_memory.py",  # the plan's measured layers
    "lptrain.export.evaluate": "tests/trainer/test_finetune.py",  # lptrain eval of runs and exports
    "lptrain.export.switch": "tests/trainer/test_bitswitch.py",
    "lptrain.export.write": "tests/trainer/test_finetune.py",  # lptrain export, every layer kind
    "lptrain.lora.apply": "tests/lora/test_layer.py",  # apply, merge, merge_and_unload
    "lptrain.models.bitswitch": "tests/trainer/test_bitswitch.py",
    "lptrain.models.hf": "tests/trainer/test_finetune.py",  # init.from a Hugging Face directory
    "lptrain.models.init_from": "tests/trainer/test_finetune.py",
    "lptrain.nn.backends": "tests/nn/backends/test_backends.py",  # resolve(): the choice and why
    "lptrain.nn.backends.base": "tests/nn/backends/test_backends.py",
    "lptrain.nn.backends.selftest": "tests/nn/backends/test_backends.py",
    "lptrain.nn.backends.te_mapping": "tests/nn/backends/test_te.py",
    "lptrain.nn.backends.triton_rules": "tests/nn/backends/test_triton.py",
    "lptrain.nn.catalog": "tests/nn/backends/test_emulated_golden.py",  # every named recipe, bits
    "lptrain.nn.chunked": "tests/lora/test_l4q.py",
    "lptrain.nn.recipe": "tests/nn/test_resolve.py",
    "lptrain.qat.bitswitch.budget": "tests/qat/bitswitch/test_hasb.py",
    "lptrain.qat.bitswitch.hessian": "tests/qat/bitswitch/test_hasb.py",
    "lptrain.qat.bitswitch.prepare": "tests/qat/bitswitch/test_layer.py",
    "lptrain.qat.bitswitch.quantizer": "tests/qat/bitswitch/test_double_rounding.py",
    "lptrain.qat.layers": "tests/qat/test_prepare.py",
    "lptrain.qat.quantizer": "tests/qat/test_lsq.py",
    "lptrain.recipes": "tests/nn/test_resolve.py",
    "lptrain.report": "tests/report/test_plots.py",  # build(): PNGs, page, manifest
    "lptrain.trainer.step": "tests/trainer/test_loop.py",
    # test helpers, covered by the tests that use them
    "lptrain.testing": "tests/nn/test_linear.py",
    "lptrain.testing.browser": "tests/report/test_page.py",
    "lptrain.testing.checkpoints": "tests/checkpoint/test_store.py",
    "lptrain.testing.faults": "tests/trainer/test_stop.py",
    "lptrain.testing.memory": "tests/lora/test_l4q.py",
    "lptrain.testing.runs": "tests/observe/test_layers.py",
    "lptrain.testing.study": "tests/trainer/test_loop_loss.py",
    "lptrain.testing.wandb_file": "tests/observe/test_metrics.py",
}


def _modules() -> dict[str, Path]:
    """Module name -> the test file named after it, for every module with code."""
    out = {}
    for path in sorted((REPO / "lptrain").rglob("*.py")):
        rel = path.relative_to(REPO / "lptrain")
        if rel.parts[0] == "kernels" or path.name == "__main__.py":
            continue  # the kernels have tests/kernels/ (one file per kernel family)
        if path.name == "__init__.py":
            if "def " not in path.read_text() and "class " not in path.read_text():
                continue  # re-exports only
            parts = rel.parent.parts
            out[".".join(("lptrain", *parts))] = Path("tests", *parts[:-1], f"test_{parts[-1]}.py")
        else:
            name = ".".join(("lptrain", *rel.with_suffix("").parts))
            out[name] = Path("tests", *rel.parent.parts, f"test_{path.stem}.py")
    return out


def test_every_module_has_its_tests():
    missing = [m for m, t in _modules().items() if not (REPO / t).is_file() and m not in COVERED_BY]
    assert not missing, f"no test file of their own and no COVERED_BY entry: {missing}"


def test_no_stale_entry():
    modules = _modules()
    stale = {
        m: t for m, t in COVERED_BY.items() if m not in modules or (REPO / modules[m]).is_file()
    }
    assert not stale, f"entries for modules that are gone or now have their own test: {stale}"
    gone = {m: t for m, t in COVERED_BY.items() if not (REPO / t).is_file()}
    assert not gone, f"covering tests that do not exist: {gone}"
