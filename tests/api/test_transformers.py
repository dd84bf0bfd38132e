"""spattn inside Hugging Face transformers: ``attn_implementation="spattn"``.

Tiny randomly initialised models (``from_config``, fp32, CPU, no downloads) run once with
transformers' eager attention and once with spattn, on batches with left padding; the
logits must agree at every real token and greedy generation must produce the same tokens.
The masks themselves are compared with transformers' own ``sdpa_mask`` element by element.
The models run spattn's torch backend (the Triton kernels have their own tests); one test
runs the generated kernels under the interpreter.
"""
import inspect
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")

import spattn  # noqa: E402
from spattn.dsl.errors import SpattnInputError, SpattnParamError, SpattnSyntaxError  # noqa: E402
from spattn.integrations import transformers as sphf  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

VOCAB = 100
TOL = 1e-4            # max |spattn - eager| / max |eager| over the real tokens
# transformers releases differ in how they describe the queries to a mask function (since
# 5.x a length and an offset, before a cache_position tensor) and in whether packed
# sequences get their own positions (remap_positions_for_packed_sequence); spattn reads both.
QUERY_AS_LENGTH = "q_length" in inspect.signature(mu.sdpa_mask).parameters
REMAPS_PACKED = hasattr(mu, "remap_positions_for_packed_sequence")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on tiny models a second one only waits (and much longer on busy
    cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(config_class: str, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    kw.update(overrides)
    return getattr(transformers, config_class)(**kw)


CONFIGS = {
    "llama": lambda: tiny("LlamaConfig"),
    "mistral-w4": lambda: tiny("MistralConfig", sliding_window=4),
    # sliding, full, sliding; scores not softcapped here (the softcap test below), logits as configured
    "gemma2-w4-alternating": lambda: tiny("Gemma2Config", num_hidden_layers=3, sliding_window=4,
                                          query_pre_attn_scalar=16, attn_logit_softcapping=None),
    "gemma3-w4-alternating": lambda: tiny(
        "Gemma3TextConfig", num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # full, sliding
    "qwen2-w4": lambda: tiny("Qwen2Config", use_sliding_window=True, sliding_window=4,
                             max_window_layers=1),
    # chunked, full
    "llama4-chunk4": lambda: tiny("Llama4TextConfig", intermediate_size_mlp=128,
                                  attention_chunk_size=4, no_rope_layer_interval=2,
                                  num_local_experts=2, num_experts_per_tok=1, moe_layers=[]),
    # sliding, full; attention sinks (s_aux), randomised by model_of
    "gpt-oss-w4": lambda: tiny("GptOssConfig", sliding_window=4, num_local_experts=2,
                               num_experts_per_tok=1),
}
# hybrid layer types (attention beside a state-space block), where transformers has them
if hasattr(transformers, "FalconH1Config"):
    CONFIGS["falcon-h1-hybrid"] = lambda: tiny("FalconH1Config", mamba_d_ssm=32,
                                               mamba_n_heads=4, mamba_d_head=8)
if hasattr(transformers, "InklingTextConfig"):
    CONFIGS["inkling-hybrid-sliding-w4"] = lambda: tiny(
        "InklingTextConfig", sliding_window=4, layer_types=["hybrid_sliding", "hybrid"])


def model_of(config, seed=0):
    """A model with eager attention; ``use_spattn`` switches it in place (same weights).
    Attention sinks (GPT-OSS's per-head ``sinks`` logits) are drawn from N(0, 1), so that
    they weigh in the softmax as trained ones do."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.normal_()
    return model.eval()


def use_spattn(model, patterns=None):
    model.set_attn_implementation(sphf.NAME)
    sphf.set_patterns(model, patterns, backend="torch")
    return model


def use_eager(model):
    model.set_attn_implementation("eager")
    return model


def left_padded(lengths, L, seed=1):
    """``input_ids, attention_mask [B, L]``: ``L - lengths[b]`` padding tokens left of row b."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), L), generator=g)
    am = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, L - n:] = 1
        ids[b, : L - n] = 0
    return ids, am


def eager_then_decoded(model, lengths, L, *, seed, new, **generate):
    """Greedy ``generate`` of ``new`` tokens for left-padded prompts (:func:`left_padded`),
    with eager attention and then with spattn: ``(eager tokens, spattn tokens, the decode
    plans spattn's generation built)``."""
    from spattn.runtime import decode as dec
    ids, am = left_padded(lengths, L, seed=seed)
    kw = dict(attention_mask=am, max_new_tokens=new, do_sample=False, pad_token_id=0,
              **generate)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        use_spattn(model)
        dec.DECODE_PLANS.clear()
        out = model.generate(ids, **kw)
    return ref, out, list(dec.DECODE_PLANS._plans.values())


def rel_err(out, ref, sel):
    return float((out - ref)[sel].abs().max() / ref[sel].abs().max())


@torch.no_grad()
def logits(model, ids, **kw):
    return model(input_ids=ids, **kw).logits


# ------------------------------------------------------------------- the masks themselves

KINDS = {            # kind -> transformers' mask function for a window or chunk of n
    "causal": lambda n: mu.causal_mask_function,
    "sliding": lambda n: mu.sliding_window_causal_mask_function(n),
    "full": lambda n: mu.bidirectional_mask_function,
    "chunked": None,
}
if hasattr(mu, "sliding_window_bidirectional_mask_function"):
    KINDS["local"] = lambda n: mu.sliding_window_bidirectional_mask_function(n)


def queries(Lq, q_offset):
    """transformers' way of naming the query positions to a mask function."""
    if QUERY_AS_LENGTH:
        return dict(q_length=Lq, q_offset=q_offset)
    return dict(cache_position=torch.arange(q_offset, q_offset + Lq))


def spattn_dense(base, mask, Lq, Lk):
    pat, inputs, q_offset = sphf.plan_call(base, mask, Lq, Lk)
    return pat.mask(Lq, Lk, batch=mask.batch_size, q_offset=q_offset, **inputs)[:, 0]


@settings(max_examples=80)
@given(kind=st.sampled_from(sorted(KINDS)), n=st.integers(1, 5), B=st.integers(1, 3),
       Lq=st.integers(1, 6), extra=st.integers(0, 6), kv_offset=st.integers(0, 5),
       shift=st.integers(0, 6), short=st.integers(0, 2), data=st.data())
def test_masks_equal_transformers_sdpa_mask(kind, n, B, Lq, extra, kv_offset, shift, short, data):
    """Every element of spattn's mask equals transformers' for the same call: window and chunk
    bounds, left padding, keys past the padding mask, cache offsets (dynamic, sliding-window
    and static caches: the query row 0 need not sit at ``Lk - Lq``)."""
    Lk = Lq + extra
    q_offset = kv_offset + data.draw(st.integers(0, extra), label="q_offset - kv_offset")
    total = max(q_offset + Lq, kv_offset + Lk - short)     # the padding mask covers the queries
    am = torch.ones(B, total, dtype=torch.bool)
    for b in range(B):
        pad = data.draw(st.integers(0, min(shift, total)), label=f"left padding of row {b}")
        am[b, :pad] = False
        if data.draw(st.booleans(), label=f"a hole in row {b}") and total > pad + 1:
            am[b, data.draw(st.integers(pad, total - 1), label="hole")] = False
    if kind == "chunked":
        left = (am.long().cumsum(-1) == 0).sum(-1)
        fn = mu.chunked_causal_mask_function(n, left)
    else:
        fn = KINDS[kind](n)
    want = mu.sdpa_mask(batch_size=B, **queries(Lq, q_offset), kv_length=Lk,
                        kv_offset=kv_offset, mask_function=fn, attention_mask=am,
                        allow_is_causal_skip=False)[:, 0]
    mask = sphf.spattn_mask(batch_size=B, **queries(Lq, q_offset), kv_length=Lk,
                            kv_offset=kv_offset, mask_function=fn, attention_mask=am)
    expect_kind = (kind,) if kind in ("causal", "full") else (kind, n)
    assert mask.kind == expect_kind and not mask.unreadable
    base = spattn.compile(sphf._kind_source(mask.kind), backend="torch")
    assert torch.equal(spattn_dense(base, mask, Lq, Lk), want)


@settings(max_examples=30)
@given(kind=st.sampled_from(["causal", "sliding", "chunked"]), n=st.integers(1, 4),
       lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), B=st.integers(1, 2),
       start=st.integers(0, 3))
def test_packed_masks_equal_transformers(kind, n, lengths, B, start):
    """Packed sequences (position ids restarting per sequence): transformers ands the
    sequence ids and remaps the positions of its mask function to the position ids."""
    L = sum(lengths)
    position_ids = torch.cat([torch.arange(start, start + m) if i == 0 else torch.arange(m)
                              for i, m in enumerate(lengths)])[None].expand(B, -1)
    seq = mu.find_packed_sequence_indices(position_ids)
    if kind == "chunked":
        base_fn = mu.chunked_causal_mask_function(n, torch.zeros(B, dtype=torch.long))
    elif kind == "sliding":
        base_fn = mu.sliding_window_causal_mask_function(n)
    else:
        base_fn = mu.causal_mask_function
    fn = base_fn
    if seq is not None:
        if REMAPS_PACKED:
            fn = mu.remap_positions_for_packed_sequence(base_fn, position_ids)
        fn = mu.and_masks(fn, mu.packed_sequence_mask_function(seq))
    want = mu.sdpa_mask(batch_size=B, **queries(L, 0), kv_length=L, mask_function=fn,
                        allow_is_causal_skip=False)[:, 0]
    mask = sphf.spattn_mask(batch_size=B, **queries(L, 0), kv_length=L, mask_function=fn)
    assert (mask.seg is not None) == (seq is not None)
    base = spattn.compile(sphf._kind_source(mask.kind), backend="torch")
    assert torch.equal(spattn_dense(base, mask, L, L), want)


BLOCKWISE = {        # transformers' compositions with block_sequence_ids (an image's tokens)
    "causal|blocks": lambda n, ids: mu.or_masks(mu.causal_mask_function,
                                                mu.blockwise_overlay(ids)),
    # Gemma 3's sliding layers: AND(sliding window, OR(causal, blocks))
    "(causal|blocks)&window": lambda n, ids: mu.and_masks(
        mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
        mu.sliding_window_overlay(n)),
    # create_sliding_window_causal_mask(block_sequence_ids=...): OR(sliding causal, blocks)
    "sliding|blocks": lambda n, ids: mu.or_masks(mu.sliding_window_causal_mask_function(n),
                                                 mu.blockwise_overlay(ids)),
}


@pytest.mark.skipif(not hasattr(mu, "blockwise_overlay"), reason="no block_sequence_ids")
@settings(max_examples=60)
@given(kind=st.sampled_from(sorted(BLOCKWISE)), n=st.integers(1, 5), B=st.integers(1, 3),
       Lq=st.integers(1, 6), extra=st.integers(0, 6), kv_offset=st.integers(0, 5),
       short_ids=st.integers(0, 3), data=st.data())
def test_blockwise_masks_equal_transformers_sdpa_mask(kind, n, B, Lq, extra, kv_offset,
                                                      short_ids, data):
    """Image tokens that attend to their whole image (``block_sequence_ids``, or'd with the
    causal or sliding mask): every element equals transformers' mask, with left padding,
    cache offsets and block ids shorter than the keys (padded with -1, as the models pad
    them)."""
    Lk = Lq + extra
    q_offset = kv_offset + data.draw(st.integers(0, extra), label="q_offset - kv_offset")
    total = max(q_offset + Lq, kv_offset + Lk)
    am = torch.ones(B, total, dtype=torch.bool)
    ids = torch.full((B, max(1, total - short_ids)), -1, dtype=torch.long)
    for b in range(B):
        am[b, :data.draw(st.integers(0, 3), label=f"left padding of row {b}")] = False
        at, block = 0, 0
        while at < ids.shape[1]:
            run = data.draw(st.integers(1, 4), label="run")
            if data.draw(st.booleans(), label="a block"):
                ids[b, at:at + run] = block
                block += 1
            at += run
    fn = BLOCKWISE[kind](n, mu.maybe_pad_block_sequence_ids(ids, am, Lk, kv_offset))
    want = mu.sdpa_mask(batch_size=B, **queries(Lq, q_offset), kv_length=Lk,
                        kv_offset=kv_offset, mask_function=fn, attention_mask=am,
                        allow_is_causal_skip=False)[:, 0]
    mask = sphf.spattn_mask(batch_size=B, **queries(Lq, q_offset), kv_length=Lk,
                            kv_offset=kv_offset, mask_function=fn, attention_mask=am)
    assert not mask.unreadable and mask.blockwise is not None
    assert mask.kind == (("causal",) if kind == "causal|blocks" else ("sliding", n))
    base = spattn.compile(mask.blockwise, backend="torch")
    assert torch.equal(spattn_dense(base, mask, Lq, Lk), want)


def test_unreadable_mask_functions_are_named():
    """A mask function spattn cannot read is named, and the mask carries transformers' own
    dense mask of the call (padding included); where transformers cannot build that either,
    none, and the layer's call is refused naming the functions."""
    custom = mu.or_masks(mu.causal_mask_function, lambda b, h, q, k: k < 2)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    mask = sphf.spattn_mask(batch_size=2, **queries(3, 3), kv_length=6, mask_function=custom,
                            attention_mask=am)
    assert mask.kind is None and "or_masks(causal_mask_function" in mask.unreadable[0]
    want = mu.sdpa_mask(batch_size=2, q_length=3, kv_length=6, q_offset=3, mask_function=custom,
                        attention_mask=am, allow_is_causal_skip=False)[:, 0].bool()
    assert mask.dense.shape == (2, 3, 6) and torch.equal(mask.dense, want)
    assert not mask.dense[1, :, :2].any() and mask.dense[0, 0, :2].all()

    def broken(b, h, q, k):
        raise RuntimeError("a function transformers cannot evaluate either")

    mask = sphf.spattn_mask(batch_size=1, **queries(4, 0), kv_length=4,
                            mask_function=mu.and_masks(mu.causal_mask_function, broken))
    assert mask.dense is None
    assert mask.unreadable[0].endswith("test_unreadable_mask_functions_are_named")
    module = model_of(CONFIGS["llama"]()).model.layers[0].self_attn
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(spattn.SpattnError, match=r"cannot read: .*test_unreadable_mask_funct"):
        sphf.spattn_attention_forward(module, q, k, k, mask)


# ------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_eager_with_left_padding(name):
    model = model_of(CONFIGS[name]())
    ids, am = left_padded([10, 7, 4], 10)
    ref = logits(model, ids, attention_mask=am)
    out = logits(use_spattn(model), ids, attention_mask=am)
    assert rel_err(out, ref, am.bool()) <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_matches_eager(name):
    """Greedy decoding with a KV cache: prompts longer than the window or chunk (4), so the
    sliding-window caches drop keys and the cache offsets move."""
    model = model_of(CONFIGS[name]())
    ids, am = left_padded([9, 6, 3], 9)
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        out = use_spattn(model).generate(ids, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["llama", "mistral-w4"])
def test_generate_with_a_static_cache(name):
    """A static cache hands every layer all its slots: the queries are not bottom-right."""
    model = model_of(CONFIGS[name]())
    ids, am = left_padded([7, 5], 7)
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        out = use_spattn(model).generate(ids, **kw)
    assert torch.equal(out, ref)


def packed_batch(lengths):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return ids, position_ids, cu


def one_by_one(model, ids, cu):
    return torch.cat([logits(model, ids[:, a:b]) for a, b in zip(cu[:-1], cu[1:])], dim=1)


@pytest.mark.parametrize("name", ["llama", "mistral-w4", "llama4-chunk4"])
def test_packed_sequences(name):
    """Position ids that restart (no cache, no padding mask): each sequence sees only itself,
    as with eager and as when the sequences run one by one (chunks restart with each
    sequence where transformers remaps packed positions)."""
    model = model_of(CONFIGS[name]())
    ids, position_ids, cu = packed_batch([4, 7, 5])
    ref = logits(model, ids, position_ids=position_ids, use_cache=False)
    alone = one_by_one(model, ids, cu)
    out = logits(use_spattn(model), ids, position_ids=position_ids, use_cache=False)
    every = torch.ones(out.shape[:2], dtype=torch.bool)
    assert rel_err(out, ref, every) <= TOL
    if REMAPS_PACKED or name != "llama4-chunk4":
        assert rel_err(out, alone, every) <= TOL


def loss_and_grads(model, ids, **kw):
    model.zero_grad()
    out = model(input_ids=ids, use_cache=False, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}


def test_training_gradients_match_eager():
    """Backward through spattn (packed sequences; left padding with a loss that reads only
    the logits of real tokens): the loss and every parameter's gradient as with eager."""
    model = model_of(CONFIGS["mistral-w4"]()).train()
    ids, position_ids, _ = packed_batch([4, 7, 5])
    padded, am = left_padded([8, 5], 8)
    labels = padded.masked_fill(am == 0, -100)
    labels[1, 8 - 5] = -100               # predicted by a padding position: not a real logit
    batches = [dict(ids=ids, position_ids=position_ids, labels=ids),
               dict(ids=padded, attention_mask=am, labels=labels)]
    want = [loss_and_grads(model, **b) for b in batches]
    use_spattn(model)
    for b, (loss_ref, grads_ref) in zip(batches, want):
        loss, grads = loss_and_grads(model, **b)
        assert abs(float(loss - loss_ref)) <= TOL * abs(float(loss_ref))
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert float((grads[name] - g).abs().max()) <= TOL * float(g.abs().max()), name


@pytest.mark.parametrize("name", ["mistral-w4", "gemma2-w4-alternating"])
def test_per_sample_gradients_with_torch_func_match_eager(name):
    """The torch.func recipe for per-sample gradients (``vmap(grad(loss))`` over the batch,
    ``functional_call`` of the model): every parameter's gradient for every sample as with
    eager attention."""
    from torch.func import functional_call, grad, vmap
    model = model_of(CONFIGS[name]())
    ids, _ = left_padded([7, 7, 7], 7, seed=4)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x):
        return functional_call(model, p, (x[None],), {"labels": x[None]}).loss

    want = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    use_spattn(model)
    got = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    for n, g in want.items():
        assert float((got[n] - g).abs().max()) <= TOL * float(g.abs().max()), n


