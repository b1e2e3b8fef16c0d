"""Many transformers architectures with attn_implementation="fused_attn" against "eager" on the
same weights: tiny configs (nothing downloaded), weights re-initialised so attention scores are
O(1) (the default 0.02 init makes softmax nearly uniform and would hide a wrong scale, softcap,
sink or bias). For each: logits (or the last hidden state) and every parameter gradient equal
eager's in float32 (relative 1e-4 and 1e-3), greedy generation gives eager's tokens and logits
with a dynamic and a static cache (where the model generates), and the calls ran on the kernels
(counted), or fell back to the model's eager attention with a warning where that is expected."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (CI installs it with the test extra)")

import fused_attn.hf  # noqa: E402

fused_attn.hf.register()
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

def _without(settings: dict, *names: str) -> dict:
    return {name: value for name, value in settings.items() if name not in names}


VOCAB = 97
# A decoder: 2 layers, 4 query heads of 16 sharing 2 key/value heads (GQA), hidden 32.
DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
MHA_DECODER = _without(DECODER, "num_key_value_heads", "head_dim") | {"num_attention_heads": 2}
SLIDING = {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}
MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
MLA = _without(DECODER, "head_dim") | {
    "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1}
GPT2_STYLE = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "resid_pdrop": 0.0,
              "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2}
ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
MODERNBERT = _without(ENCODER, "hidden_dropout_prob", "attention_probs_dropout_prob") | {
    "local_attention": 6, "layer_types": ["sliding_attention", "full_attention"]}
SEQ2SEQ = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
           "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
           "decoder_ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
           "forced_eos_token_id": None}
T5_STYLE = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
            "relative_attention_num_buckets": 8, "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 2,
            "decoder_start_token_id": 0}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 16, "patch_size": 4, "num_channels": 3}
AUDIO = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "conv_dim": (16, 16), "conv_stride": (5, 4), "conv_kernel": (10, 8), "num_conv_pos_embeddings": 8,
         "num_conv_pos_embedding_groups": 2, "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "feat_proj_dropout": 0.0, "apply_spec_augment": False}


@dataclass(frozen=True)
class Arch:
    """One architecture: `model` and `config` name transformers classes, built from `settings`;
    `inputs` says what it reads ("text", "seq2seq", "image", "audio", "features"); `runs_on` is
    "kernels" or a fragment of the warning of the fallback expected; `generate` whether greedy
    generation is checked."""
    name: str
    model: str
    config: str
    settings: dict = field(default_factory=dict)
    inputs: str = "text"
    runs_on: str = "kernels"
    generate: bool = True


ARCHS = [
    # Causal decoders: GQA, MQA, RoPE variants, q/k norms, windows, softcap, chunks, MoE, MLA.
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", DECODER),
    Arch("mistral-window", "MistralForCausalLM", "MistralConfig", {**DECODER, "sliding_window": 5}),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", DECODER),
    Arch("qwen3-qknorm", "Qwen3ForCausalLM", "Qwen3Config", DECODER),
    Arch("gemma2-softcap-window", "Gemma2ForCausalLM", "Gemma2Config",
         {**DECODER, **SLIDING, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
          "query_pre_attn_scalar": 16}),
    Arch("gemma3-window", "Gemma3ForCausalLM", "Gemma3TextConfig", {**DECODER, **SLIDING, "query_pre_attn_scalar": 16}),
    Arch("gemma4-window-d512", "Gemma4ForCausalLM", "Gemma4TextConfig",
         {**DECODER, **SLIDING, "global_head_dim": 512, "hidden_size_per_layer_input": 0,
          "vocab_size_per_layer_input": VOCAB}),  # its global layer has head dim 512
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config", GPT2_STYLE),
    Arch("gpt-bigcode-mqa", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", {**GPT2_STYLE, "multi_query": True}),
    Arch("gptj", "GPTJForCausalLM", "GPTJConfig", {**GPT2_STYLE, "rotary_dim": 8}),
    Arch("opt", "OPTForCausalLM", "OPTConfig",
         {"vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "max_position_embeddings": 64, "word_embed_proj_dim": 32, "dropout": 0.0, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2}),
    Arch("biogpt", "BioGptForCausalLM", "BioGptConfig", {**ENCODER, "bos_token_id": 1, "eos_token_id": 2}),
    Arch("stablelm", "StableLmForCausalLM", "StableLmConfig",
         _without(DECODER, "head_dim") | {"hidden_size": 64, "qk_layernorm": True}),
    Arch("persimmon", "PersimmonForCausalLM", "PersimmonConfig", MHA_DECODER),
    Arch("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", MHA_DECODER),
    Arch("nemotron", "NemotronForCausalLM", "NemotronConfig", DECODER),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", DECODER),
    Arch("olmo2", "Olmo2ForCausalLM", "Olmo2Config", DECODER),
    Arch("cohere2-window", "Cohere2ForCausalLM", "Cohere2Config", {**DECODER, **SLIDING}),
    Arch("starcoder2-window", "Starcoder2ForCausalLM", "Starcoder2Config", {**DECODER, "sliding_window": 5}),
    Arch("exaone4-window", "Exaone4ForCausalLM", "Exaone4Config", {**DECODER, **SLIDING}),
    Arch("modernbert-decoder-window", "ModernBertDecoderForCausalLM", "ModernBertDecoderConfig",
         {**MODERNBERT, "bos_token_id": 1, "eos_token_id": 2}),
    Arch("llama4-chunked", "Llama4ForCausalLM", "Llama4TextConfig",
         {**DECODER, **MOE, "intermediate_size_mlp": 64, "attention_chunk_size": 5, "no_rope_layers": [1, 0],
          "interleave_moe_layer_step": 2}),
    Arch("doge-dynamic-mask", "DogeForCausalLM", "DogeConfig", {**DECODER, "keep_window_size": 6}),
    Arch("mixtral-moe", "MixtralForCausalLM", "MixtralConfig", {**DECODER, **MOE}),
    Arch("qwen2-moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
         {**DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
          "shared_expert_intermediate_size": 32}),
    Arch("phimoe-window", "PhimoeForCausalLM", "PhimoeConfig", {**DECODER, **MOE, "sliding_window": 5}),
    Arch("jamba-hybrid", "JambaForCausalLM", "JambaConfig",
         {**DECODER, "num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
          "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 4, "mamba_dt_rank": 4,
          "use_mamba_kernels": False}),
    Arch("deepseek-v3-mla", "DeepseekV3ForCausalLM", "DeepseekV3Config", MLA),
    # Top-k sparse attention (`indices`) and attention sinks (`s_aux`).
    Arch("deepseek-v32-topk-indices", "DeepseekV32ForCausalLM", "DeepseekV32Config",
         {**MLA, "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2}),
    Arch("gpt-oss-sinks", "GptOssForCausalLM", "GptOssConfig", {**DECODER, **MOE, **SLIDING}),
    Arch("granite-swa-sinks", "GraniteSWAForCausalLM", "GraniteSWAConfig", {**DECODER, **SLIDING}),
    Arch("granitemoe-swa-sinks", "GraniteMoeSWAForCausalLM", "GraniteMoeSWAConfig",
         {**DECODER, **MOE, **SLIDING, "shared_intermediate_size": 32, "attention_multiplier": 0.3}),
    Arch("mimo-v2-flash-sinks", "MiMoV2FlashForCausalLM", "MiMoV2FlashConfig",
         {**DECODER, **SLIDING, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 32, "mlp_layer_types": ["dense", "sparse"]}),
    Arch("flint-sinks", "FlintForCausalLM", "FlintConfig",
         {**DECODER, **SLIDING, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
          "shared_expert_intermediate_size": 32}),
    # Encoders: bidirectional, padded; CLIP's text encoder is causal.
    Arch("bert", "BertModel", "BertConfig", ENCODER, generate=False),
    Arch("roberta", "RobertaModel", "RobertaConfig", {**ENCODER, "pad_token_id": 1}, generate=False),
    Arch("distilbert", "DistilBertModel", "DistilBertConfig",
         {"vocab_size": VOCAB, "dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2,
          "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 0},
         generate=False),
    Arch("electra", "ElectraModel", "ElectraConfig", {**ENCODER, "embedding_size": 32}, generate=False),
    Arch("modernbert-local", "ModernBertModel", "ModernBertConfig", MODERNBERT, generate=False),
    Arch("clip-text-causal", "CLIPTextModel", "CLIPTextConfig",
         {**_without(ENCODER, "hidden_dropout_prob", "attention_probs_dropout_prob"), "bos_token_id": 1,
          "eos_token_id": 2}, generate=False),
    # Encoder-decoders: cross-attention; T5's relative position bias, with MoE in Switch.
    Arch("bart", "BartForConditionalGeneration", "BartConfig", SEQ2SEQ, inputs="seq2seq"),
    Arch("marian", "MarianMTModel", "MarianConfig", SEQ2SEQ, inputs="seq2seq"),
    Arch("m2m100", "M2M100ForConditionalGeneration", "M2M100Config", SEQ2SEQ, inputs="seq2seq"),
    Arch("t5-bias", "T5ForConditionalGeneration", "T5Config", T5_STYLE, inputs="seq2seq"),
    Arch("mt5-bias", "MT5ForConditionalGeneration", "MT5Config", T5_STYLE, inputs="seq2seq"),
    Arch("umt5-bias", "UMT5ForConditionalGeneration", "UMT5Config", T5_STYLE, inputs="seq2seq"),  # a bias per layer
    Arch("switch-transformers-moe-bias", "SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
         {**T5_STYLE, "num_decoder_layers": 2, "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1,
          "num_experts": 4, "expert_capacity": 64}, inputs="seq2seq"),
    Arch("whisper-audio", "WhisperForConditionalGeneration", "WhisperConfig",
         {"vocab_size": VOCAB, "num_mel_bins": 8, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
          "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
          "max_source_positions": 8, "max_target_positions": 32, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2, "decoder_start_token_id": 3, "suppress_tokens": None, "begin_suppress_tokens": None},
         inputs="features"),
    # Vision and audio encoders.
    Arch("vit", "ViTModel", "ViTConfig", {**VISION, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
         inputs="image", generate=False),
    Arch("dinov2", "Dinov2Model", "Dinov2Config",
         {**VISION, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, inputs="image", generate=False),
    Arch("siglip-vision", "SiglipVisionModel", "SiglipVisionConfig", VISION, inputs="image", generate=False),
    Arch("clip-vision", "CLIPVisionModel", "CLIPVisionConfig", VISION, inputs="image", generate=False),
    Arch("wav2vec2", "Wav2Vec2Model", "Wav2Vec2Config", AUDIO, inputs="audio", generate=False),
    Arch("hubert", "HubertModel", "HubertConfig", {**AUDIO, "do_stable_layer_norm": True}, inputs="audio",
         generate=False),
]


def _build(arch: Arch, implementation: str) -> torch.nn.Module:
    config = getattr(transformers, arch.config)(**copy.deepcopy(arch.settings))
    return getattr(transformers, arch.model)._from_config(config, attn_implementation=implementation)


def reinitialise(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights that give O(1) activations and attention scores: every matrix std 1/sqrt(fan_in),
    embeddings (T5's relative bias included) std 1, sinks around 2 (near a row's lse, where a
    sink changes the output most)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding) and name == "weight":
                    std = 1.0
                elif name == "sinks":
                    param.copy_(2.0 + torch.randn(param.shape, generator=gen))
                    continue
                elif param.dim() < 2:
                    continue
                elif type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: (in, out)
                    std = param.shape[0] ** -0.5
                elif isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                    std = param[0].numel() ** -0.5
                else:  # stacked expert matrices and other parameters: the larger of the two last sides
                    std = max(param.shape[-1], param.shape[-2]) ** -0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _twins(arch: Arch) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same re-initialised weights under fused_attn and eager, in eval mode (no dropout)."""
    torch.manual_seed(0)
    eager = _build(arch, "eager")
    reinitialise(eager)
    fused = _build(arch, "fused_attn")
    fused.load_state_dict(eager.state_dict())
    return fused.eval(), eager.eval()


