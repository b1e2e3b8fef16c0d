"""Hugging Face transformers with attn_implementation="fused_attn": tiny models built from configs
with random weights (nothing downloaded), against the same weights under "eager" (or, for
dropout, the reference given the kernels' masks): Llama, BERT, BART, Gemma 2 (softcap, sliding
window), Mistral (sliding window), KV caches dynamic and static, packed sequences."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (CI installs it with the test extra)")

import fused_attn.hf  # noqa: E402
from fused_attn import reference  # noqa: E402
from tests.helpers import reference_with_kernels_dropout  # noqa: E402

fused_attn.hf.register()


@pytest.fixture
def kernel_calls(monkeypatch) -> list[dict]:
    """Records every fused_attn kernel call made by the integration: which entry point (varlen for
    packed input), the key length, whether a mask was passed, and the variant options."""
    calls: list[dict] = []

    def recording(name: str):
        original = getattr(fused_attn.hf, name)

        def record(q, k, v, *args, **kwargs):
            calls.append({"varlen": name == "attention_varlen", "seq_k": k.shape[-2],
                          "mask": kwargs.get("attn_mask") is not None, "causal": kwargs.get("causal", False),
                          "window": kwargs.get("window"), "softcap": kwargs.get("softcap", 0.0),
                          "dropout_p": kwargs.get("dropout_p", 0.0)})
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(fused_attn.hf, name, record)

    recording("attention")
    recording("attention_varlen")
    return calls


def _causal(calls: list[dict]) -> list[bool]:
    return [call["causal"] for call in calls]


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


def test_llama_decoder_logits_and_gradients(device: str, kernel_calls: list[dict]) -> None:
    fused, eager, golden = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    ids = torch.randint(0, 97, (2, 23), device=device)
    results = {}
    for name, model in (("fused", fused), ("eager", eager), ("golden", golden)):
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name == "fused" else "default")
            out = model(ids, labels=ids)
        out.loss.backward()
        results[name] = [out.logits.detach()] + [p.grad for p in model.parameters()]
    assert _causal(kernel_calls) == [True, True]  # two layers, causal, no mask handed over
    for i, (mine, theirs, gold) in enumerate(zip(results["fused"], results["eager"], results["golden"])):
        _assert_rule(f"tensor {i}", mine, theirs, gold, 2 if i == 0 else 3)


def test_llama_generate_with_kv_cache_gives_eagers_tokens(device: str, kernel_calls: list[dict]) -> None:
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
    assert _causal(kernel_calls) == [True, True] + [False] * 14  # one query sees the whole cache


def _bert_config():
    return transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64,
                                   attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def test_bert_encoder_without_padding_runs_the_kernels(device: str, kernel_calls: list[dict]) -> None:
    fused, eager, golden = _twins(transformers.BertModel, _bert_config(), device)
    ids = torch.randint(0, 97, (2, 19), device=device)
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused(ids, attention_mask=mask).last_hidden_state
    assert _causal(kernel_calls) == [False, False]  # bidirectional
    _assert_rule("hidden", mine, eager(ids, attention_mask=mask).last_hidden_state,
                 golden(ids, attention_mask=mask).last_hidden_state, 2)


def test_bert_encoder_with_padding_runs_the_mask_in_the_kernels(device: str, kernel_calls: list[dict]) -> None:
    fused, eager, golden = _twins(transformers.BertModel, _bert_config(), device)
    ids = torch.randint(0, 97, (2, 19), device=device)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused(ids, attention_mask=mask).last_hidden_state
    assert _causal(kernel_calls) == [False, False]
    _assert_rule("hidden", mine, eager(ids, attention_mask=mask).last_hidden_state,
                 golden(ids, attention_mask=mask).last_hidden_state, 2)


def test_llama_batched_generate_with_left_padding(device: str, kernel_calls: list[dict]) -> None:
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


def test_unsupported_features_fall_back_with_a_warning(device: str, kernel_calls: list[dict]) -> None:
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    ids = torch.randint(0, 97, (1, 7), device=device)
    fused_attn.hf._WARNED.clear()
    fused.train()  # attention dropout while training: eager would return dropped weights
    fused.config.attention_dropout = eager.config.attention_dropout = 0.1
    for layer in fused.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.warns(UserWarning, match="output_attentions=True with attention dropout"):
        fused(ids, output_attentions=True)  # transformers' SDPA path: no weights, as it warns itself
    assert kernel_calls == []
    # An additive position bias (T5's), handed to the attention function as transformers does.
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(1, 2, 5, 16, device=device) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, device=device)
    with pytest.warns(UserWarning, match="additive attention bias"):
        out, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=1.0, position_bias=bias)
    expected = reference.attention(q, k, v, scale=1.0, attn_mask=bias).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert kernel_calls == []


def test_attention_dropout_while_training_runs_in_the_kernels(device: str, kernel_calls: list[dict],
                                                              monkeypatch) -> None:
    """Training with attention_dropout: the kernels apply it (no fallback), repeatably under
    torch.manual_seed, and logits and gradients match the reference given the kernels' masks;
    eval mode applies none."""
    config = _llama_config()
    config.attention_dropout = 0.3
    fused, _, _ = _twins(transformers.LlamaForCausalLM, config, device)
    ids = torch.randint(0, 97, (2, 13), device=device)

    def run(model: torch.nn.Module) -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        torch.manual_seed(5)  # every layer draws its dropout seed from the default generator, in order
        out = model(ids, labels=ids)
        out.loss.backward()
        return [out.logits.detach()] + [p.grad.clone() for p in model.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = run(fused)
    assert [(call["dropout_p"], call["causal"]) for call in kernel_calls] == [(0.3, True)] * 2
    torch.manual_seed(5)
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, mine[0])  # the same seeds, the same masks
    fused.eval()
    assert (fused(ids).logits - mine[0]).abs().max() > 1e-2 and kernel_calls[-1]["dropout_p"] == 0.0
    monkeypatch.setattr(fused_attn.hf, "attention", reference_with_kernels_dropout)
    plain, golden = run(copy.deepcopy(fused)), run(copy.deepcopy(fused).double())
    for i, (got, theirs, gold) in enumerate(zip(mine, plain, golden)):
        assert (theirs.double() - gold).abs().max() <= 1e-4 * gold.abs().max()  # the same masks in both references
        _assert_rule(f"tensor {i}", got, theirs, gold, 2 if i == 0 else 3)


def _gemma2_config(**changes):
    # A larger initializer_range and query_pre_attn_scalar = head_dim give scores that the softcap
    # of 2 bends (without it the logits change by about 2, of about 10).
    settings = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
                "query_pre_attn_scalar": 16, "initializer_range": 0.2, "attn_logit_softcapping": 2.0,
                "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}
    return transformers.Gemma2Config(**{**settings, **changes})


def test_gemma2_softcap_and_sliding_window_logits_and_gradients(device: str, kernel_calls: list[dict]) -> None:
    fused, eager, golden = _twins(transformers.Gemma2ForCausalLM, _gemma2_config(), device)
    ids = torch.randint(0, 97, (2, 13), device=device)  # longer than the window of 4
    results = {}
    for name, model in (("fused", fused), ("eager", eager), ("golden", golden)):
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name == "fused" else "default")
            out = model(ids, labels=ids)
        out.loss.backward()
        results[name] = [out.logits.detach()] + [p.grad for p in model.parameters()]
    # The sliding layer gets transformers' mask, which holds the window; the full layer none.
    assert [(c["mask"], c["causal"], c["window"], c["softcap"]) for c in kernel_calls] == [
        (True, False, None, 2.0), (False, True, None, 2.0)]
    for i, (mine, theirs, gold) in enumerate(zip(results["fused"], results["eager"], results["golden"])):
        _assert_rule(f"tensor {i}", mine, theirs, gold, 2 if i == 0 else 3)
    for changes in ({"attn_logit_softcapping": None}, {"sliding_window": 64}):  # both features bite here
        other = transformers.Gemma2ForCausalLM._from_config(_gemma2_config(**changes), attn_implementation="eager")
        other.load_state_dict(eager.state_dict())
        assert (other.to(device)(ids).logits - results["fused"][0]).abs().max() > 0.1, changes


def test_sliding_window_without_a_mask_is_transformers_window(device: str, kernel_calls: list[dict]) -> None:
    """With no mask, a causal sliding layer passes window (W - 1, 0) to the kernels: the window of
    transformers' own mask (`sliding_window_causal_mask_function`), for a prefill and for one
    query decoding at the end of a cache."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    module = torch.nn.Module()
    module.is_causal = True
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 11, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 2, 11, 16, generator=gen).to(device) for _ in range(2))
    for seq_q in (11, 1):
        query = q[:, :, -seq_q:]
        windowed, _ = fused_attn.hf.fused_attn_forward(module, query, k, v, None, scaling=0.25, sliding_window=4)
        mask = sdpa_mask(batch_size=1, q_length=seq_q, kv_length=11, q_offset=11 - seq_q, allow_is_causal_skip=False,
                         mask_function=sliding_window_causal_mask_function(4), device=device)
        masked, _ = fused_attn.hf.fused_attn_forward(module, query, k, v, mask, scaling=0.25, sliding_window=4)
        torch.testing.assert_close(windowed, masked, rtol=1e-5, atol=1e-6)
        unwindowed, _ = fused_attn.hf.fused_attn_forward(module, query, k, v, None, scaling=0.25)
        assert (unwindowed - windowed).abs().max() > 0.1
    assert [c["window"] for c in kernel_calls] == [(3, 0), None, None] * 2


