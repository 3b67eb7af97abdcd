"""Exports as first-class transformers models for downstream training: the base model and heads,
hidden states and attentions, Trainer's gradient accumulation, gradient checkpointing, PEFT LoRA
and TRL's SFTTrainer, on tiny offline exports of every scheme.

The yardstick is the rope export, a plain `LlamaForCausalLM`: a rope model written as custom code
(`bifocal` with no spectral heads computes exactly RoPE) must give Llama's numbers on every path.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          Trainer, TrainingArguments)

from bifocal.data_pipeline.config import TokenizerConfig
from bifocal.data_pipeline.tokenizer import train_tokenizer
from bifocal.model import GPT, GPTConfig
from bifocal.model.hf.hf_io import save_hf

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

AUSTEN = Path(__file__).resolve().parent.parent / "data" / "nl_small_austen.jsonl.gz"
# name -> (scheme, position settings); "rope-code" is RoPE exported as bifocal custom code.
EXPORTS = {"llama": ("rope", {}), "rope-code": ("bifocal", {"spectral_heads": 0}),
           "bifocal": ("bifocal", {"spectral_heads": 2}), "spectral": ("spectral", {}), "pope": ("pope", {}),
           "nope": ("nope", {})}
CUSTOM = [name for name in EXPORTS if name != "llama"]


def austen_text() -> str:
    with gzip.open(AUSTEN, "rt", encoding="utf-8") as f:
        return json.loads(f.readline())["text"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    tok = train_tokenizer([austen_text()[:30_000]], TokenizerConfig(type="bpe", vocab_size=320, train_chars=30_000),
                          root / "tok")
    out = {}
    for name, (scheme, pos) in EXPORTS.items():
        torch.manual_seed(0)  # the same weights for llama and rope-code
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64,
                              tie_embeddings=False, position={"scheme": scheme, **pos}))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("position.delta"):
                    p.uniform_(-6.0, 0.0)
                elif ".position." in pname:
                    p.add_(0.05 * torch.randn_like(p))
        out[name] = save_hf(model, tok, root / name)
    return out


def load(cls, path: Path, **kw):
    return cls.from_pretrained(path, trust_remote_code=True, **kw)


def ids(B: int = 2, T: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def test_rope_as_custom_code_gives_llamas_numbers_everywhere(exports):
    x = ids()
    llama = load(AutoModelForCausalLM, exports["llama"], attn_implementation="eager").eval()  # eager: attentions
    code = load(AutoModelForCausalLM, exports["rope-code"]).eval()
    assert type(llama).__name__ == "LlamaForCausalLM" and type(code).__name__ == "BifocalForCausalLM"
    with torch.no_grad():
        a = llama(x, labels=x, output_hidden_states=True, output_attentions=True)
        b = code(x, labels=x, output_hidden_states=True, output_attentions=True)
        assert (a.logits - b.logits).abs().max().item() <= 1e-5 and abs(a.loss.item() - b.loss.item()) <= 1e-6
        assert len(a.hidden_states) == len(b.hidden_states) == 3 and len(a.attentions) == len(b.attentions) == 2
        for ha, hb in zip(a.hidden_states, b.hidden_states):
            assert ha.shape == hb.shape and (ha - hb).abs().max().item() <= 1e-5
        for wa, wb in zip(a.attentions, b.attentions):
            assert wa.shape == wb.shape == (2, 4, 20, 20) and (wa - wb).abs().max().item() <= 1e-6
        # Trainer's token count: the summed loss divided by num_items_in_batch, not the mean.
        summed = [m(x, labels=x, num_items_in_batch=60).loss.item() for m in (llama, code)]
        assert summed[0] == pytest.approx(summed[1], abs=1e-5) == pytest.approx(a.loss.item() * 38 / 60, abs=1e-5)
        base = load(AutoModel, exports["rope-code"]).eval()
        assert type(base).__name__ == "BifocalModel"
        assert (base(x).last_hidden_state - b.hidden_states[-1]).abs().max().item() <= 1e-6
        heads = []
        for path in (exports["llama"], exports["rope-code"]):
            torch.manual_seed(3)  # the new score head: the same init for both
            heads.append(load(AutoModelForSequenceClassification, path, num_labels=3).eval())
        labels = torch.tensor([0, 2])
        sa, sb = (m(x, labels=labels) for m in heads)
        assert sa.logits.shape == sb.logits.shape == (2, 3)
        assert (sa.logits - sb.logits).abs().max().item() <= 1e-5 and abs(sa.loss.item() - sb.loss.item()) <= 1e-5


@pytest.mark.parametrize("name", CUSTOM)
def test_base_model_heads_and_probing_outputs(name, exports):
    path, x = exports[name], ids()
    lm = load(AutoModelForCausalLM, path).eval()
    assert type(lm.base_model).__name__ == "BifocalModel"
    with torch.no_grad():
        out = lm(x, output_hidden_states=True, output_attentions=True)
        assert [h.shape for h in out.hidden_states] == [(2, 20, 32)] * 3
        for w in out.attentions:  # causal probabilities, each row sums to 1
            assert w.shape == (2, 4, 20, 20)
            assert torch.allclose(w.sum(-1), torch.ones(2, 4, 20), atol=1e-5) and w.triu(1).abs().max() == 0
        assert (lm(x).logits - out.logits).abs().max().item() <= 1e-6  # probing does not change the result
        assert (lm(inputs_embeds=lm.get_input_embeddings()(x)).logits - out.logits).abs().max().item() <= 1e-6
        base = load(AutoModel, path).eval()
        assert (base(x).last_hidden_state - out.hidden_states[-1]).abs().max().item() <= 1e-6
        assert base(x, return_dict=False)[0].shape == (2, 20, 32)
        n = (x[:, 1:] != -100).numel()
        assert lm(x, labels=x, num_items_in_batch=2 * n).loss.item() == pytest.approx(
            lm(x, labels=x).loss.item() / 2, rel=1e-6)
    cls = load(AutoModelForSequenceClassification, path, num_labels=2)
    loss = cls(x, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss) and cls.score.weight.grad is not None


def _train(path: Path, grad_accum: int, batch: int, tmp: Path, **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A few Trainer steps on rows with different numbers of labelled tokens, so the mean over
    micro-batches differs from the mean over tokens."""
    torch.manual_seed(0)
    rows = [ids(1, 16, seed=i)[0].tolist() for i in range(16)]
    labels = [[t if j >= 2 * (i % 6) else -100 for j, t in enumerate(r)] for i, r in enumerate(rows)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": labels})
    model = load(AutoModelForCausalLM, path)
    args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=batch, gradient_accumulation_steps=grad_accum,
                             max_steps=3, learning_rate=0.5, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, data_seed=0, lr_scheduler_type="constant", disable_tqdm=True,
                             optim="sgd", **kw)  # SGD: weights move by the gradient itself, not by its sign
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["llama", "rope-code", "bifocal", "pope"])
def test_trainer_gradient_accumulation_equals_a_larger_batch(name, exports, tmp_path):
    acc_losses, acc_weights = _train(exports[name], 4, 1, tmp_path)
    big_losses, big_weights = _train(exports[name], 1, 4, tmp_path)
    assert acc_losses == pytest.approx(big_losses, abs=1e-5)
    for n in big_weights:
        torch.testing.assert_close(acc_weights[n], big_weights[n], atol=1e-5, rtol=1e-4, msg=n)
    if name == "rope-code":  # and Llama's
        assert acc_losses == pytest.approx(_train(exports["llama"], 4, 1, tmp_path)[0], abs=1e-5)