def _forward_inputs(arch: Arch, config) -> dict:
    """A batch of two, the second with its last token padded: the padded query still sees keys
    in every window and chunk, so no row is empty (eager gives an empty row uniform weights over
    all keys, the kernels zeros; such rows are padding that no real token reads)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    if arch.inputs == "text":
        return {"input_ids": ids, "attention_mask": mask}
    if arch.inputs == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask,
                "decoder_input_ids": torch.randint(3, VOCAB, (2, 6), generator=gen)}
    if arch.inputs == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    if arch.inputs == "audio":
        return {"input_values": torch.randn(2, 320, generator=gen)}
    if arch.inputs == "features":
        return {"input_features": torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=gen),
                "decoder_input_ids": torch.randint(3, VOCAB, (2, 6), generator=gen)}
    raise ValueError(arch.inputs)


def _main_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


class KernelCalls:
    """Counts the kernel calls (padded, packed and KV-cache) the integration makes."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("attention", "attention_varlen", "attention_with_kvcache"):
            original = getattr(fused_attn.hf, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(fused_attn.hf, name, counted)


def _run_checked(arch: Arch, calls: KernelCalls, run):
    """Runs `run()` under fused_attn, then checks where it ran: on the kernels with no fused_attn
    warning, or (runs_on names a fallback) with that warning."""
    fused_attn.hf._WARNED.clear()
    before = calls.count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    messages = [str(w.message) for w in caught if str(w.message).startswith("fused_attn")]
    if arch.runs_on == "kernels":
        assert not messages, messages
        assert calls.count > before, "no kernel call"
    else:
        assert any(arch.runs_on in message for message in messages), messages
    return result


def _assert_close(name: str, mine: torch.Tensor, theirs: torch.Tensor, rtol: float, floor: float = 0.0) -> None:
    """|mine - theirs| <= rtol * max(max|theirs|, floor), elementwise. The floor is for tensors
    that are exactly 0 in exact arithmetic (a key bias's gradient: softmax ignores a constant
    added to every score of a row), where float32 leaves noise of the size of the others."""
    scale = max(theirs.abs().max().item(), floor)
    error = (mine - theirs).abs().max().item()
    assert error <= rtol * scale, (name, error, scale)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: arch.name)