def test_attention_sinks_train_like_eager():
    """GPT-OSS's attention sinks (``s_aux``): the loss and every gradient, the sink logits'
    included, as with eager, on a left-padded batch (sliding and full layers)."""
    model = model_of(CONFIGS["gpt-oss-w4"]()).train()
    padded, am = left_padded([8, 5], 8)
    labels = padded.masked_fill(am == 0, -100)
    labels[1, 8 - 5] = -100
    loss_ref, grads_ref = loss_and_grads(model, padded, attention_mask=am, labels=labels)
    assert any(n.endswith(".sinks") for n in grads_ref)
    loss, grads = loss_and_grads(use_spattn(model), padded, attention_mask=am, labels=labels)
    assert abs(float(loss - loss_ref)) <= TOL * abs(float(loss_ref))
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert float((grads[name] - g).abs().max()) <= TOL * float(g.abs().max()), name


def test_sinks_of_the_wrong_shape_are_refused():
    model = use_spattn(model_of(CONFIGS["gpt-oss-w4"]()))
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(3))
    ids, am = left_padded([4], 4)
    with pytest.raises(SpattnInputError, match=r"layer 0 passes s_aux= \(shape \(3,\) "
                                               r"torch.float32\): .* per query head, \[4\]"):
        logits(model, ids, attention_mask=am)


