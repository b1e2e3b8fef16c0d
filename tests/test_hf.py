"""Hugging Face transformers with attn_implementation="fused_attn": tiny models built from configs
with random weights (nothing downloaded), against the same weights under "eager" (or, for
dropout, the reference given the kernels' masks): Llama, BERT, BART, Gemma 2 (softcap, sliding
window), Mistral (sliding window), KV caches dynamic and static, packed sequences; and one test
per way a call could otherwise go wrong: attention sinks, position biases, top-k indices, keyword
arguments the kernels do not apply, masks with packed sequences, models that compute attention
themselves, weights with dropout or sinks. tests/test_hf_models.py runs every architecture of
docs/hf-architectures.md."""
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
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[dict]:
    """Records every fused_attn kernel call made by the integration: which entry point (varlen for
    packed input), the key length, whether a mask was passed, and the variant options."""
    calls: list[dict] = []

    def recording(name: str):
        original = getattr(fused_attn.hf, name)

        def record(q, k, v, *args, **kwargs):
            calls.append({"varlen": name == "attention_varlen", "kvcache": name == "attention_with_kvcache",
                          "seq_k": k.shape[-2],
                          "mask": kwargs.get("attn_mask") is not None, "causal": kwargs.get("causal", False),
                          "window": kwargs.get("window"), "softcap": kwargs.get("softcap", 0.0),
                          "dropout_p": kwargs.get("dropout_p", 0.0), "sinks": kwargs.get("sinks") is not None})
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(fused_attn.hf, name, record)

    recording("attention")
    recording("attention_varlen")
    recording("attention_with_kvcache")
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
    # The steps run on the KV-cache kernel, over a cache that grows by one key per step.
    assert [call["kvcache"] for call in kernel_calls] == [False, False] + [True] * 14
    assert [call["seq_k"] for call in kernel_calls[2::2]] == list(range(10, 17))


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
    # The steps after the prefill run on the KV-cache kernel with the padding mask.
    assert [(c["kvcache"], c["mask"]) for c in kernel_calls] == [(False, True)] * 2 + [(True, True)] * 10


def test_weights_with_training_dropout_run_the_models_eager_attention(device: str, kernel_calls: list[dict]) -> None:
    """Attention weights requested while training with dropout: eager returns the dropped weights,
    so the call runs the model's own eager function (warned), which returns them: the same
    weights and logits as the eager model under the same seed."""
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    ids = torch.randint(0, 97, (1, 7), device=device)
    fused_attn.hf._WARNED.clear()
    for model in (fused, eager):
        model.train()
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="attention weights requested with attention dropout"):
        mine = fused(ids, output_attentions=True)
    torch.manual_seed(3)
    theirs = eager(ids, output_attentions=True)
    assert kernel_calls == []
    assert len(mine.attentions) == len(theirs.attentions) == 2
    for m, t in zip(mine.attentions, theirs.attentions):
        torch.testing.assert_close(m, t, rtol=0, atol=0)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=0)


@pytest.mark.parametrize("mask", ["none-causal", "padding", "cross"])
def test_position_bias_runs_in_the_kernels(mask: str, device: str, kernel_calls: list[dict]) -> None:
    """An additive position bias (T5's `position_bias`, with its gradient) is a float mask for the
    kernels, added to the scaled scores before the builder's mask, as eager adds it: no fallback."""
    from transformers.models.t5.modeling_t5 import eager_attention_forward

    gen = torch.Generator().manual_seed(0)
    seq_k = 9 if mask == "cross" else 7
    q = torch.randn(2, 2, 7, 16, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(2, 2, seq_k, 16, generator=gen).to(device).requires_grad_() for _ in range(2))
    bias = torch.randn(1, 2, 7, seq_k, generator=gen).to(device).requires_grad_()
    module = torch.nn.Module()
    module.is_causal = mask == "none-causal"
    visible = torch.ones(2, 1, 7, seq_k, dtype=torch.bool, device=device)
    if mask == "none-causal":
        visible = visible.tril()
    else:
        visible[1, :, :, 5:] = False  # the second row's keys past 5 are padding
    given = None if mask == "none-causal" else visible
    additive = torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, given, scaling=1.0, position_bias=bias)
    theirs, _ = eager_attention_forward(module, q, k, v, additive, scaling=1.0, position_bias=bias)
    assert len(kernel_calls) == 1 and kernel_calls[0]["mask"]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    probe = torch.randn(mine.shape, generator=gen).to(device)
    grads = [torch.autograd.grad((out * probe).sum(), (q, k, v, bias)) for out in (mine, theirs)]
    for name, g_mine, g_theirs in zip("qkvb", *grads):
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-3, atol=1e-4, msg=name)


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
    # The reference computes in float64 too; the kernels would hand a float64 model to eager.
    monkeypatch.setattr(fused_attn.hf, "unsupported_reason", lambda q, head_dim, head_dim_v=0: None)
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
    # The steps run on the KV-cache kernel over all 12 slots, the mask hiding the unwritten ones.
    assert [(c["kvcache"], c["seq_k"]) for c in kernel_calls[2:]] == [(True, 12)] * 6


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