def test_logits_and_gradients_equal_eagers(arch: Arch, monkeypatch) -> None:
    """A padded batch: the output (logits or last hidden state) and the gradient of every
    parameter under a random linear loss equal eager's."""
    fused, eager = _twins(arch)
    calls = KernelCalls(monkeypatch)
    inputs = _forward_inputs(arch, eager.config)
    results = {}
    for name, model in (("eager", eager), ("fused", fused)):
        def forward_backward():
            output = _main_output(model(**inputs))
            probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
            (output * probe).sum().backward()
            return output.detach()
        results[name] = forward_backward() if name == "eager" else _run_checked(arch, calls, forward_backward)
    _assert_close("output", results["fused"], results["eager"], 1e-4)
    eager_grads = {name: param.grad for name, param in eager.named_parameters()}
    largest = max(grad.abs().max().item() for grad in eager_grads.values() if grad is not None)
    for name, param in fused.named_parameters():
        theirs = eager_grads[name]
        assert (param.grad is None) == (theirs is None), name
        if theirs is not None:
            _assert_close(name, param.grad, theirs, 1e-3, floor=1e-3 * largest)


def _generation_inputs(arch: Arch, config) -> dict:
    gen = torch.Generator().manual_seed(3)
    if arch.inputs == "features":
        return {"input_features": torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=gen)}
    ids = torch.randint(3, VOCAB, (1, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch.generate], ids=lambda arch: arch.name)
