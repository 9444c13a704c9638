"""Helpers for the trainer tests: run the CLI in a clean subprocess and read its outputs
(the fixtures built on them are in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "pretrain"
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))  # every shipped recipe file
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

# A nano model for a few steps: seconds per run, and the loss still falls clearly.
FAST = [
    "model.preset=nano",
    "data.block_size=64",
    "deepspeed.micro_batch=8",
    "optim.lr=1e-2",
    "optim.warmup_steps=2",
    "logging.interval=1",
    "run.eval_interval=0",
    "checkpoint.interval=0",
    "logging.progress=lines",
]


def sets(*assignments: str) -> list[str]:
    return [a for kv in assignments for a in ("--set", kv)]


# An op DeepSpeed JIT-builds is built once per extensions dir: keep the user's.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def clean_env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DIST_VARS and not k.startswith(("WANDB_", "DS_"))
    }
    env.update(
        TORCH_EXTENSIONS_DIR=EXTENSIONS,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lptrain(*args, launcher=(), check=True, timeout=240) -> subprocess.CompletedProcess:
    """`python -m lptrain ARGS` (or under `launcher`) in a clean environment."""
    cmd = [*(launcher or [sys.executable]), "-m", "lptrain", *map(str, args)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


def wait_for_step(run_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> int:
    """Block until the training run in `proc` has logged a step (a `loss` row in metrics.jsonl:
    its signal handlers are installed and the loop is running), and return that step; fail if
    the process exits first or `timeout` passes. The readiness signal for the SIGTERM tests."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before its first step")
        rows = path.read_text().splitlines() if path.exists() else []
        steps = [json.loads(r)["step"] for r in rows if r.endswith("}") and '"loss"' in r]
        if steps:
            return steps[0]
        time.sleep(0.05)
    raise AssertionError(f"no training step logged within {timeout} s")


def _save_tiny(out: Path, config_class: str, model_class: str, vocab_size: int = 257,
               **config) -> Path:  # fmt: skip
    """A model of `transformers.<model_class>` with random weights (seed 0) and the byte
    vocabulary (257) unless told, saved with `save_pretrained` to `out` (nothing is
    downloaded). It ships no tokenizer: a run on it sets `data.tokenizer=byte`. Skips the test
    without transformers."""
    import pytest
    import torch

    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, config_class)(vocab_size=vocab_size, **config)
    torch.manual_seed(0)
    getattr(transformers, model_class)(cfg).save_pretrained(str(out))
    return out


def tiny_llama(out: Path, vocab_size: int = 257) -> Path:
    """A 2-layer, 64-wide Llama: the Hugging Face base of the fine-tuning tests."""
    return _save_tiny(
        out, "LlamaConfig", "LlamaForCausalLM", vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=128,
    )  # fmt: skip


def tiny_gpt2(out: Path, n_positions: int = 128) -> Path:
    """A 2-layer, 64-wide GPT-2: its linear layers are transformers' Conv1D (W stored (in,
    out)), with biases, learned positions (at most `n_positions`) and a tied output head."""
    return _save_tiny(out, "GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=2,
                      n_positions=n_positions, bos_token_id=256, eos_token_id=256)  # fmt: skip


def tiny_qwen2(out: Path) -> Path:
    """A 2-layer, 64-wide Qwen2: Llama-like, but q/k/v have biases and one key/value head
    serves both query heads (grouped-query attention)."""
    return _save_tiny(
        out, "Qwen2Config", "Qwen2ForCausalLM", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128,
    )  # fmt: skip