def _loss_step(model: torch.nn.Module, batch: dict, strict: bool) -> list[torch.Tensor]:
    """One forward and backward of the model's own loss on `batch`, without a cache: the logits
    and every parameter's gradient. `strict`: any warning is an error (the fused model's runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error" if strict else "default")
        out = model(**batch, use_cache=False)
    out.loss.backward()
    return [out.logits.detach()] + [p.grad for p in model.parameters()]


def _packing_model(family: str):
    if family == "llama":
        return transformers.LlamaForCausalLM, _llama_config()
    if family == "phimoe-window-in-mask":
        return transformers.PhimoeForCausalLM, transformers.PhimoeConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            sliding_window=4)
    if family == "gemma2-hybrid":
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4)
    return transformers.DogeForCausalLM, transformers.DogeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, keep_window_size=4)


@pytest.mark.parametrize("family", ["llama", "phimoe-window-in-mask", "gemma2-hybrid", "doge-content-mask"])
def test_packing_by_position_ids_builds_no_square_mask(family: str, device: str, kernel_calls: list[dict],
                                                       monkeypatch) -> None:
    """DataCollatorWithFlattening's default output (one row, position_ids restarting per sequence,
    no cu_seq_lens): transformers' builder detects the packing; fused_attn records the O(S)
    sequence ids instead of building the (1, 1, S, S) mask, and every layer runs attention_varlen
    with its window (Gemma 2's sliding layers name theirs, PhiMoE's lives only in its mask).
    Doge builds its dynamic mask on top of the builder's, so it still gets the dense mask. Logits
    and gradients equal eager's."""
    from tests.test_hf_models import reinitialise
    from transformers import masking_utils

    built = []
    original = masking_utils.sdpa_mask

    def counting(*args, **kwargs):
        mask = original(*args, **kwargs)
        built.append(None if mask is None else tuple(mask.shape))
        return mask

    monkeypatch.setattr(masking_utils, "sdpa_mask", counting)
    model_class, config = _packing_model(family)
    fused, eager, _ = _twins(model_class, config, device)
    reinitialise(eager)
    fused.load_state_dict(eager.state_dict())
    fused.eval(), eager.eval()
    collator = transformers.DataCollatorWithFlattening()
    batch = collator([{"input_ids": torch.randint(0, 97, (n,)).tolist()} for n in (5, 9, 3)])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    batch = {name: value.to(device) for name, value in batch.items()}
    results = {"fused": _loss_step(fused, batch, strict=True)}
    built_by_fused, built[:] = list(built), []  # eager's own builder calls sdpa_mask too
    results["eager"] = _loss_step(eager, batch, strict=False)
    built = built_by_fused
    if family == "doge-content-mask":
        assert (1, 1, 17, 17) in built and all(not call["varlen"] for call in kernel_calls)
    else:
        assert built == [] and len(kernel_calls) == 2
        windows = {"llama": [None, None], "phimoe-window-in-mask": [(3, 0)] * 2, "gemma2-hybrid": [(3, 0), None]}
        assert [c["window"] for c in kernel_calls] == windows[family]
        assert all(c["varlen"] and c["causal"] and not c["mask"] for c in kernel_calls)
    for i, (mine, theirs) in enumerate(zip(results["fused"], results["eager"])):
        assert (mine - theirs).abs().max() <= (1e-4 if i == 0 else 1e-3) * theirs.abs().max(), i