def _saved_bytes_loss_and_grads(model, x) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for the backward, and the loss and gradients of one step."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, labels=x)
    out.loss.backward()
    return saved[0], out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama"] + CUSTOM)
def test_gradient_checkpointing_recomputes_and_changes_nothing(name, exports):
    model = load(AutoModelForCausalLM, exports[name])
    model.config.use_cache = True  # a cache must still not be built in training
    model.train()
    x = ids(2, 24)
    kept, loss, grads = _saved_bytes_loss_and_grads(model, x)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    recomputed, loss_gc, grads_gc = _saved_bytes_loss_and_grads(model, x)
    assert recomputed < 0.5 * kept  # the blocks' activations were not kept
    assert loss_gc == loss
    for n in grads:
        torch.testing.assert_close(grads_gc[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", CUSTOM)
def test_no_cache_is_built_in_training(name, exports):
    model = load(AutoModelForCausalLM, exports[name])
    model.config.use_cache = True
    out_train = model.train()(ids())
    out_eval = model.eval()(ids())
    assert all(v is None or not hasattr(v, "get_seq_length") for v in out_train.values())
    assert any(hasattr(v, "get_seq_length") for v in out_eval.values())


def _sft(path: Path, packing: bool, tmp: Path, lora: bool = True):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    text = austen_text()
    data = datasets.Dataset.from_dict({"text": [text[50_000 + 97 * i: 50_090 + 97 * i + 7 * (i % 5)] for i in range(24)]})
    torch.manual_seed(0)
    model = load(AutoModelForCausalLM, path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    args = SFTConfig(output_dir=str(tmp), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, packing=packing, max_length=64,
                     gradient_checkpointing=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant",
                     bf16=False)  # TRL defaults to bf16 autocast, which also wraps the trained model's forward
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None)
    trainer.train()
    return trainer, [r["loss"] for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_with_lora_trains_and_reloads(packing, exports, tmp_path):
    from peft import PeftModel

    losses = {}
    for name in ("llama", "rope-code", "bifocal", "pope"):
        trainer, losses[name] = _sft(exports[name], packing, tmp_path / name)
        assert len(losses[name]) == 3 and all(l == l for l in losses[name])  # finite, logged
        trained = trainer.model.eval()
        x = ids()
        with torch.no_grad():
            want = trained(input_ids=x).logits
        trained.save_pretrained(tmp_path / name / "adapter")
        base = load(AutoModelForCausalLM, exports[name])
        reloaded = PeftModel.from_pretrained(base, tmp_path / name / "adapter").eval()
        with torch.no_grad():
            assert (reloaded(input_ids=x).logits - want).abs().max().item() <= 1e-5
            merged = reloaded.merge_and_unload()
            assert type(merged).__name__.endswith("ForCausalLM")
            assert (merged(input_ids=x).logits - want).abs().max().item() <= 1e-4
    # Packed or not, the rope written as custom code trains exactly as Llama does.
    assert losses["rope-code"] == pytest.approx(losses["llama"], abs=1e-4)


@pytest.mark.parametrize("name", ["llama", "bifocal"])
def test_standard_model_methods(name, exports, tmp_path):
    """save_pretrained round trip, from_config, bf16 and device_map loading, resized embeddings,
    assisted generation; a preallocated (static) cache is refused with one line."""
    path, x = exports[name], ids(1, 10)
    model = load(AutoModelForCausalLM, path).eval()
    with torch.no_grad():
        want = model(x).logits
        model.save_pretrained(tmp_path / "again")
        assert (load(AutoModelForCausalLM, tmp_path / "again")(x).logits - want).abs().max().item() == 0
        bf16 = load(AutoModelForCausalLM, path, dtype=torch.bfloat16, device_map="cpu")
        assert bf16.lm_head.weight.dtype == torch.bfloat16
        assert (bf16(x).logits.float() - want).abs().max().item() < 0.05 * want.abs().max().item()
        from transformers import AutoConfig

        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=True),
                                                 trust_remote_code=True)
        assert fresh(x).logits.shape == want.shape
        greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
        plain = model.generate(x, **greedy)
        assert model.generate(x, assistant_model=load(AutoModelForCausalLM, path).eval(), **greedy).tolist() == plain.tolist()
        assert model.generate(x, prompt_lookup_num_tokens=3, **greedy).tolist() == plain.tolist()
        if name != "llama":
            with pytest.raises(ValueError, match="dynamic KV cache only"):
                model.generate(x, cache_implementation="static", **greedy)
    model.resize_token_embeddings(330)
    assert model(torch.randint(0, 330, (1, 5))).logits.shape == (1, 5, 330)


def test_readme_finetune_example_runs(exports, tmp_path):
    """The README's "Fine-tune an export" block, as written, on a tiny export."""
    import subprocess
    import sys

    from conftest import REPO, cli_env

    readme = (REPO / "README.md").read_text()
    code = readme.split("<!-- finetune-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"exports/demo"', repr(str(exports["bifocal"]))).replace(
        '"data/nl_small_austen.jsonl.gz"', repr(str(AUSTEN)))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    merged = load(AutoModelForCausalLM, tmp_path / "runs" / "finetune" / "merged").eval()
    assert type(merged).__name__ == "BifocalForCausalLM"
    before = load(AutoModelForCausalLM, exports["bifocal"]).eval()
    with torch.no_grad():
        assert (merged(ids()).logits - before(ids()).logits).abs().max().item() > 1e-4  # it trained
