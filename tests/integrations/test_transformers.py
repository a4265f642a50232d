"""flashattn.integrations.transformers: tiny random-weight models built in code (no download), run with
attn_implementation=ATTN_IMPLEMENTATION against transformers' own "eager" and "sdpa".

Numbers follow the suite's error rule (tests/errors.py): float32 logits and gradients against a float64
model, within a small factor of the float32 eager (and SDPA) model's own error. The float64 model is
"sdpa": eager's softmax runs in float32 (`dtype=torch.float32` in the models' eager_attention_forward),
where float64's most negative mask value is -inf, so a fully masked row (a left-padded query) is NaN
and spreads to the real tokens in the next layer (0 x NaN). Padded positions are compared nowhere:
their outputs are undefined (eager attends a fully masked row uniformly, the varlen path writes zeros
there) and the loss ignores them. Most cases run the PyTorch path; one small case runs the Triton
kernels (under the interpreter on a CPU).
"""
import copy
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (AttentionInterface, AutoModelForCausalLM, AutoModelForSeq2SeqLM, Gemma2Config,  # noqa: E402
                          GPT2Config, T5Config,
                          LlamaConfig, MistralConfig, Qwen2Config)
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from errors import assert_within_factor  # noqa: E402
from flashattn.integrations import transformers as fa_hf  # noqa: E402

NAME = fa_hf.ATTN_IMPLEMENTATION
VOCAB = 97
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def llama_gqa():
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **TOKENS)


def gpt2():
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **TOKENS)


def qwen2_sliding():
    # layer_types: the first max_window_layers layers attend fully, the rest through the window
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                       max_window_layers=1, max_position_embeddings=64, **TOKENS)


def mistral_sliding():
    return MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=5, max_position_embeddings=64,
                         **TOKENS)


CONFIGS = {"llama-gqa": llama_gqa, "gpt2": gpt2, "qwen2-sliding": qwen2_sliding, "mistral-sliding": mistral_sliding}
SEQLEN = 12
LENGTHS = (12, 9, 4)   # real tokens per row: one full row, two padded; the windows are 4 and 5 tokens


@pytest.fixture(autouse=True)
def reference_backend(use_backend):
    use_backend("reference")   # the Triton kernels under the interpreter are slow: one test below runs them


def build(config, attn_implementation: str, dtype=torch.float32):
    """The model with seed-0 weights (the same for every implementation). from_config writes the
    implementation into the config it is given, hence the copy."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def batch(padding: str, seqlen: int = SEQLEN, lengths=LENGTHS):
    """Token ids (batch, seqlen) and the attention mask, 1 = a real token; padding "none": every row full."""
    if padding == "none":
        lengths = (seqlen,) * len(lengths)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen))
    positions, lengths = torch.arange(seqlen), torch.tensor(lengths)[:, None]
    real = positions >= seqlen - lengths if padding == "left" else positions < lengths
    return ids.masked_fill(~real, TOKENS["pad_token_id"]), real.long()


def test_registered_under_a_name_transformers_does_not_route_elsewhere():
    assert "flash" not in NAME
    try:   # transformers 5's test of "a flash-attention name" (4.x had none)
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:
        pass
    else:
        assert not is_flash_attention_requested(requested_attention_implementation=NAME)
    assert AttentionInterface._global_mapping[NAME] is fa_hf.attention_forward
    assert AttentionMaskInterface._global_mapping[NAME] is fa_hf.attention_mask_function
    with pytest.raises(ValueError, match="flash"):
        fa_hf.register("flashattn_triton")


def test_flashattn_itself_does_not_import_transformers():
    code = "import sys, flashattn, flashattn.nn, flashattn.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_config_calls_our_function(monkeypatch):
    calls = []
    original = fa_hf.attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, spy)
    model = build(llama_gqa(), NAME)
    assert model.config._attn_implementation == NAME
    ids, mask = batch("left")
    model(input_ids=ids, attention_mask=mask)
    assert len(calls) == model.config.num_hidden_layers
    assert all(m is not None and m.dim() == 2 and m.dtype == torch.bool for m in calls)   # the varlen path


def masked_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]   # (real tokens, vocab)


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("name", CONFIGS)
def test_padded_logits_match_eager_and_sdpa(name, padding):
    config = CONFIGS[name]()
    ids, mask = batch(padding)
    ref64 = masked_logits(build(config, "sdpa", torch.float64), ids, mask)
    ours = masked_logits(build(config, NAME), ids, mask)
    for other in ("eager", "sdpa"):
        same_dtype = masked_logits(build(config, other), ids, mask)
        assert_within_factor("out", ours, same_dtype, ref64, torch.float32, head_dim(config))


@pytest.mark.parametrize("name", ["qwen2-sliding", "mistral-sliding"])
def test_the_window_is_in_force(name):
    """The sliding-window configs above do restrict attention at these lengths: widening the window past
    the sequence changes eager's logits, so the match above is a match of windowed attention."""
    config = CONFIGS[name]()
    assert "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
    unwindowed = copy.deepcopy(config)
    unwindowed.sliding_window = 10 * SEQLEN
    ids, mask = batch("right")
    windowed = masked_logits(build(config, "eager"), ids, mask)
    full = masked_logits(build(unwindowed, "eager"), ids, mask)
    assert (windowed - full).abs().max() > 1e-3
    assert (masked_logits(build(config, NAME), ids, mask) - windowed).abs().max() < 1e-4