def test_recorded_packing_is_forgotten_by_the_next_forward(device: str, kernel_calls: list[dict]) -> None:
    """After a packed forward, an unpacked one of the same shape (one sequence) runs plain causal."""
    fused, eager, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    ids = torch.randint(0, 97, (1, 7), device=device)
    fused(ids, position_ids=packed, use_cache=False)
    mine = fused(ids, use_cache=False).logits
    theirs = eager(ids, use_cache=False).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert [c["varlen"] for c in kernel_calls] == [True, True, False, False]


def test_position_ids_that_disagree_with_the_recorded_packing_raise(device: str) -> None:
    """A layer called with position_ids that pack differently from what the mask builder recorded
    for the forward (a layer recomputed after another forward) raises instead of guessing."""
    fused, _, _ = _twins(transformers.LlamaForCausalLM, _llama_config(), device)
    ids = torch.randint(0, 97, (1, 7), device=device)
    fused(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device), use_cache=False)
    layer = fused.model.layers[0].self_attn
    q = torch.randn(1, 4, 7, 16, device=device)
    k, v = (torch.randn(1, 2, 7, 16, device=device) for _ in range(2))
    with pytest.raises(NotImplementedError, match="position_ids pack sequences differently"):
        fused_attn.hf.fused_attn_forward(layer, q, k, v, None, position_ids=torch.arange(7, device=device)[None])


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


def _module(heads_q: int, heads_kv: int, causal: bool, sinks: torch.Tensor | None = None) -> torch.nn.Module:
    """What transformers' eager attention functions read from their module."""
    module = torch.nn.Module()
    module.is_causal = causal
    module.num_key_value_groups = heads_q // heads_kv
    if sinks is not None:
        module.sinks = torch.nn.Parameter(sinks)
    return module


def _additive(visible: torch.Tensor) -> torch.Tensor:
    """transformers' eager mask: 0 where a key is seen, float32's minimum elsewhere."""
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)


def _block_causal(lengths: list[int], device: str) -> torch.Tensor:
    """bool (1, 1, T, T): causal within each packed sequence, nothing across."""
    total = sum(lengths)
    visible = torch.zeros(total, total, dtype=torch.bool, device=device)
    start = 0
    for length in lengths:
        visible[start:start + length, start:start + length] = torch.ones(length, length, dtype=torch.bool).tril()
        start += length
    return visible[None, None]