def test_greedy_generation_equals_eagers(arch: Arch, cache: str, monkeypatch) -> None:
    """Three greedy tokens after a prompt of seven: eager's tokens and logits (prefill without a
    mask, single-token steps; with a static cache, the prefill's empty slots and masked steps)."""
    fused, eager = _twins(arch)
    calls = KernelCalls(monkeypatch)
    inputs = _generation_inputs(arch, eager.config)
    settings = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_logits": True,
                "pad_token_id": 0}
    if cache == "static":
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        theirs = eager.generate(**inputs, **settings)
        mine = _run_checked(arch, calls, lambda: fused.generate(**inputs, **settings))
    assert torch.equal(mine.sequences, theirs.sequences)
    _assert_close("logits", torch.stack(mine.logits), torch.stack(theirs.logits), 1e-4)


# Models that record attention weights through transformers' output capturing without passing
# output_attentions down to the attention function; GPT-OSS's sinks make it run eager attention.
WEIGHTS = {"gpt2": "kernels", "gpt-bigcode-mqa": "kernels", "opt": "kernels", "stablelm": "kernels",
           "persimmon": "kernels", "nemotron": "kernels", "siglip-vision": "kernels", "t5-bias": "kernels",
           "gpt-oss-sinks": "attention weights requested with attention sinks"}


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch.name in WEIGHTS], ids=lambda arch: arch.name)
def test_attention_weights_equal_eagers(arch: Arch, monkeypatch) -> None:
    """output_attentions=True returns eager's weights: from the kernels' lse (fused_attn's
    attention_probs), or from the eager function a fallback runs."""
    fused, eager = _twins(arch)
    calls = KernelCalls(monkeypatch)
    inputs = _forward_inputs(arch, eager.config)
    with torch.no_grad():
        theirs = eager(**inputs, output_attentions=True)
        mine = _run_checked(replace(arch, runs_on=WEIGHTS[arch.name]), calls,
                            lambda: fused(**inputs, output_attentions=True))
    names = [name for name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
             if getattr(theirs, name, None)]
    assert names
    for name in names:
        assert len(getattr(mine, name) or ()) == len(getattr(theirs, name)) > 0, name
        for layer, (m, t) in enumerate(zip(getattr(mine, name), getattr(theirs, name))):
            assert m.shape == t.shape and m.dtype == t.dtype, (name, layer)
            _assert_close(f"{name} {layer}", m, t, 1e-4)