def test_packed_sequences_from_cu_seq_lens():
    """Flash-attention style ``cu_seq_lens_q/k`` mark the sequences when the mask does not."""
    model = model_of(CONFIGS["mistral-w4"]())
    ids, position_ids, cu = packed_batch([3, 8, 5])
    alone = one_by_one(model, ids, cu)
    use_spattn(model)
    out = logits(model, ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=8, max_length_k=8)
    assert rel_err(out, alone, torch.ones(out.shape[:2], dtype=torch.bool)) <= TOL
    bad = torch.tensor([0, 3, 9], dtype=torch.int32)           # ends before the 16 tokens
    with pytest.raises(SpattnInputError, match="cu_seq_lens_k"):
        logits(model, ids, position_ids=position_ids, cu_seq_lens_q=bad, cu_seq_lens_k=bad)


def test_bidirectional_config():
    """``config.is_causal = False``: transformers builds full masks with padding."""
    model = model_of(tiny("LlamaConfig", is_causal=False))
    ids, am = left_padded([8, 5], 8)
    ref = logits(model, ids, attention_mask=am)
    if torch.equal(ref, logits(model_of(tiny("LlamaConfig")), ids, attention_mask=am)):
        pytest.skip(f"transformers {transformers.__version__} ignores config.is_causal")
    out = logits(use_spattn(model), ids, attention_mask=am)
    assert sphf.layer_patterns(model)[0].pattern.source == "true"
    assert rel_err(out, ref, am.bool()) <= TOL


def test_encoder_attention_is_bidirectional():
    """An encoder's attention modules say ``is_causal = False`` (BERT, RoBERTa, ELECTRA):
    its layers run ``true``, with padding anywhere in the row."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, VOCAB, (3, 9))
    am = torch.ones_like(ids)
    am[0, 6:] = 0                                   # right padding
    am[2, :2] = 0                                   # left padding
    for kw, rows in ((dict(attention_mask=am), am.bool()), ({}, torch.ones_like(am).bool())):
        model.set_attn_implementation("eager")
        with torch.no_grad():
            ref = model(input_ids=ids, **kw).last_hidden_state
        model.set_attn_implementation(sphf.NAME)
        sphf.set_patterns(model, backend="torch")
        with torch.no_grad():
            out = model(input_ids=ids, **kw).last_hidden_state
        assert rel_err(out, ref, rows) <= TOL
    assert {lp.pattern.source for lp in sphf.layer_patterns(model)} == {"true"}


def test_an_encoder_generating_with_a_cache_reads_every_cached_key():
    """BERT's LM head with ``is_decoder=False`` under ``generate``: its bidirectional mask
    is built for the new token alone (transformers does not give that builder the cache),
    and eager reads every cached key. With a dynamic cache spattn does too (greedy tokens
    as eager's, with and without a padding mask); a static cache's prepared mask is causal,
    which the bidirectional model refuses by name."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     is_decoder=False)
    model = transformers.BertLMHeadModel(config).eval()
    ids, am = left_padded([6, 4], 6)
    whole = left_padded([6, 6], 6)[0]           # no pad token: generate builds no mask
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(input_ids=whole), dict(input_ids=ids, attention_mask=am)):
            gen = dict(max_new_tokens=4, do_sample=False, **kw)
            model.set_attn_implementation("eager")
            ref = model.generate(**gen)
            model.set_attn_implementation(sphf.NAME)
            sphf.set_patterns(model, backend="torch")
            assert torch.equal(model.generate(**gen), ref)
        with pytest.raises(spattn.SpattnError, match=r"asks for full \(bidirectional\).*"
                                                     r"static cache prepares a causal one"):
            model.generate(**gen, cache_implementation="static")