@pytest.mark.parametrize("case", ["causal", "padding", "decode", "packed"])
def test_attention_sinks_equal_gpt_oss_eager(case: str, device: str, kernel_calls: list[dict]) -> None:
    """s_aux (one logit per query head) runs on the kernels' sinks: output and
    the gradients of q, k, v and the sinks equal GPT-OSS's eager attention (which concatenates the
    sink column to the scores), with no mask, a padding mask, one query decoding, and packed
    sequences. Before, the call went to transformers' SDPA path, which drops s_aux."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    gen = torch.Generator().manual_seed(0)
    batch, seq_q = (1, 9) if case == "packed" else (2, 1 if case == "decode" else 9)
    q = torch.randn(batch, 4, seq_q, 16, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(batch, 2, 9, 16, generator=gen).to(device).requires_grad_() for _ in range(2))
    module = _module(4, 2, causal=True, sinks=(2.0 + torch.randn(4, generator=gen)).to(device))
    extra = {}
    visible = torch.ones(batch, 1, seq_q, 9, dtype=torch.bool, device=device).tril(9 - seq_q)
    given = None
    if case == "padding":
        visible[1, :, :, 7:] = False
        given = visible
    elif case == "packed":
        visible = _block_causal([4, 5], device)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 5, "max_length_k": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine, weights = fused_attn.hf.fused_attn_forward(module, q, k, v, given, scaling=0.25, s_aux=module.sinks,
                                                         **extra)
    theirs, _ = eager_attention_forward(module, q, k, v, _additive(visible), scaling=0.25)
    assert weights is None and len(kernel_calls) == 1 and kernel_calls[0]["varlen"] == (case == "packed")
    assert kernel_calls[0]["sinks"]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    probe = torch.randn(mine.shape, generator=gen).to(device)
    inputs = (q, k, v, module.sinks)
    grads = [torch.autograd.grad((out * probe).sum(), inputs) for out in (mine, theirs)]
    for name, g_mine, g_theirs in zip(("q", "k", "v", "sinks"), *grads):
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-3, atol=1e-4, msg=name)


def test_attention_sinks_with_dropout_are_exact(device: str) -> None:
    """Eager drops the sink column before dropout, as the kernels do: the output is the sinkless
    dropped output times sigmoid(lse - sink), here from the reference given the kernels' dropout
    mask."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 11, 16, generator=gen).to(device) for _ in range(3))
    sinks = (2.0 + torch.randn(2, generator=gen)).to(device)
    module = _module(2, 2, causal=True)
    torch.manual_seed(4)
    mine, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, dropout=0.3, scaling=0.25, s_aux=sinks)
    torch.manual_seed(4)
    dropped = reference_with_kernels_dropout(q, k, v, causal=True, scale=0.25, dropout_p=0.3)
    _, lse = reference.attention(q, k, v, causal=True, scale=0.25, return_lse=True)
    expected = dropped * torch.sigmoid(lse - sinks[:, None]).unsqueeze(-1)
    torch.testing.assert_close(mine, expected.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_attention_sinks_with_weights_run_the_models_eager_attention(device: str, kernel_calls: list[dict]) -> None:
    """Models disagree on which weights they return with sinks (GPT-OSS the sink-scaled ones,
    Granite-SWA the plain softmax), so weights with sinks run the model's own eager function."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, eager_attention_forward

    config = transformers.GptOssConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_hidden_layers=1, layer_types=["full_attention"])
    module = GptOssAttention(config, 0).to(device)
    torch.nn.init.normal_(module.sinks, 2.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(device) for _ in range(2))
    fused_attn.hf._WARNED.clear()
    with pytest.warns(UserWarning, match="attention weights requested with attention sinks"):
        mine = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25, s_aux=module.sinks,
                                                output_attentions=True)
    causal = _additive(torch.ones(6, 6, dtype=torch.bool, device=device).tril())
    theirs = eager_attention_forward(module, q, k, v, causal, scaling=0.25)
    assert kernel_calls == []
    for m, t in zip(mine, theirs):
        torch.testing.assert_close(m, t, rtol=0, atol=0)


@pytest.mark.parametrize("mask", ["builder", "none"])
def test_topk_indices_keep_only_the_selected_keys(mask: str, device: str, kernel_calls: list[dict]) -> None:
    """`indices` (B, Sq, k) key positions, as DeepSeek-V3.2 and GLM-MoE-DSA pass them outside eager
    and SDPA, are folded into the mask exactly as these models fold them for eager: the kernels
    attend to the selected keys only. Before, every key was attended."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 16, generator=gen).to(device) for _ in range(3))
    causal = torch.ones(2, 1, 10, 10, dtype=torch.bool, device=device).tril()
    # Four keys per query among those it sees (repeats allowed), as the models' indexers pick them.
    row = torch.arange(10)[None, :, None]
    indices = (torch.rand(2, 10, 4, generator=gen) * (row + 1)).long().to(device)
    selected = torch.zeros(2, 10, 10, dtype=torch.bool, device=device).scatter(-1, indices, True)[:, None]
    module = _module(2, 2, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mine, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, causal if mask == "builder" else None,
                                                   scaling=0.25, indices=indices.int())
    expected = reference.attention(q, k, v, scale=0.25, attn_mask=causal & selected).transpose(1, 2)
    assert len(kernel_calls) == 1 and kernel_calls[0]["mask"]
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)
    assert (reference.attention(q, k, v, scale=0.25, attn_mask=causal).transpose(1, 2) - mine).abs().max() > 0.1


@pytest.mark.parametrize("name", sorted(fused_attn.hf.IGNORED_KWARGS))
def test_keyword_arguments_that_change_nothing_run_on_the_kernels(name: str, device: str,
                                                                   kernel_calls: list[dict]) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=gen).to(device) for _ in range(3))
    module = _module(2, 2, causal=True)
    plain, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        given, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25,
                                                    **{name: torch.arange(5, device=device)})
    assert len(kernel_calls) == 2
    torch.testing.assert_close(given, plain, rtol=0, atol=0)