def test_mistral_sliding_window_generate_gives_eagers_tokens(device: str, kernel_calls: list[dict]) -> None:
    config = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=4)
    fused, eager, _ = _twins(transformers.MistralForCausalLM, config, device)
    fused.eval(), eager.eval()
    ids = torch.randint(3, 97, (1, 9), device=device)
    settings = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0,
                "return_dict_in_generate": True, "output_logits": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused.generate(ids, **settings)
    theirs = eager.generate(ids, **settings)
    assert torch.equal(mine.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(mine.logits), torch.stack(theirs.logits), rtol=1e-4, atol=1e-4)
    # Always at least as many keys as the window (the sliding cache keeps W - 1): always a mask.
    assert len(kernel_calls) == 2 * 6 and all(call["mask"] for call in kernel_calls)


def test_llama_generate_with_a_static_cache_gives_eagers_tokens(device: str, kernel_calls: list[dict]) -> None:
    """The prefill of an empty static cache comes with no mask and keys past the prompt (unwritten
    slots): they are cut off, as transformers' SDPA path does, not attended to."""
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    fused.eval(), eager.eval()
    ids = torch.randint(3, 97, (1, 9), device=device)
    settings = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0,
                "cache_implementation": "static", "return_dict_in_generate": True, "output_logits": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused.generate(ids, **settings)
    theirs = eager.generate(ids, **settings)
    assert torch.equal(mine.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(mine.logits), torch.stack(theirs.logits), rtol=1e-4, atol=1e-4)
    assert [(c["mask"], c["seq_k"]) for c in kernel_calls[:2]] == [(False, 9)] * 2  # of 12 cache slots
    assert all(call["mask"] for call in kernel_calls[2:])