PACKED_ARCHS = [arch for arch in ARCHS if arch.inputs == "text" and arch.generate]
_PACKED_IDS = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(3))
_PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]])  # three sequences in one row


def run_packed(model: torch.nn.Module) -> tuple[torch.Tensor, str]:
    """The model's logits on one row packed by position_ids alone (DataCollatorWithFlattening's
    default), and how fused_attn served it, as the table in docs/hf-architectures.md says it."""
    from unittest import mock

    from transformers import masking_utils

    found, varlen, dense = [], [], []
    find, sdpa, run_varlen = (masking_utils.find_packed_sequence_indices, masking_utils.sdpa_mask,
                              fused_attn.hf.attention_varlen)
    with mock.patch.object(masking_utils, "find_packed_sequence_indices",
                           lambda p: found.append(find(p) is not None) or find(p)), \
         mock.patch.object(masking_utils, "sdpa_mask", lambda *a, **k: dense.append(1) or sdpa(*a, **k)), \
         mock.patch.object(fused_attn.hf, "attention_varlen", lambda *a, **k: varlen.append(1) or run_varlen(*a, **k)):
        logits = model(input_ids=_PACKED_IDS, position_ids=_PACKED_POSITIONS, use_cache=False).logits
    if not any(found):
        outcome = "not packed by the model (eager neither)"
    elif varlen and not dense:
        outcome = "attention_varlen, no S x S mask"
    elif varlen:
        outcome = "attention_varlen; dense mask for some layers"
    else:
        outcome = "dense mask, exact"
    return logits, outcome