def test_keyword_arguments_eager_applies_run_the_models_eager_attention(device: str,
                                                                       kernel_calls: list[dict]) -> None:
    """Inkling2's per-token sinks (`sinks`, (B, H, Sq, 1)): not a kernel feature, but its eager
    function applies it, so the call runs that function (warned once) and gives its result."""
    from transformers.models.inkling2.modeling_inkling2 import Inkling2SlidingAttention, eager_attention_forward

    config = transformers.Inkling2TextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                             head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=2,
                                             swa_head_dim=16, num_hidden_layers=1, d_rel=8)
    module = Inkling2SlidingAttention(config, 0).to(device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(device) for _ in range(3))
    sinks = torch.randn(1, 2, 6, 1, generator=gen).to(device)
    fused_attn.hf._WARNED.clear()
    with pytest.warns(UserWarning, match="'sinks'.*eager attention"):
        mine, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25, sinks=sinks)
    causal = _additive(torch.ones(6, 6, dtype=torch.bool, device=device).tril())
    theirs, _ = eager_attention_forward(module, q, k, v, causal, scaling=0.25, sinks=sinks)
    assert kernel_calls == []
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_head_dims_over_512_run_the_models_eager_attention(device: str, kernel_calls: list[dict]) -> None:
    """MLA's absorbed keys are 576 wide: more than the kernels take, so the call runs the model's
    eager attention (warned once) instead of raising; 512 itself runs on the kernels."""
    from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=576)
    module = LlamaAttention(config, 0).to(device)
    gen = torch.Generator().manual_seed(0)
    for head_dim, on_kernels in ((512, True), (576, False)):
        q, k, v = (torch.randn(1, 2, 5, head_dim, generator=gen).to(device) for _ in range(3))
        fused_attn.hf._WARNED.clear()
        before = len(kernel_calls)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.1)
        theirs, _ = eager_attention_forward(module, q, k, v, _additive(torch.ones(5, 5, dtype=torch.bool,
                                                                                   device=device).tril()), scaling=0.1)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        assert (len(kernel_calls) > before) == on_kernels
        assert any("a head dim of 576" in str(w.message) for w in caught) == (not on_kernels)


@pytest.mark.parametrize("name", ["block_indices", "head_mask", "a_future_argument"])
def test_keyword_arguments_nobody_applies_raise(name: str, device: str, kernel_calls: list[dict]) -> None:
    """A keyword argument that neither the kernels nor the model's eager function apply (MiniMax-M3's
    `block_indices` is folded into the mask by the model only under eager and SDPA) cannot be
    served exactly: an error naming it, never a silent drop."""
    module = transformers.models.llama.modeling_llama.LlamaAttention(_llama_config(), 0).to(device)
    q, k, v = (torch.randn(1, 4, 5, 16, device=device) for _ in range(3))
    with pytest.raises(NotImplementedError, match=f"'{name}'.*attn_implementation='eager'"):
        fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25, **{name: torch.ones(1, device=device)})
    assert kernel_calls == []


def test_every_keyword_argument_transformers_passes_is_classified() -> None:
    """Each keyword argument a transformers model passes by name to its attention function is
    either ignored (changes nothing), served by the kernels, or one of the two that fall back or
    raise (tested above): a new one in a later transformers version fails here first."""
    import os
    import re

    models = os.path.join(os.path.dirname(transformers.__file__), "models")
    passed: dict[str, str] = {}
    for folder in sorted(os.listdir(models)):
        path = os.path.join(models, folder, f"modeling_{folder}.py")
        if not os.path.exists(path):
            continue
        source = open(path, encoding="utf-8").read()
        for call in re.finditer(r"\battention_interface\(", source):
            depth, end = 1, call.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(source[end], 0)
                end += 1
            body = source[call.end():end - 1]
            # Keyword names at the call's own nesting level.
            level, names = 0, []
            for match in re.finditer(r"[()\[\]{}]|\b(\w+)\s*=(?!=)", body):
                if match.group(1) is None:
                    level += 1 if match.group(0) in "([{" else -1
                elif level == 0:
                    names.append(match.group(1))
            for name in names:
                passed.setdefault(name, folder)
    contract = {"query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"}
    known = contract | fused_attn.hf.IGNORED_KWARGS | fused_attn.hf.SERVED_KWARGS | {"sinks", "block_indices"}
    assert len(passed) > 10
    assert {name: folder for name, folder in passed.items() if name not in known} == {}