def parameter_grads(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)   # the loss over real tokens only
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "qwen2-sliding"])
def test_gradients_match_eager(name, padding):
    """Training: the padded batch through the varlen path (forward and backward)."""
    config = CONFIGS[name]()
    ids, mask = batch(padding)
    ref64 = parameter_grads(build(config, "sdpa", torch.float64), ids, mask)
    eager = parameter_grads(build(config, "eager"), ids, mask)
    ours = parameter_grads(build(config, NAME), ids, mask)
    assert ours.keys() == eager.keys() == ref64.keys() and len(ours) > 0
    for n in ref64:
        assert_within_factor("dparam", ours[n], eager[n], ref64[n], torch.float32, head_dim(config))


def greedy(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, **kwargs)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generate_matches_eager(name):
    """Left-padded prompts, decoded through transformers' DynamicCache (a sliding-window layer's cache
    keeps only the window): each step a one-token query against the cached keys."""
    config = CONFIGS[name]()
    ids, mask = batch("left")
    expected = greedy(build(config, "eager"), ids, mask)
    assert expected.shape[1] > SEQLEN
    assert torch.equal(greedy(build(config, NAME), ids, mask), expected)


def chunked_logits(model, ids, mask, split: int):
    """Prefill in two chunks through a DynamicCache: the second chunk's queries (several, padded ones
    among them) against the cached keys and their own."""
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name still works, deprecated)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: transformers.DynamicCache(config=model.config)}
    with torch.no_grad():
        model(input_ids=ids[:, :split], attention_mask=mask[:, :split], use_cache=True, **cache)
        second = model(input_ids=ids[:, split:], attention_mask=mask, use_cache=True, **cache)
    return second.logits[mask[:, split:].bool()]


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-sliding"])
def test_multi_token_query_against_a_cache(name, padding):
    config = CONFIGS[name]()
    ids, mask = batch(padding)
    ref64 = chunked_logits(build(config, "sdpa", torch.float64), ids, mask, 7)
    ours = chunked_logits(build(config, NAME), ids, mask, 7)
    assert_within_factor("out", ours, chunked_logits(build(config, "eager"), ids, mask, 7), ref64, torch.float32,
                         head_dim(config))


def test_generate_with_a_static_cache():
    """A StaticCache hands the attention all its slots, the unused ones included: the mask function's
    2D mask is shorter than the keys, and the slots past it are dropped."""
    config = llama_gqa()
    ids, mask = batch("left")
    expected = greedy(build(config, "eager"), ids, mask, cache_implementation="static")
    assert torch.equal(greedy(build(config, NAME), ids, mask, cache_implementation="static"), expected)


def test_a_static_cache_without_a_mask():
    """No padding mask at all: the keys' unused StaticCache slots are dropped all the same."""
    config = llama_gqa()
    ids, _ = batch("right")
    logits = []
    for implementation in ("eager", NAME):
        model = build(config, implementation)
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            model(input_ids=ids[:, :7], use_cache=True, **{name: cache})
            logits.append(model(input_ids=ids[:, 7:], use_cache=True, **{name: cache}).logits)
    assert (logits[0] - logits[1]).abs().max() < 1e-5


def test_gemma2_softcap_and_alternating_window():
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          attn_logit_softcapping=2.0, final_logit_softcapping=None, query_pre_attn_scalar=16,
                          **TOKENS)
    # SDPA has no softcap, and float64 eager gives NaN past a fully masked row (module docstring): the
    # float64 reference runs each sequence alone, unpadded (right padding: the same positions).
    ids, mask = batch("right")
    eager64 = build(config, "eager", torch.float64)
    with torch.no_grad():
        ref64 = torch.cat([eager64(input_ids=row[:n][None]).logits[0] for row, n in zip(ids, LENGTHS)])
    ours = masked_logits(build(config, NAME), ids, mask)
    assert_within_factor("out", ours, masked_logits(build(config, "eager"), ids, mask), ref64, torch.float32, 16)
    ids, mask = batch("left")
    assert torch.equal(greedy(build(config, NAME), ids, mask), greedy(build(config, "eager"), ids, mask))