@pytest.mark.parametrize("arch", PACKED_ARCHS, ids=lambda arch: arch.name)
def test_packing_by_position_ids_equals_eagers(arch: Arch, monkeypatch) -> None:
    """Three sequences packed into one row by position_ids alone: logits equal eager's (which
    builds the packed mask) and the calls ran on the kernels; models that hand the mask to the
    attention function untouched run attention_varlen."""
    from fused_attn._hf_packing import mask_handling

    fused, eager = _twins(arch)
    theirs = eager(input_ids=_PACKED_IDS, position_ids=_PACKED_POSITIONS, use_cache=False).logits
    mine, outcome = _run_checked(arch, KernelCalls(monkeypatch), lambda: run_packed(fused))
    _assert_close("logits", mine, theirs, 1e-4)
    if mask_handling(type(fused.config))[0] and "not packed" not in outcome and "chunked" not in arch.name:
        assert outcome.startswith("attention_varlen"), outcome


# What each architecture's name says it exercises, for the table in docs/hf-architectures.md.
_EXERCISES = {
    "window": "sliding window", "softcap": "logit softcap", "qknorm": "q/k norm", "mqa": "MQA",
    "chunked": "chunked attention", "dynamic": "content-dependent float mask", "moe": "MoE",
    "hybrid": "Mamba hybrid", "mla": "MLA (v head dim 8, qk 16)", "topk": "top-k `indices`",
    "sinks": "attention sinks (`s_aux`)", "local": "local window", "causal": "causal encoder",
    "bias": "relative position bias", "audio": "audio", "swa": "sliding window", "d512": "head dim 512",
}
_KINDS = {"text": "decoder", "seq2seq": "encoder-decoder", "image": "vision encoder", "audio": "audio encoder",
          "features": "encoder-decoder (audio)"}


def architecture_table() -> str:
    """The markdown table of ARCHS: where forward and backward run, whether generation is
    checked, and how sequences packed by position_ids run (fused_attn._hf_packing)."""
    rows = ["| architecture | class | kind | exercises | forward + backward | generation (dynamic, static cache) "
            "| packed by position_ids |", "|---|---|---|---|---|---|---|"]
    for arch in ARCHS:
        features = [_EXERCISES[word] for word in arch.name.split("-")[1:] if word in _EXERCISES]
        heads, heads_kv = arch.settings.get("num_attention_heads"), arch.settings.get("num_key_value_heads")
        if heads and heads_kv and heads_kv < heads and "MQA" not in features:
            features.insert(0, "GQA")
        exercises = ", ".join(dict.fromkeys(features)) or "-"
        kind = _KINDS[arch.inputs] if arch.inputs != "text" or arch.generate else "encoder"
        where = "kernels" if arch.runs_on == "kernels" else f"eager fallback ({arch.runs_on})"
        generation = "kernels, equal tokens" if arch.generate else "-"
        packed = "-"
        if arch in PACKED_ARCHS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                packed = run_packed(_twins(arch)[0])[1]
        rows.append(f"| {arch.name} | {arch.model} | {kind} | {exercises} | {where} | {generation} | {packed} |")
    return "\n".join(rows)


def test_the_architecture_table_in_the_docs_is_current() -> None:
    """docs/hf-architectures.md shows this file's ARCHS (regenerate: python -m tests.test_hf_models)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "hf-architectures.md").read_text()
    assert architecture_table() in text, "stale: run python -m tests.test_hf_models > table and paste it"
    assert len(ARCHS) >= 40


if __name__ == "__main__":
    print(architecture_table())