@pytest.mark.parametrize("family", ["llama", "mistral-window4"])
def test_packed_sequences_run_as_varlen(family: str, device: str, kernel_calls: list[dict]) -> None:
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) output (one row, position_ids
    restarting per sequence, cu_seq_lens and max lengths): attention_varlen, the same logits as
    each sequence alone, and logits and gradients under the rule against eager on the same batch."""
    if family == "llama":
        model_class, config = transformers.LlamaForCausalLM, _llama_config()
    else:
        model_class = transformers.MistralForCausalLM
        config = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, sliding_window=4)
    fused, eager, golden = _twins(model_class, config, device)
    sequences = [torch.randint(0, 97, (length,)) for length in (5, 9, 3)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": seq.tolist()} for seq in sequences])
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 14, 17] and batch["max_length_q"] == 9
    batch["cu_seq_lens_k"] = batch["cu_seq_lens_k"].long()  # cast to int32 inside, the caller's left alone
    batch = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}
    results = {}
    for name, model in (("fused", fused), ("eager", eager), ("golden", golden)):
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name == "fused" else "default")
            out = model(**batch, use_cache=False)  # with a cache, eager's mask would not see the packing
        out.loss.backward()
        results[name] = [out.logits.detach()] + [p.grad for p in model.parameters()]
    assert batch["cu_seq_lens_k"].dtype == torch.int64
    window = (3, 0) if family.startswith("mistral") else None
    assert [(c["varlen"], c["causal"], c["window"]) for c in kernel_calls] == [(True, True, window)] * 2
    for i, (mine, theirs, gold) in enumerate(zip(results["fused"], results["eager"], results["golden"])):
        _assert_rule(f"tensor {i}", mine, theirs, gold, 2 if i == 0 else 3)
    bounds = batch["cu_seq_lens_q"].tolist()
    for seq, start, end in zip(sequences, bounds, bounds[1:]):
        alone = golden(seq[None].to(device)).logits.float()
        torch.testing.assert_close(results["fused"][0][:, start:end], alone, rtol=1e-4, atol=1e-4)


def test_bart_encoder_decoder_with_cross_attention(device: str, kernel_calls: list[dict]) -> None:
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
    assert sorted(_causal(kernel_calls)) == [False, False, True]
    _assert_rule("logits", mine, eager(input_ids=source, decoder_input_ids=target).logits,
                 golden(input_ids=source, decoder_input_ids=target).logits, 2)
    settings = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}
    assert torch.equal(fused.generate(source, **settings), eager.generate(source, **settings))


def test_set_attn_implementation_switches_an_existing_model(device: str, kernel_calls: list[dict]) -> None:
    model = transformers.LlamaForCausalLM._from_config(_llama_config(), attn_implementation="eager").to(device)
    model.set_attn_implementation("fused_attn")
    assert model.config._attn_implementation == "fused_attn"
    model(torch.randint(0, 97, (1, 5), device=device))
    assert _causal(kernel_calls) == [True, True]


def test_from_pretrained_with_attn_implementation(tmp_path, device: str, kernel_calls: list[dict]) -> None:
    """from_pretrained on a checkpoint saved to disk (nothing downloaded)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="fused_attn").to(device)
    assert model.config._attn_implementation == "fused_attn"
    eager = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").to(device)
    ids = torch.randint(0, 97, (1, 12), device=device)
    torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)
    assert _causal(kernel_calls) == [True, True]


@pytest.mark.parametrize("model", ["llama", "bert-padded"])
def test_output_attentions_returns_eagers_weights(model: str, device: str, kernel_calls: list[dict]) -> None:
    """output_attentions=True returns the real weights (fused_attn.attention_probs from the kernels'
    lse), not None: against eager's weights and a float64 model under the rule, with GQA and a
    causal decoder (no mask) and with a padded encoder (the mask path)."""
    if model == "llama":
        fused, eager, golden = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
        ids, mask = torch.randint(0, 97, (2, 13), device=device), None
    else:
        fused, eager, golden = _twins(transformers.BertModel, _bert_config(), device)
        ids = torch.randint(0, 97, (2, 11), device=device)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine = fused(ids, attention_mask=mask, output_attentions=True).attentions
    theirs = eager(ids, attention_mask=mask, output_attentions=True).attentions
    gold = golden(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(mine) == len(theirs) == 2 and len(kernel_calls) == 2
    for layer, (m, t, g) in enumerate(zip(mine, theirs, gold)):
        assert m.shape == t.shape and m.dtype == t.dtype
        _assert_rule(f"layer {layer} weights", m, t, g, 2)
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), rtol=0, atol=1e-5)