def test_t5_position_bias():
    """T5 passes its relative position bias as `position_bias` (an additive bias with a gradient: the
    bucket table's): encoder (bidirectional, padded), decoder (causal) and cross-attention, logits and
    every parameter's gradient against eager and float64 SDPA, and seq2seq greedy generation."""
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      dropout_rate=0.0, decoder_start_token_id=0, **TOKENS)

    def seq2seq(implementation, dtype=torch.float32):
        torch.manual_seed(0)
        return AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation=implementation).to(dtype)

    ids, mask = batch("left")
    targets = ids[:, :6]

    def run(model):
        """Logits of the decoder's real positions and every parameter's gradient of their loss."""
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:7].reshape(-1)).backward()
        return logits, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run(seq2seq("sdpa", torch.float64))
    eager_logits, eager_grads = run(seq2seq("eager"))
    logits, grads = run(seq2seq(NAME))
    assert_within_factor("out", logits, eager_logits, ref_logits, torch.float32, 16)
    assert grads.keys() == eager_grads.keys() and any("relative_attention_bias" in n for n in grads)
    for n in grads:
        assert_within_factor("dparam", grads[n], eager_grads[n], ref_grads[n], torch.float32, 16)
    with torch.no_grad():
        expected = seq2seq("eager").eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(seq2seq(NAME).eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                           do_sample=False), expected)


def test_patterns_beyond_padding_take_the_dense_mask():
    """Sequences packed in one row (position_ids restart, no cache): transformers' mask function is no
    plain causal one, so the mask function builds the dense mask, which the attention takes as attn_bias;
    so does a 4D mask given to the model. And flash-attention's cu_seq_lens keywords take the varlen path."""
    config = llama_gqa()
    eager, ours = build(config, "eager"), build(config, NAME)
    starts = (0, 5, 8, 15)
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, starts[-1]))
    positions = torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:])])[None]
    with torch.no_grad():
        separate = torch.cat([eager(input_ids=ids[:, a:b]).logits for a, b in zip(starts, starts[1:])], dim=1)
        packed = ours(input_ids=ids, position_ids=positions, use_cache=False).logits
        cu = torch.tensor(starts, dtype=torch.int32)
        varlen = ours(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                      max_length_k=7).logits
        assert (packed - separate).abs().max() < 1e-5 and (varlen - separate).abs().max() < 1e-5

        ids, _ = batch("right")
        allowed = torch.ones(len(LENGTHS), 1, SEQLEN, SEQLEN, dtype=torch.bool).tril()
        allowed[1, :, :, 2] = False                                      # a hole: no 2D mask says this
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        expected = eager(input_ids=ids, attention_mask=additive).logits
        assert (ours(input_ids=ids, attention_mask=additive).logits - expected).abs().max() < 1e-5
        assert (ours(input_ids=ids, attention_mask=allowed).logits - expected).abs().max() < 1e-5


def attention_layer(config=None):
    model = build(config or llama_gqa(), NAME)
    return model.model.layers[0].self_attn


def test_sinks_raise_and_output_attentions_warns():
    layer = attention_layer()
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="sinks"):
        fa_hf.attention_forward(layer, q, k, k, None, s_aux=torch.zeros(4))
    fa_hf._warned_output_attentions = False
    with pytest.warns(UserWarning, match="attention weights"):
        out, weights = fa_hf.attention_forward(layer, q, k, k, None, output_attentions=True)
    assert weights is None and out.shape == (1, 3, 4, 16)


def test_dropout_only_in_training():
    layer = attention_layer()
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    plain, _ = fa_hf.attention_forward(layer, q, k, v, None)
    evaluated, _ = fa_hf.attention_forward(layer, q, k, v, None, dropout=0.5)   # module.eval(): no dropout
    assert torch.equal(plain, evaluated)
    layer.train()
    torch.manual_seed(3)
    dropped, _ = fa_hf.attention_forward(layer, q, k, v, None, dropout=0.5)
    torch.manual_seed(3)
    again, _ = fa_hf.attention_forward(layer, q, k, v, None, dropout=0.5)
    assert not torch.allclose(dropped, plain) and torch.equal(dropped, again)


def test_value_head_dim_differs():
    """MLA-style layers: v's head dim differs from q's; the output has v's."""
    layer = attention_layer()
    q, k = torch.randn(2, 4, 5, 24, dtype=torch.float64), torch.randn(2, 2, 5, 24, dtype=torch.float64)
    for dv in (16, 32):
        v = torch.randn(2, 2, 5, dv, dtype=torch.float64)
        out, _ = fa_hf.attention_forward(layer, q, k, v, None, scaling=0.3)
        kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        expected = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=causal, scale=0.3)
        torch.testing.assert_close(out, expected.transpose(1, 2))


def test_triton_kernels(use_backend, device):
    """One small case through the Triton kernels (on a CUDA device, or the interpreter on a CPU): a
    left-padded GQA batch's logits and gradients against eager, and greedy decoding."""
    use_backend("triton")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, **TOKENS)
    ids, mask = (x.to(device) for x in batch("left", seqlen=8, lengths=(8, 5)))
    eager, ours = build(config, "eager").to(device), build(config, NAME).to(device)
    ref64 = build(config, "sdpa", torch.float64).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_within_factor("out", masked_logits(ours, ids, mask), masked_logits(eager, ids, mask),
                             masked_logits(ref64, ids, mask), torch.float32, 8)
        grads, eager_grads, grads64 = (parameter_grads(m, ids, mask) for m in (ours, eager, ref64))
        for n in grads64:
            assert_within_factor("dparam", grads[n], eager_grads[n], grads64[n], torch.float32, 8)
        expected = eager.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4)
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4),
                           expected)