def test_cross_attention_reads_every_encoder_token():
    """GPT-2 with cross-attention: its self-attention is causal, its cross-attention
    (``is_causal = False``) reads every unpadded encoder token; logits and greedy
    generation match eager."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     add_cross_attention=True, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids, am = left_padded([7, 4], 7)
    enc = torch.randn(2, 5, 64)
    enc_mask = torch.ones(2, 5, dtype=torch.long)
    enc_mask[1, 3:] = 0
    kw = dict(attention_mask=am, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = logits(model, ids, **kw)
        ref_tokens = model.generate(ids, **kw, **gen)
        use_spattn(model)
        out = logits(model, ids, **kw)
        tokens = model.generate(ids, **kw, **gen)
    assert rel_err(out, ref, am.bool()) <= TOL
    assert torch.equal(tokens, ref_tokens)
    assert [lp.pattern.source for lp in sphf.layer_patterns(model)] == ["q >= k", "true"] * 2


@pytest.mark.skipif(not hasattr(transformers, "T5GemmaConfig"), reason="no T5Gemma")
def test_cross_attention_of_a_decoder_with_sliding_layers():
    """T5Gemma's cross-attention modules carry the decoder's ``layer_idx`` and
    ``layer_types``, whose sliding windows are the decoder's self-attention's: a
    cross-attention layer reads every unpadded encoder token whatever its index's type, and
    the logits and greedy generation match eager (T5Gemma has no SDPA path)."""
    mod = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
               query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
               pad_token_id=0)
    config = transformers.T5GemmaConfig(
        encoder=transformers.T5GemmaModuleConfig(**mod),
        decoder=transformers.T5GemmaModuleConfig(**mod), vocab_size=VOCAB, pad_token_id=0,
        bos_token_id=2, eos_token_id=1, decoder_start_token_id=2, dropout_rate=0.0,
        attention_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config,
                                                           attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    dec = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        ref_tokens = model.generate(ids, attention_mask=am, **gen)
        use_spattn(model)
        out = model(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        tokens = model.generate(ids, attention_mask=am, **gen)
    assert rel_err(out, ref, torch.ones(2, 6, dtype=torch.bool)) <= TOL
    assert torch.equal(tokens, ref_tokens)
    cross = [lp for lp in sphf.layer_patterns(model) if lp.layer_type == "cross_attention"]
    assert [lp.pattern.source for lp in cross] == ["true", "true"]


def test_messages_name_a_shared_layer_index_by_path():
    """Where an encoder, a decoder and its cross-attention share layer indices, a message
    names the layer by its module path, the key that reaches it alone."""
    torch.manual_seed(0)
    model = t5_model()
    model.set_attn_implementation(sphf.NAME)
    mods = sphf._attention_modules(model)
    assert len({sphf._where(m) for m in mods}) == len(mods)
    assert all(sphf._where(m).startswith("'") for m in mods)
    llama = model_of(tiny("LlamaConfig"))
    assert [sphf._where(m) for m in sphf._attention_modules(llama)] == ["0", "1"]


def _hidden(model, impl, **kw):
    model.set_attn_implementation(impl)
    if impl == sphf.NAME:
        sphf.set_patterns(model, backend="torch")
    with torch.no_grad():
        return model(**kw).last_hidden_state


def test_unnumbered_layers_without_a_mask():
    """A vision encoder (ViT): its attention modules have no ``layer_idx`` and transformers
    gives them no mask; every patch reads every patch, as in eager attention. The layers
    are numbered in the model's order, and an index override reaches them."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ref = _hidden(model, "eager", pixel_values=pixels)
    out = _hidden(model, sphf.NAME, pixel_values=pixels)
    assert rel_err(out, ref, torch.ones(ref.shape[:2], dtype=torch.bool)) <= TOL
    assert [(lp.layer_idx, lp.pattern.source) for lp in sphf.layer_patterns(model)] \
        == [(0, "true"), (1, "true")]
    sphf.set_patterns(model, {1: "abs(q - k) <= 2"}, backend="torch")
    assert [lp.origin for lp in sphf.layer_patterns(model)] == ["config", "override"]
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=pixels).last_hidden_state, ref, atol=1e-3)


def test_a_bool_layer_idx_is_not_a_layer_number():
    """A module whose ``layer_idx`` is a bool (an int to ``isinstance``) does not make the
    model's layers numbered: every layer is still found, numbered in the model's order."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=16, patch_size=8)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    mods = [m for m in model.modules() if type(m).__name__ == "ViTAttention"]
    mods[1].layer_idx = True
    assert [lp.layer_idx for lp in sphf.layer_patterns(model)] == [0, 1, 2]


def _right_padded_text_matches_eager(model, L: int, row: int, start: int):
    """Two rows of ``L`` tokens, row ``row`` padded from ``start`` on: spattn's hidden
    states match eager's at every real token."""
    ids = torch.randint(1, VOCAB, (2, L))
    am = torch.ones_like(ids)
    am[row, start:] = 0
    ref = _hidden(model, "eager", input_ids=ids, attention_mask=am)
    out = _hidden(model, sphf.NAME, input_ids=ids, attention_mask=am)
    assert rel_err(out, ref, am.bool()) <= TOL


def test_unnumbered_layers_with_padding():
    """DistilBERT's attention modules have no ``layer_idx``; right padding is a keep mask."""
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4,
                                           hidden_dim=128)
    _right_padded_text_matches_eager(transformers.DistilBertModel(config).eval(), 9, 1, 5)


def test_a_full_layer_follows_the_mask_transformers_builds():
    """CLIP's text model runs the attention module of its vision model (``is_causal =
    False``) under causal masks: a full-attention layer runs the mask transformers builds,
    causal or bidirectional, as eager attention does, and reports it."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128)
    model = transformers.CLIPTextModel(config).eval()
    _right_padded_text_matches_eager(model, 7, 0, 5)
    layers = sphf.layer_patterns(model)
    assert [(lp.layer_idx, lp.pattern.source, lp.mask_kind) for lp in layers] \
        == [(0, "q >= k", ("causal",)), (1, "q >= k", ("causal",))]


@pytest.mark.parametrize("field", ["sliding_window", "attention_chunk_size"])
def test_a_config_field_the_model_does_not_read_follows_the_mask(field):
    """A Llama config holding a ``sliding_window`` (or ``attention_chunk_size``) that Llama's
    code never reads: without ``layer_types`` spattn infers a sliding (chunked) layer, as
    transformers does for Mistral, but the model builds causal masks, and the layers run
    those, as eager attention does (logits and greedy generation), and report it."""
    model = model_of(tiny("LlamaConfig", **{field: 4}))
    ids, am = left_padded([10, 7, 4], 10)
    ref = logits(model, ids, attention_mask=am)
    assert rel_err(logits(use_spattn(model), ids, attention_mask=am), ref, am.bool()) <= TOL
    assert [(lp.pattern.source, lp.detail, lp.mask_kind) for lp in sphf.layer_patterns(model)] \
        == [("q >= k", "as transformers masks it", ("causal",))] * 2
    ref, out, _ = eager_then_decoded(use_eager(model), [9, 6, 3], 9, seed=2, new=5)
    assert torch.equal(out, ref)


def test_listed_layer_types_the_model_does_not_mask_are_refused():
    """Where ``config.layer_types`` names a layer's type and the mask the layer gets is of
    another kind, the call is refused naming both: the list is the model's own word, not
    spattn's guess."""
    model = use_spattn(model_of(tiny("Qwen2Config", use_sliding_window=True, sliding_window=4,
                                     max_window_layers=0)))
    module = model.model.layers[0].self_attn
    assert sphf.layer_patterns(model)[0].mask_kind == ("sliding", 4)
    mask = sphf.spattn_mask(batch_size=1, **queries(6, 0), kv_length=6,
                            mask_function=mu.causal_mask_function)
    q = torch.randn(1, 4, 6, 16)
    k = torch.randn(1, 2, 6, 16)
    with pytest.raises(spattn.SpattnError, match=r"layer 0 \(sliding_attention\): "
                       r"transformers masks this layer as causal"):
        sphf.spattn_attention_forward(module, q, k, k, mask)


def t5_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                   relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():                 # T5 initialises its bias table small: make it count
        for m in model.modules():
            if getattr(m, "has_relative_attention_bias", False):
                m.relative_attention_bias.weight.normal_(0, 2)
    return model