@pytest.mark.parametrize("family", ["phimoe-window-in-mask", "doge-content-mask"])
def test_packed_sequences_apply_the_mask(family: str, device: str, kernel_calls: list[dict]) -> None:
    """Packed sequences with a mask: PhiMoE's sliding window lives only in the mask (no
    sliding_window argument), so the window is read from the mask and runs in attention_varlen;
    Doge's float mask depends on the content, so the packed row runs through the padded kernels
    with it. Both give eager's logits and gradients; before, the mask was ignored."""
    from tests.test_hf_models import reinitialise

    if family.startswith("phimoe"):
        model_class = transformers.PhimoeForCausalLM
        config = transformers.PhimoeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4)
    else:
        model_class = transformers.DogeForCausalLM
        config = transformers.DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         keep_window_size=4)
    fused, eager, _ = _twins(model_class, config, device)
    reinitialise(eager)
    fused.load_state_dict(eager.state_dict())
    fused.eval(), eager.eval()  # PhiMoE's router samples experts while training
    sequences = [torch.randint(0, 97, (length,)) for length in (5, 9, 3)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": seq.tolist()} for seq in sequences])
    batch = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}
    results = {name: _loss_step(model, batch, strict=name == "fused") for name, model in (("fused", fused),
                                                                                          ("eager", eager))}
    if family.startswith("phimoe"):  # the mask's window, W - 1 = 3 keys before each query
        assert [(c["varlen"], c["causal"], c["window"]) for c in kernel_calls] == [(True, True, (3, 0))] * 2
    else:
        assert [(c["varlen"], c["mask"]) for c in kernel_calls] == [(False, True)] * 2
    for i, (mine, theirs) in enumerate(zip(results["fused"], results["eager"])):
        scale = theirs.abs().max()
        assert (mine - theirs).abs().max() <= (1e-4 if i == 0 else 1e-3) * scale, i


def _own_attention_model(family: str):
    """Tiny models whose attention layers compute attention in their own code."""
    if family == "bloom":
        return transformers.BloomForCausalLM, transformers.BloomConfig(vocab_size=97, hidden_size=32, n_layer=2,
                                                                       n_head=2)
    if family == "mpt":
        return transformers.MptForCausalLM, transformers.MptConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2,
                                                                   max_seq_len=64)
    return transformers.FalconForCausalLM, transformers.FalconConfig(vocab_size=97, hidden_size=32,
                                                                     num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_models_that_compute_attention_themselves_refuse_fused_attn(family: str, tmp_path, device: str,
                                                                    kernel_calls: list[dict]) -> None:
    """transformers accepts any registered name without asking whether the model calls the
    attention interface; these models would then only get fused_attn's mask, which they misread
    (Bloom, MPT add a bool mask as a float one) or cannot look up (Falcon). register() makes
    _from_config and from_pretrained raise; set_attn_implementation keeps the model's own attention
    (transformers already refuses to switch these) and its logits. A model that a later transformers
    ports to the attention interface (Falcon in 5.25) must instead run on the kernels."""
    model_class, config = _own_attention_model(family)
    if not fused_attn.hf._computes_attention_itself(model_class.__module__):
        # transformers 5.25 ported Falcon to the attention interface: it then runs on the kernels.
        fused, eager, _ = _twins(model_class, config, device)
        ids = torch.randint(3, 97, (2, 9), device=device)
        torch.testing.assert_close(fused(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)
        assert kernel_calls
        return
    with pytest.raises(ValueError, match=f"{model_class.__name__} does not support attn_implementation=\"fused_attn\""):
        model_class._from_config(copy.deepcopy(config), attn_implementation="fused_attn")
    torch.manual_seed(0)
    model = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(device).eval()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="compute attention themselves"):
        model_class.from_pretrained(tmp_path, attn_implementation="fused_attn")
    ids = torch.randint(3, 97, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    before = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("fused_attn")
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert kernel_calls == []


def test_keys_past_the_queries_must_be_empty_static_cache_slots(device: str, kernel_calls: list[dict]) -> None:
    """A causal call with no mask and more keys than queries is served as the prefill of an empty
    static cache (its slots past the prompt are zeros, and no query sees them). Keys a model
    appended itself there (DeepSeek-V4's compressed keys) are not that: an error, not a guess."""
    module = _module(2, 2, causal=True)
    q = torch.randn(1, 2, 4, 16, device=device)
    k, v = (torch.cat([torch.randn(1, 2, 4, 16), torch.zeros(1, 2, 3, 16)], dim=2).to(device) for _ in range(2))
    out, _ = fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25)
    expected = reference.attention(q, k[:, :, :4], v[:, :, :4], causal=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    k[:, :, 5] = 1.0
    with pytest.raises(NotImplementedError, match="not empty slots"):
        fused_attn.hf.fused_attn_forward(module, q, k, v, None, scaling=0.25)
    assert [call["seq_k"] for call in kernel_calls] == [4]
