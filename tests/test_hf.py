"""Hugging Face transformers with attn_implementation="fused_attn": tiny models built from configs
with random weights (nothing downloaded), against the same weights under "eager"."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (CI installs it with the test extra)")

import fused_attn.hf  # noqa: E402

fused_attn.hf.register()


@pytest.fixture
def kernel_calls(monkeypatch) -> list[bool]:
    """Records the causal flag of every fused_attn kernel call made by the integration."""
    calls: list[bool] = []
    original = fused_attn.hf.attention

    def counting(q, k, v, *, causal=False, scale=None, attn_mask=None):
        calls.append(causal)
        return original(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)

    monkeypatch.setattr(fused_attn.hf, "attention", counting)
    return calls


def _twins(model_class, config, device: str):
    """The same random weights under fused_attn, eager, and eager in float64 (the golden model)."""
    torch.manual_seed(0)
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(device)
    fused = model_class._from_config(copy.deepcopy(config), attn_implementation="fused_attn").to(device)
    fused.load_state_dict(eager.state_dict())
    golden = copy.deepcopy(eager).double()
    return fused, eager, golden


def _assert_rule(name: str, mine: torch.Tensor, theirs: torch.Tensor, gold: torch.Tensor, factor: float) -> None:
    """FlashAttention's rule on whole-model outputs in float32: our error against float64 is at
    most `factor` times eager's own, plus a small floor."""
    my_err = (mine.double() - gold).abs().max().item()
    eager_err = (theirs.double() - gold).abs().max().item()
    assert my_err <= factor * eager_err + 1e-5 * gold.abs().max().item(), (name, my_err, eager_err)


def _llama_config():
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_llama_decoder_logits_and_gradients(device: str, kernel_calls: list[bool]) -> None:
    fused, eager, golden = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    ids = torch.randint(0, 97, (2, 23), device=device)
    results = {}
    for name, model in (("fused", fused), ("eager", eager), ("golden", golden)):
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name == "fused" else "default")
            out = model(ids, labels=ids)
        out.loss.backward()
        results[name] = [out.logits.detach()] + [p.grad for p in model.parameters()]
    assert kernel_calls == [True, True]  # two layers, causal, no mask handed over
    for i, (mine, theirs, gold) in enumerate(zip(results["fused"], results["eager"], results["golden"])):
        _assert_rule(f"tensor {i}", mine, theirs, gold, 2 if i == 0 else 3)


def test_llama_generate_with_kv_cache_gives_eagers_tokens(device: str, kernel_calls: list[bool]) -> None:
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    fused.eval(), eager.eval()
    ids = torch.randint(0, 97, (1, 9), device=device)
    mask = torch.ones_like(ids)
    settings = {"max_new_tokens": 8, "do_sample": False, "attention_mask": mask, "pad_token_id": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tokens = fused.generate(ids, **settings)
    assert torch.equal(tokens, eager.generate(ids, **settings))
    assert len(kernel_calls) == 2 * 8  # prefill and 7 single-token steps, two layers each
    assert kernel_calls[:2] == [True, True] and not any(kernel_calls[2:])  # one query sees the whole cache


def _bert_config():
    return transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64,
                                   attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def test_bert_encoder_without_padding_runs_the_kernels(device: str, kernel_calls: list[bool]) -> None:
    fused, eager, golden = _twins(transformers.BertModel, _bert_config(), device)
    ids = torch.randint(0, 97, (2, 19), device=device)
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused(ids, attention_mask=mask).last_hidden_state
    assert kernel_calls == [False, False]  # bidirectional
    _assert_rule("hidden", mine, eager(ids, attention_mask=mask).last_hidden_state,
                 golden(ids, attention_mask=mask).last_hidden_state, 2)


def test_bert_encoder_with_padding_runs_the_mask_in_the_kernels(device: str, kernel_calls: list[bool]) -> None:
    fused, eager, golden = _twins(transformers.BertModel, _bert_config(), device)
    ids = torch.randint(0, 97, (2, 19), device=device)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused(ids, attention_mask=mask).last_hidden_state
    assert kernel_calls == [False, False]
    _assert_rule("hidden", mine, eager(ids, attention_mask=mask).last_hidden_state,
                 golden(ids, attention_mask=mask).last_hidden_state, 2)


def test_llama_batched_generate_with_left_padding(device: str, kernel_calls: list[bool]) -> None:
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    fused.eval(), eager.eval()
    ids = torch.randint(3, 97, (2, 10), device=device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second prompt is 4 tokens shorter, padded on the left
    ids[1, :4] = 0
    settings = {"max_new_tokens": 6, "do_sample": False, "attention_mask": mask, "pad_token_id": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tokens = fused.generate(ids, **settings)
    assert torch.equal(tokens, eager.generate(ids, **settings))
    assert len(kernel_calls) == 2 * 6


def test_unsupported_features_fall_back_with_a_warning(device: str, kernel_calls: list[bool]) -> None:
    config = _llama_config()
    config.attention_dropout = 0.5
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, config, device)
    fused.train()
    fused_attn.hf._WARNED.clear()
    with pytest.warns(UserWarning, match="dropout"):
        fused(torch.randint(0, 97, (1, 7), device=device))
    assert kernel_calls == []


def test_bart_encoder_decoder_with_cross_attention(device: str, kernel_calls: list[bool]) -> None:
    config = transformers.BartConfig(vocab_size=97, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
                                     attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     decoder_start_token_id=2, forced_eos_token_id=None)
    fused, eager, golden = _twins(transformers.BartForConditionalGeneration, config, device)
    fused.eval(), eager.eval(), golden.eval()
    source = torch.randint(3, 97, (2, 17), device=device)
    target = torch.randint(3, 97, (2, 7), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused(input_ids=source, decoder_input_ids=target).logits
    # encoder self (full), decoder self (causal), decoder cross (full, Sq = 7 != Sk = 17)
    assert sorted(kernel_calls) == [False, False, True]
    _assert_rule("logits", mine, eager(input_ids=source, decoder_input_ids=target).logits,
                 golden(input_ids=source, decoder_input_ids=target).logits, 2)
    settings = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}
    assert torch.equal(fused.generate(source, **settings), eager.generate(source, **settings))


def test_set_attn_implementation_switches_an_existing_model(device: str, kernel_calls: list[bool]) -> None:
    model = transformers.LlamaForCausalLM._from_config(_llama_config(), attn_implementation="eager").to(device)
    model.set_attn_implementation("fused_attn")
    assert model.config._attn_implementation == "fused_attn"
    model(torch.randint(0, 97, (1, 5), device=device))
    assert kernel_calls == [True, True]


def test_from_pretrained_with_attn_implementation(tmp_path, device: str, kernel_calls: list[bool]) -> None:
    """from_pretrained on a checkpoint saved to disk (nothing downloaded)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="fused_attn").to(device)
    assert model.config._attn_implementation == "fused_attn"
    eager = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").to(device)
    ids = torch.randint(0, 97, (1, 12), device=device)
    torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)
    assert kernel_calls == [True, True]