def _t5_generate(model, cache: str, **kw):
    """Greedy tokens and every step's logits [steps, B, V] of T5's ``generate`` (pad and end
    tokens suppressed: a tiny random T5 emits little else, and repeats one token; its
    logits still move from step to step)."""
    out = model.generate(**kw, max_new_tokens=6, do_sample=False, cache_implementation=cache,
                         suppress_tokens=[0, 1], output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_t5_position_bias_is_a_score(cache):
    """T5 passes its bucketed relative positions as a dense ``position_bias`` that eager
    attention adds to the scores: spattn adds it as a score table. Encoder (bidirectional,
    right padding), decoder (causal) and cross-attention; logits, and greedy generation's
    tokens and logits at every step (decode steps over a dynamic cache, or over a static
    cache, whose one query per step sits at another slot each time), match eager."""
    model = t5_model()
    ids = torch.randint(1, VOCAB, (2, 9))
    am = torch.ones_like(ids)
    am[0, 6:] = 0
    dec = torch.randint(1, VOCAB, (2, 4))
    kw = dict(input_ids=ids, attention_mask=am)
    with torch.no_grad():
        ref = model(decoder_input_ids=dec, **kw).logits
        ref_tokens, ref_steps = _t5_generate(model, cache, **kw)
        use_spattn(model)
        out = model(decoder_input_ids=dec, **kw).logits
        tokens, steps = _t5_generate(model, cache, **kw)
    assert rel_err(out, ref, torch.ones(out.shape[:2], dtype=torch.bool)) <= TOL
    assert float((ref_steps[1:] - ref_steps[:-1]).abs().max()) > 1e-2   # each step counts
    assert torch.equal(tokens, ref_tokens)
    assert float((steps - ref_steps).abs().max() / ref_steps.abs().max()) <= TOL
    table = sphf.describe(model).splitlines()
    assert table[1].split()[:2] == ["layer", "module"]
    assert "decoder.block.0.layer.1.EncDecAttention" in table[4]


def test_t5_gradients_reach_the_relative_attention_bias():
    """Training T5 through spattn: every parameter's gradient matches eager, the relative
    attention embedding's (through the score table's gradient) included."""
    ids = torch.randint(1, VOCAB, (2, 8))
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    labels = torch.randint(1, VOCAB, (2, 5))
    grads = []
    for impl in ("eager", sphf.NAME):
        model = t5_model()
        model.set_attn_implementation(impl)
        if impl == sphf.NAME:
            sphf.set_patterns(model, backend="torch")
        model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    ref, out = grads
    assert ref.keys() == out.keys()
    assert any("relative_attention_bias" in n for n in ref)
    for name in ref:
        scale = ref[name].abs().max()
        assert float((out[name] - ref[name]).abs().max()) <= 1e-4 * float(scale) + 1e-7, name


def test_position_bias_of_the_wrong_shape_is_refused():
    model = t5_model()
    use_spattn(model)
    module = model.encoder.block[0].layer[0].SelfAttention
    q = torch.randn(2, 4, 5, 16)
    mask = sphf.spattn_mask(2, kv_length=5, **queries(5, 0),
                            mask_function=mu.bidirectional_mask_function)
    with pytest.raises(SpattnInputError, match=r"position_bias= \(shape \(1, 4, 5, 6\)"):
        sphf.spattn_attention_forward(module, q, q, q, mask,
                                      position_bias=torch.zeros(1, 4, 5, 6))


def test_latent_attention_with_another_value_head_dim():
    """DeepSeek V3's multi-head latent attention: q and k of 48 dims (32 + 16 rotary),
    values of 32; logits and greedy generation match eager."""
    config = tiny("DeepseekV3Config", moe_intermediate_size=32, num_key_value_heads=4,
                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                  first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    model = model_of(config)
    ids, am = left_padded([8, 5], 8)
    ref = logits(model, ids, attention_mask=am)
    ref_tokens, tokens, _ = eager_then_decoded(model, [8, 5], 8, seed=1, new=6)
    assert rel_err(logits(model, ids, attention_mask=am), ref, am.bool()) <= TOL
    assert torch.equal(tokens, ref_tokens)


def _gemma3_vlm():
    """A tiny Gemma 3 vision-language model and a left-padded batch with one image per row
    (``input_ids``, ``attention_mask``, ``pixel_values``)."""
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                query_pre_attn_scalar=16, pad_token_id=0,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=299,
                                       boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():          # initialised to zeros: the image would not reach the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    image = [297, 299, 299, 299, 299, 298]
    ids = torch.tensor([[5, 6, *image, 7, 8, 9, 10, 11], [0, 0, 5, *image, 12, 13, 14, 15]])
    am = (ids != 0).long()
    return model, dict(input_ids=ids, attention_mask=am,
                       pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator()
                                                .manual_seed(3)))


def test_image_tokens_attend_to_their_whole_image():
    """Gemma 3's vision-language model: the image's tokens attend to each other both ways
    (transformers' ``block_sequence_ids``, or'd with the causal and sliding masks), the
    text causally; its vision tower runs without a mask. Logits and greedy generation with
    left padding match eager, and the image blocks change the logits (so a mask without
    them would fail)."""
    model, kw = _gemma3_vlm()
    ids, am = kw["input_ids"], kw["attention_mask"]
    gen = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = model(**kw, token_type_ids=(ids == 299).long()).logits
        no_blocks = model(**kw, token_type_ids=torch.zeros_like(ids)).logits
        ref_tokens = model.generate(**kw, token_type_ids=(ids == 299).long(), **gen)
        use_spattn(model)
        out = model(**kw, token_type_ids=(ids == 299).long()).logits
        tokens = model.generate(**kw, token_type_ids=(ids == 299).long(), **gen)
    assert rel_err(no_blocks, ref, am.bool()) > 1e-2
    assert rel_err(out, ref, am.bool()) <= TOL
    assert torch.equal(tokens, ref_tokens)


def test_a_vision_tower_is_listed_and_reached_by_module_path():
    """A vision-language model's vision tower (attention modules without ``layer_idx``
    beside the language model's numbered ones) is listed by ``describe`` and
    ``layer_patterns`` (index ``-``, its module paths) and reached by ``set_patterns`` with
    a module path: a pattern reading every key (as its config's does) matches eager, a
    narrower one there changes the logits; the language layers keep theirs."""
    model, kw = _gemma3_vlm()
    kw["token_type_ids"] = (kw["input_ids"] == 299).long()
    am = kw["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**kw).logits
    use_spattn(model)
    layers = sphf.layer_patterns(model)
    assert [lp.layer_idx for lp in layers] == [0, 1, 2, None, None]
    table = sphf.describe(model).splitlines()
    assert table[1].split()[:2] == ["layer", "module"]
    vision = [row for row in table[2:7] if row.startswith("-")]
    assert len(vision) == 2 and all("vision_tower" in row for row in vision)
    for source, same in (("abs(q - k) <= 1000", True), ("abs(q - k) <= 2", False)):
        use_spattn(model, {"*vision_tower*": source})
        layers = sphf.layer_patterns(model)
        assert [lp.origin for lp in layers] == ["config"] * 3 + ["override"] * 2
        with torch.no_grad():
            out = model(**kw).logits
        assert (rel_err(out, ref, am) <= TOL) == same
    with pytest.raises(SpattnParamError, match=r"no layer of type 'vision\*'.*paths look like"):
        sphf.set_patterns(model, {"vision*": "true"})


def test_a_module_path_wins_over_an_index():
    """T5: a path pattern names the decoder's cross-attention modules alone, and wins over
    the index their layers share with the encoder's and the decoder's self-attention."""
    model = t5_model()
    layers = sphf.set_patterns(model, {0: "true", "decoder.*.EncDecAttention": "q >= k"})
    got = {(lp.layer_idx, lp.pattern.source) for lp in layers}
    assert (0, "true") in got and (0, "q >= k") in got and (1, "q >= k") in got
    table = sphf.describe(model)
    assert all("q >= k" in row for row in table.splitlines() if "EncDecAttention" in row)


def test_paligemma_prefix_reads_both_ways():
    """PaliGemma: the image and the prompt (``token_type_ids`` 0) form a prefix whose tokens
    read each other both ways, the answer reads causally; the language model receives the
    mask the outer model prepared. Logits and greedy generation match eager, and the
    prefix changes the logits."""
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, pad_token_id=0)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision,
                                          image_token_index=299, projection_dim=64,
                                          hidden_size=64)
    config.text_config.num_image_tokens = 16
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    ids = torch.tensor([[299] * 16 + [2, 5, 6, 7, 1], [0, 0] + [299] * 16 + [2, 8, 1]])
    am = (ids != 0).long()
    kw = dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(2, 3, 32, 32))
    prefix, causal = torch.zeros_like(ids), torch.ones_like(ids)
    gen = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = model(**kw, token_type_ids=prefix).logits
        without = model(**kw, token_type_ids=causal).logits
        ref_tokens = model.generate(**kw, token_type_ids=prefix, **gen)
        use_spattn(model)
        out = model(**kw, token_type_ids=prefix).logits
        tokens = model.generate(**kw, token_type_ids=prefix, **gen)
    assert rel_err(without, ref, am.bool()) > 1e-2
    assert rel_err(out, ref, am.bool()) <= TOL
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.interpreter
@pytest.mark.skipif(not hasattr(transformers, "Gemma4TextConfig"), reason="no Gemma 4")
def test_head_dims_past_the_kernels_run_on_the_torch_backend():
    """Gemma 4's global layers have a head dim of 512, past the kernels' 256: with backend
    "auto" (the generated kernels, under the interpreter here) those layers run on the
    torch backend, the sliding ones (16) in the kernels; logits match eager."""
    config = transformers.Gemma4TextConfig(vocab_size=VOCAB, hidden_size=64,
                                           intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, global_head_dim=512, sliding_window=4,
                                           pad_token_id=0,
                                           layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    _kernels_match_eager(transformers.Gemma4ForCausalLM(config).eval())


def test_a_model_that_reads_its_mask_as_a_tensor_is_told_why():
    """A model computing with its mask itself (Doge adds it to a mask of its own, a sparse
    indexer slices it) reads tensor attributes of the SpattnMask or indexes it: a
    SpattnInputError saying so, which is an AttributeError (TypeError) too, so ``hasattr``
    and ``getattr`` with a default still answer."""
    mask = sphf.spattn_mask(2, kv_length=4, **queries(4, 0),
                            mask_function=mu.causal_mask_function)
    with pytest.raises(SpattnInputError, match="'dtype' of its attention mask"):
        mask.dtype
    with pytest.raises(SpattnInputError, match="indexes its attention mask"):
        mask[:, 0]                              # a sparse indexer's read (HunYuan v4)
    with pytest.raises(TypeError):
        mask[0]
    assert not hasattr(mask, "dtype") and getattr(mask, "device", None) is None
    assert mask.kind == ("causal",)
    # Bloom adds its mask to its scores: operators and torch functions say so too
    scores = torch.randn(2, 4, 4)
    for use in (lambda: scores + mask, lambda: mask + scores, lambda: mask * 2,
                lambda: torch.add(scores, mask), lambda: scores.masked_fill(mask, 0.0)):
        with pytest.raises(SpattnInputError, match="its attention mask as if it were a tensor"):
            use()


@pytest.mark.interpreter
def test_generated_kernels_in_a_model():
    """The generated Triton kernels (backend ``auto``, the interpreter on CPU tensors)."""
    _kernels_match_eager(model_of(CONFIGS["mistral-w4"]()))


def _kernels_match_eager(model):
    """Left-padded logits of ``model`` with spattn on backend ``"auto"`` (the generated
    kernels, under the interpreter here) match its eager attention's."""
    ids, am = left_padded([8, 5], 8)
    model.set_attn_implementation("eager")
    ref = logits(model, ids, attention_mask=am)
    model.set_attn_implementation(sphf.NAME)
    sphf.set_patterns(model)
    assert {lp.pattern.backend for lp in sphf.layer_patterns(model)} == {"auto"}
    assert rel_err(logits(model, ids, attention_mask=am), ref, am.bool()) <= TOL


# --------------------------------------------------------------- inspection and overrides

def test_describe_prints_the_pattern_of_every_layer():
    model = model_of(CONFIGS["gemma2-w4-alternating"]())
    text = sphf.describe(use_spattn(model))
    rows = [line.split() for line in text.splitlines()[2:5]]
    assert [r[:3] for r in rows] == [["0", "sliding_attention", "config"],
                                     ["1", "full_attention", "config"],
                                     ["2", "sliding_attention", "config"]]
    assert text.splitlines()[2].endswith("config (sliding_window=4)  0 <= q - k <= 3")
    assert text.splitlines()[3].endswith("q >= k")
    chunked = sphf.layer_patterns(model_of(CONFIGS["llama4-chunk4"]()))
    assert [lp.pattern.source for lp in chunked] == ["pos[k] // 4 == pos[q] // 4 & q >= k",
                                                     "q >= k"]
    assert chunked[0].detail == "attention_chunk_size=4" and chunked[0].mask_kind == ("chunked", 4)


def test_overrides_by_type_and_by_index():
    """Mistral (window 4) with its sliding layers given window 2 equals eager Mistral with
    window 2; Qwen2 with every layer sliding and layer 0 given ``causal`` equals eager Qwen2
    whose layer 0 is a full-attention layer."""
    ids, am = left_padded([9, 6], 9)
    ref = logits(model_of(tiny("MistralConfig", sliding_window=2)), ids, attention_mask=am)
    model = use_spattn(model_of(tiny("MistralConfig", sliding_window=4)))
    before = logits(model, ids, attention_mask=am)
    window2 = spattn.compile("causal & window(W)", W=2)
    layers = sphf.set_patterns(model, {"sliding_attention": window2}, backend="torch")
    assert [(lp.origin, lp.pattern.source) for lp in layers] == \
        [("override", "0 <= q - k <= 1")] * 2
    assert "override" in sphf.describe(model)
    assert rel_err(before, ref, am.bool()) > 1e-2           # the override changes the output
    assert rel_err(logits(model, ids, attention_mask=am), ref, am.bool()) <= TOL

    mixed = tiny("Qwen2Config", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    ref = logits(model_of(mixed), ids, attention_mask=am)
    all_sliding = tiny("Qwen2Config", use_sliding_window=True, sliding_window=3,
                       max_window_layers=0)
    model = use_spattn(model_of(all_sliding),
                       {0: "causal", "sliding_attention": "causal & window(3)"})
    assert [lp.origin for lp in sphf.layer_patterns(model)] == ["override", "override"]
    assert rel_err(logits(model, ids, attention_mask=am), ref, am.bool()) <= TOL
    sphf.set_patterns(model)                                # back to the config's patterns
    assert [lp.origin for lp in sphf.layer_patterns(model)] == ["config", "config"]


def test_override_with_positions():
    """An override may index ``pos``, the position of a key in its sequence (left padding
    excluded): ``pos[k] < 2`` keeps each row's first two real tokens visible."""
    model = use_spattn(model_of(CONFIGS["mistral-w4"]()),
                       {"sliding_attention": "causal & (window(2) | pos[k] < 2)"})
    ids, am = left_padded([9, 6], 9)
    batch = logits(model, ids, attention_mask=am)
    for b, n in enumerate([9, 6]):                  # each row alone, without padding
        alone = logits(model, ids[b:b + 1, 9 - n:])
        assert rel_err(batch[b:b + 1, 9 - n:], alone, torch.ones(1, n, dtype=torch.bool)) <= TOL


@pytest.mark.parametrize("patterns, match", [
    ({"sliding_attention": "causal & same(doc)"}, "runtime input 'doc'"),
    ({"nonexistent_attention": "causal"}, "no layer of type 'nonexistent_attention'"),
    ({7: "causal"}, "no attention layer 7"),
    ({0: 3}, "must be a pattern source"),
    ({"sliding_attention": "causal & pos[q, k] > 0"}, "indexes 'pos' with 2 indices"),
], ids=["unknown-input", "unknown-type", "unknown-index", "not-a-pattern", "pos-2d"])
def test_bad_overrides(patterns, match):
    model = model_of(CONFIGS["mistral-w4"]())
    with pytest.raises(SpattnParamError, match=match):
        sphf.set_patterns(model, patterns)


def test_override_source_errors_point_at_the_source():
    with pytest.raises(SpattnSyntaxError, match="column"):
        sphf.set_patterns(model_of(CONFIGS["llama"]()), {0: "causal & window(4"})


# ------------------------------------------------------------------ what spattn refuses

def test_gemma2_softcapping_matches_eager():
    """Gemma 2 as configured (attn_logit_softcapping=50): the softcap runs as the score
    ``softcap(50.0)``; logits and greedy generation match eager with left padding."""
    model = model_of(tiny("Gemma2Config", num_hidden_layers=3, sliding_window=4,
                          query_pre_attn_scalar=16, attn_logit_softcapping=50.0))
    ids, am = left_padded([9, 6, 3], 9)
    ref = logits(model, ids, attention_mask=am)
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        gen_ref = model.generate(ids, **kw)
        use_spattn(model)
        gen = model.generate(ids, **kw)
    assert rel_err(logits(model, ids, attention_mask=am), ref, am.bool()) <= TOL
    assert torch.equal(gen, gen_ref)


def test_gemma2_softcapped_generation_on_the_decode_path():
    """Past 256 cached keys each generated token's attention (Lq = 1, padding as a runtime
    input, softcap(50) as the score) runs on spattn's decode path: the tokens match eager."""
    model = model_of(tiny("Gemma2Config", num_hidden_layers=2, sliding_window=300,
                          query_pre_attn_scalar=16, attn_logit_softcapping=50.0))
    gen_ref, gen, plans = eager_then_decoded(model, [290, 270], 290, seed=3, new=4)
    assert any(p.scored for p in plans)
    assert torch.equal(gen, gen_ref)


def test_left_padding_is_one_tensor_across_steps():
    """A left padding enters as ``first [B]`` (each row's first real key slot), the same
    tensor at every step of a generation; holes (or keys past the mask) as ``keep``; no
    padding as neither."""
    fn = mu.causal_mask_function
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    prefill = sphf.spattn_mask(batch_size=3, **queries(5, 0), kv_length=5, mask_function=fn,
                               attention_mask=am)
    am = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
    step = sphf.spattn_mask(batch_size=3, **queries(1, 5), kv_length=6, mask_function=fn,
                            attention_mask=am)
    assert prefill.keep is None and step.keep is None
    assert step.first is prefill.first and step.first.tolist() == [2, 0, 1]
    dropped = sphf.spattn_mask(batch_size=3, **queries(1, 5), kv_length=4, kv_offset=2,
                               mask_function=fn, attention_mask=am)
    assert dropped.keep is None and dropped.first is None          # slots 2.. are all real
    hole = am.clone()
    hole[1, 3] = 0
    mask = sphf.spattn_mask(batch_size=3, **queries(1, 5), kv_length=6, mask_function=fn,
                            attention_mask=hole)
    assert mask.first is None and torch.equal(mask.keep, hole.bool())
    past = sphf.spattn_mask(batch_size=3, **queries(1, 5), kv_length=8, mask_function=fn,
                            attention_mask=am)
    assert past.first is None and not past.keep[:, 6:].any()
    none = sphf.spattn_mask(batch_size=3, **queries(1, 5), kv_length=6, mask_function=fn,
                            attention_mask=torch.ones_like(am))
    assert none.keep is None and none.first is None


def test_left_padded_generation_keeps_one_decode_plan():
    """Batched generation with left padding past 256 keys: every generated token's
    attention runs on the decode path with one plan (the padding is one tensor for the
    whole generation), and the tokens match eager."""
    model = model_of(CONFIGS["llama"]())
    ref, out, plans = eager_then_decoded(model, [290, 262, 281], 290, seed=4, new=5)
    assert torch.equal(out, ref)
    assert len(plans) == 1 and "first[b]" in plans[0].pattern.source


def _counting_repeats(monkeypatch) -> list:
    """The results of the adapter's repeated calls (:func:`sphf._repeated`), None a miss."""
    seen = []
    real = sphf._repeated

    def counted(*args):
        out = real(*args)
        seen.append(out)
        return out
    monkeypatch.setattr(sphf, "_repeated", counted)
    return seen


@pytest.mark.parametrize("name", ["llama", "llama-mha"])
def test_the_layers_of_a_decode_step_repeat_the_first_layers_call(name, monkeypatch):
    """A left-padded generation past 256 keys: the first layer of each token runs the full
    path and keeps its kernel call in the forward's mask; the other layers make that call
    (grouped heads folded into the rows, or not). Every generated token's logits equal those
    of the same generation with the memo off, and the tokens eager's."""
    config = CONFIGS["llama"]() if name == "llama" else tiny("LlamaConfig",
                                                             num_key_value_heads=4)
    config.num_hidden_layers = 3
    model = model_of(config)
    ids, am = left_padded([290, 262, 281], 290, seed=6)
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        use_spattn(model)
        seen = _counting_repeats(monkeypatch)
        out = model.generate(ids, **kw)
        hits = sum(o is not None for o in seen)
        monkeypatch.setattr(sphf, "_remember", lambda *args: None)
        off = model.generate(ids, **kw)
    assert hits == 3 * 2                    # 3 decode steps, layers 1 and 2
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.sequences,
                                                                     off.sequences)
    for a, b, e in zip(out.logits, off.logits, ref.logits):
        assert torch.equal(a, b)
        assert float((a - e).abs().max() / e.abs().max()) <= TOL


def test_a_repeated_call_checks_what_the_call_depends_on(monkeypatch):
    """The memo's call is made only where the full path would make the same call: another
    scale, a query that requires grad, attention sinks, a runtime input changed in place,
    another layer pattern, another cache length or autocast take the full path. Each output
    is checked against the float64 reference of the call (with the sinks where given)."""
    from spattn.runtime.reference import pattern_reference
    model = use_spattn(model_of(CONFIGS["llama"]()))
    first, second = (layer.self_attn for layer in model.model.layers)
    B, Hq, Hk, D, L = 3, 4, 2, 16, 300
    am = torch.ones(B, L, dtype=torch.long)
    am[0, :40], am[2, :7] = 0, 0
    mask = sphf.spattn_mask(batch_size=B, **queries(1, L - 1), kv_length=L,
                            mask_function=mu.causal_mask_function, attention_mask=am)
    mask.first = mask.first.clone()         # (equal paddings share one: changed below)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    seen = _counting_repeats(monkeypatch)

    def call(module, q, k, v, m=mask, scaling=0.25, **kw):
        seen.clear()
        out = sphf.spattn_attention_forward(module, q, k, v, m, scaling=scaling, **kw)[0]
        pat, inputs, q_offset = sphf.plan_call(sphf._layer_of(module).pattern, m, 1,
                                               k.shape[2])
        want, lse = pattern_reference(pat, q.double(), k.double(), v.double(), scale=scaling,
                                      q_offset=q_offset, **inputs)
        if "s_aux" in kw:
            want = sphf.with_sinks(want, lse, kw["s_aux"].double())
        assert (out.double() - want.transpose(1, 2)).abs().max() <= 1e-5
        return out, [o is not None for o in seen]

    with torch.no_grad():
        kept, hits = call(first, q, k, v)
        assert hits == [] and mask._repeats is not None     # the full path, remembered
        again, hits = call(second, q, k, v)
        assert hits == [True] and torch.equal(again, kept)
        assert call(second, q, k, v, scaling=0.3)[1] == [False]
        sinks = torch.randn(Hq, generator=g)
        out, hits = call(second, q, k, v, s_aux=sinks)
        assert hits == [False] and not torch.equal(out, kept)
        seen.clear()
        with pytest.raises(SpattnInputError, match="attention sinks"):  # not read as none
            sphf.spattn_attention_forward(second, q, k, v, mask, scaling=0.25, s_aux=False)
        assert seen == [None]
        seen.clear()
        with pytest.raises(SpattnInputError, match="do not match the mask"):
            sphf.spattn_attention_forward(second, q, k[:, :, 1:], v[:, :, 1:], mask,
                                          scaling=0.25)
        assert seen == [None]               # another cache length: the full path says why
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert call(second, q, k, v)[1] == [False]
    qg = q.clone().requires_grad_()
    out, hits = call(second, qg, k, v)
    assert hits == [False] and out.requires_grad
    with torch.no_grad():
        sphf.set_patterns(model, {1: "causal & window(64)"}, backend="torch")
        out, hits = call(second, q, k, v)
        assert hits == [False] and not torch.equal(out, kept)
        sphf.set_patterns(model, None, backend="torch")
        mask.first[2] = 30                  # the padding changed in place: its version moved
        out, hits = call(second, q, k, v)
        assert hits == [False] and not torch.equal(out, kept)


@pytest.mark.parametrize("name", ["llama", "mistral-w300"])
def test_static_cache_generation_keeps_one_decode_plan(name):
    """A static cache hands every layer all its slots, those past the tokens so far marked
    as padding in the mask transformers builds. A layer whose pattern never reaches past its
    query reads that padding up to the queries: a left padding (``first[b]``), one plan
    for the whole generation where ``keep[k]`` would be a new input at every token."""
    model = model_of(tiny("MistralConfig", sliding_window=300) if name == "mistral-w300"
                     else CONFIGS[name]())
    ref, out, plans = eager_then_decoded(model, [290, 262, 281], 290, seed=5, new=5,
                                         cache_implementation="static")
    assert torch.equal(out, ref)
    assert len(plans) == 1 and "first[b]" in plans[0].pattern.source
    assert "keep" not in plans[0].pattern.source


@pytest.mark.parametrize("src,bounded", [
    ("causal", True), ("causal & window(8)", True), ("q - k >= 3", True),
    ("causal & pos[q] // 4 == pos[k] // 4", True), ("k - q <= -1 | k < 0", False),
    ("full", False), ("local(4, 4)", False), ("q - k >= -1", False),
    ("causal | sink(4)", False), ("window(8)", True), ("abs(q - k) <= 8", False)])
def test_keys_up_to_query(src, bounded):
    """The structural proof that a layer's pattern reaches no key past its query, which lets
    a static cache's trailing padding go; checked against the dense mask (a proof never
    holds where a key past the query is allowed)."""
    pat = spattn.compile(src, backend="torch")
    assert sphf._keys_up_to_query(pat.ir) == bounded
    if bounded:
        pos = torch.arange(40)[None].expand(1, -1)
        m = pat.mask(40, 40, **({"pos": pos} if "pos" in pat.inputs else {}))[0, 0]
        assert not torch.triu(m, diagonal=1).any()


def test_layer_patterns_follow_config_edits_and_set_patterns():
    """A layer keeps its pattern for its config object (no config reads per call); a
    config edited in place between forwards (a wider window) and set_patterns are followed:
    the logits match eager's after each."""
    model = model_of(CONFIGS["mistral-w4"]())
    ids, am = left_padded([10, 7, 4], 10)
    use_spattn(model)
    with torch.no_grad():
        for window in (4, 6):
            model.config.sliding_window = window
            ref = logits(use_eager(model), ids, attention_mask=am)
            model.set_attn_implementation(sphf.NAME)
            out = logits(model, ids, attention_mask=am)
            assert rel_err(out, ref, am.bool()) <= TOL, window
            assert {lp.pattern.source for lp in sphf.layer_patterns(model)} == {
                spattn.compile(f"causal & window({window})").source}
        sphf.set_patterns(model, {0: "causal & window(2)"}, backend="torch")
        model.set_attn_implementation(sphf.NAME)
        first = logits(model, ids, attention_mask=am)
        sphf.set_patterns(model, {0: "causal & window(6)"}, backend="torch")
        model.set_attn_implementation(sphf.NAME)
        again = logits(model, ids, attention_mask=am)
    assert rel_err(again, ref, am.bool()) <= TOL
    assert rel_err(first, ref, am.bool()) > TOL          # layer 0 ran its narrower override


def test_config_that_disagrees_with_the_mask():
    """Mistral builds every mask from ``sliding_window``; a ``layer_types`` saying otherwise
    would give spattn a pattern eager does not run: refused, naming the layer."""
    model = model_of(tiny("MistralConfig", sliding_window=4,
                          layer_types=["full_attention", "sliding_attention"]))
    model.set_attn_implementation(sphf.NAME)
    ids, am = left_padded([5, 3], 5)
    with pytest.raises(spattn.SpattnError,
                       match=r"layer 0 \(full_attention\).*sliding window of 4"):
        logits(model, ids, attention_mask=am)


def _bidirectional_gemma3():
    """Gemma 3 with bidirectional attention (EmbeddingGemma): its sliding layers or a window
    function of the model's own into the mask, its full layers a function returning True."""
    return model_of(tiny("Gemma3TextConfig", sliding_window=4, query_pre_attn_scalar=16,
                         use_bidirectional_attention=True,
                         layer_types=["sliding_attention", "full_attention"]))


def test_masks_a_model_adds_run_transformers_dense_mask():
    """Mask functions spattn cannot read run transformers' own dense mask of the call (with
    a warning naming them and ``set_patterns``): logits match eager; the layers report it.
    A pattern given with ``set_patterns`` runs instead, compiled, padding added."""
    model = _bidirectional_gemma3()
    ids, am = left_padded([7, 4], 7)
    ref = logits(model, ids, attention_mask=am)
    use_spattn(model)
    with pytest.warns(spattn.SpattnDenseMaskWarning) as caught:
        with torch.no_grad():
            out = logits(model, ids, attention_mask=am)
    assert rel_err(out, ref, am.bool()) <= TOL
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2 and "layer 0 (sliding_attention)" in said[0] \
        and "_bidirectional_window_overlay" in said[0] and "layer 1 (full_attention)" in said[1]
    layers = sphf.layer_patterns(model)
    assert all(lp.detail.startswith("ran transformers' dense mask") for lp in layers)
    assert "dense mask" in sphf.describe(model)
    w = model.config.sliding_window            # (Gemma 3 narrows it when bidirectional)
    use_spattn(model, {"sliding_attention": f"abs(q - k) < {w}", "full_attention": "true"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", spattn.SpattnDenseMaskWarning)
        with torch.no_grad():
            again = logits(model, ids, attention_mask=am)
    assert rel_err(again, ref, am.bool()) <= TOL
    assert [lp.origin for lp in sphf.layer_patterns(model)] == ["override"] * 2


def test_a_bidirectional_model_generates_as_transformers_masks_it():
    """``generate`` masks a bidirectional Gemma 3 causally (its own masks, without the
    model's functions): each sliding layer runs the causal window transformers built, of
    its config's size, as eager does; greedy tokens match eager's with dynamic and static
    caches."""
    model = _bidirectional_gemma3()
    ids, am = left_padded([7, 4], 7)
    gen = dict(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", spattn.SpattnDenseMaskWarning)
        ref = [model.generate(**gen), model.generate(**gen, cache_implementation="static")]
        use_spattn(model)
        out = [model.generate(**gen), model.generate(**gen, cache_implementation="static")]
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    w = model.config.sliding_window
    assert sphf.layer_patterns(model)[0].mask_kind == ("sliding", w)


@pytest.mark.interpreter
def test_dense_masks_in_the_generated_kernels():
    """transformers' dense mask as the runtime input of the generated kernels (backend
    ``auto``, the interpreter here): logits match eager."""
    model = _bidirectional_gemma3()
    ids, am = left_padded([8, 5], 8)
    ref = logits(model, ids, attention_mask=am)
    model.set_attn_implementation(sphf.NAME)
    sphf.set_patterns(model)
    with pytest.warns(spattn.SpattnDenseMaskWarning):
        with torch.no_grad():
            out = logits(model, ids, attention_mask=am)
    assert rel_err(out, ref, am.bool()) <= TOL


def test_dropout_and_prepared_masks_are_refused():
    model = model_of(tiny("LlamaConfig", attention_dropout=0.1))
    model.set_attn_implementation(sphf.NAME)
    ids, am = left_padded([5, 3], 5)
    model.train()
    with pytest.raises(spattn.SpattnError, match="dropout 0.1"):
        logits(model, ids, attention_mask=am)
    model.eval()
    dense = torch.zeros(2, 1, 5, 5)
    with pytest.raises(SpattnInputError, match=r"prepared mask tensor of shape \(2, 1, 5, 5\)"):
        logits(model, ids, attention_mask=dense)


def test_override_that_needs_dropped_keys_is_refused():
    """A sliding-window cache keeps only the last keys: an override with a sink runs in the
    prompt, where every key is present, and is refused once the cache has dropped the
    sink; a narrower window than the cache's is fine throughout."""
    model = model_of(CONFIGS["mistral-w4"]())
    ids, am = left_padded([8, 6], 8)
    kw = dict(attention_mask=am, max_new_tokens=3, do_sample=False, pad_token_id=0)
    use_spattn(model, {"sliding_attention": "causal & window(3)"})
    with torch.no_grad():
        model.generate(ids, **kw)
        use_spattn(model, {"sliding_attention": "causal & (window(4) | pos[k] < 1)"})
        logits(model, ids, attention_mask=am)                  # no cache: every key present
        with pytest.raises(spattn.SpattnError, match="reaches keys this layer's cache has dropped"):
            model.generate(ids, **kw)


@pytest.mark.parametrize("name,config", [
    ("mistral-w1", lambda: tiny("MistralConfig", sliding_window=1)),
    ("llama4-chunk1", lambda: tiny("Llama4TextConfig", intermediate_size_mlp=128,
                                   attention_chunk_size=1, no_rope_layer_interval=2,
                                   num_local_experts=2, num_experts_per_tok=1, moe_layers=[])),
], ids=["mistral-w1", "llama4-chunk1"])
def test_a_window_of_one_with_a_dynamic_cache_is_refused_by_name(name, config):
    """transformers' cache keeps every key at a window of 1 while its mask says one
    (eager then broadcasts the one-key mask over all of them): the step is refused, and the
    message names the window and what to use instead."""
    model = use_spattn(model_of(config()))
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(input_ids=ids[:, :8], use_cache=True)
        key = "sliding_window" if name.startswith("mistral") else "attention_chunk_size"
        with pytest.raises(SpattnInputError, match=rf"queries \(1\) and keys \(9\).*with "
                           rf"{key}=1, transformers' cache keeps every key"):
            model(input_ids=ids[:, 8:], past_key_values=out.past_key_values)
