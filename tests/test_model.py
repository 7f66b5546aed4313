"""Qwen2_5_VL against transformers' Qwen2_5_VLForConditionalGeneration (the oracle), on tiny random
checkpoints written by transformers' own save_pretrained."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from mrgr1.config import ModelConfig, preset
from mrgr1.vlm import KVCache, Qwen2_5_VL, decode_position_ids
from tests.tiny_qwen import make_tiny_hf_model, tiny_token_ids

VOCAB = 300
IDS = tiny_token_ids(VOCAB)
IMG, VS, VE = IDS["image_token_id"], IDS["vision_start_token_id"], IDS["vision_end_token_id"]
# Two images of different sizes. Window = 112 px = 4x4 merged tokens; (10, 12) patches = 5x6 merged
# tokens, so its windows are 4x4, 4x2, 1x4, 1x2: partial windows at the right and bottom edges.
GRIDS = torch.tensor([[1, 4, 6], [1, 10, 12]])


def hf_forward(hf, input_ids, mask, pv=None, grid=None):
    # transformers 5 needs mm_token_type_ids, or it silently falls back to 1-D positions.
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                  mm_token_type_ids=(input_ids == IMG).int()).logits


def left_padded(rows):
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def image_batch(seed=0, extra_text=(5, 6)):
    """Row 0: one 4x6-patch image (6 tokens); row 1: one 10x12-patch image (30 tokens). Left padded."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, VOCAB - 10, (n,), generator=g).tolist()

    rows = [text(3) + [VS] + [IMG] * 6 + [VE] + text(extra_text[0]),
            text(4) + [VS] + [IMG] * 30 + [VE] + text(extra_text[1])]
    ids, mask = left_padded(rows)
    pv = torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    return ids, mask, pv, GRIDS


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied")
    hf, _ = make_tiny_hf_model(path, vocab_size=VOCAB, tie=False, seed=0)
    return hf, str(path)


@pytest.fixture(scope="module")
def ours(untied):
    return Qwen2_5_VL.from_pretrained(untied[1])


def assert_logits_match(ours_logits, hf_logits, mask, tol=1e-4):
    m = mask.bool()  # outputs at padding positions are meaningless in both models
    assert (ours_logits[m] - hf_logits[m]).abs().max().item() <= tol


def test_logits_match_transformers_with_left_padding_and_two_images(untied, ours):
    hf, _ = untied
    ids, mask, pv, grid = image_batch()
    assert mask[0].sum() < mask.shape[1]  # row 0 really is padded
    with torch.no_grad():
        out = ours(ids, mask, pv, grid)
    assert_logits_match(out, hf_forward(hf, ids, mask, pv, grid), mask)


def test_vision_tower_matches_transformers(untied, ours):
    hf, _ = untied
    _, _, pv, grid = image_batch()
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
        out = ours.model.visual(pv, grid)
    assert out.shape == (36, 64)
    assert (out - ref).abs().max().item() <= 1e-5


def test_rope_index_matches_transformers(untied, ours):
    hf, _ = untied
    ids, mask, _, grid = image_batch()
    ref_pos, ref_delta = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(),
                                                 image_grid_thw=grid, attention_mask=mask)
    pos, delta = ours.rope_index(ids, mask, grid)
    m = mask.bool()
    assert torch.equal(pos[:, m], ref_pos[:, m])
    # transformers counts its delta from the unpadded length, ours from the padded width T.
    n_pad = (mask == 0).sum(1, keepdim=True)
    assert torch.equal(delta, ref_delta - n_pad)


def test_text_only_batch_matches_transformers(untied, ours):
    hf, _ = untied
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        out = ours(ids, mask)
    assert_logits_match(out, hf_forward(hf, ids, mask), mask)


def _rewrite_new_layout_sharded(src, dst):
    """Re-save a checkpoint with transformers-5 key names, split into two shards with an index."""
    state = load_file(os.path.join(src, "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        k = "model.visual." + k[len("visual."):] if k.startswith("visual.") else k
        k = "model.language_model." + k[len("model."):] if k.startswith("model.") and ".visual." not in k else k
        renamed[k] = v
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    os.makedirs(dst, exist_ok=True)
    for name, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, os.path.join(dst, name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return keys


def test_loads_sharded_checkpoint_with_transformers5_key_layout(untied, tmp_path):
    hf, src = untied
    keys = _rewrite_new_layout_sharded(src, tmp_path)
    assert any(k.startswith("model.language_model.layers.") for k in keys)
    assert any(k.startswith("model.visual.blocks.") for k in keys)
    model = Qwen2_5_VL.from_pretrained(str(tmp_path))
    ids, mask, pv, grid = image_batch(seed=1)
    with torch.no_grad():
        out = model(ids, mask, pv, grid)
    assert_logits_match(out, hf_forward(hf, ids, mask, pv, grid), mask)


def test_tied_checkpoint_without_lm_head_loads_and_matches(tmp_path):
    hf, _ = make_tiny_hf_model(tmp_path, vocab_size=VOCAB, tie=True, seed=3)
    stored = load_file(os.path.join(tmp_path, "model.safetensors"))
    stored.pop("lm_head.weight", None)  # as the 3B hub checkpoint: no lm_head.weight at all
    save_file(stored, os.path.join(tmp_path, "model.safetensors"))
    model = Qwen2_5_VL.from_pretrained(str(tmp_path))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    ids, mask, pv, grid = image_batch(seed=2)
    with torch.no_grad():
        out = model(ids, mask, pv, grid)
    assert_logits_match(out, hf_forward(hf, ids, mask, pv, grid), mask)


def test_untied_checkpoint_missing_lm_head_is_a_clear_error(untied, tmp_path):
    _, src = untied
    stored = load_file(os.path.join(src, "model.safetensors"))
    del stored["lm_head.weight"]
    stored["visual.extra.weight"] = torch.zeros(1)
    save_file(stored, os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(tmp_path, "config.json"), "w") as g:
        g.write(f.read())
    with pytest.raises(ValueError, match=r"missing \(1\): \['lm_head.weight'\][\s\S]*model.visual.extra.weight"):
        Qwen2_5_VL.from_pretrained(str(tmp_path))


def test_our_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = preset("tiny", vocab_size=VOCAB, **IDS)
    model = Qwen2_5_VL.from_config(cfg, seed=0).eval()
    model.save_pretrained(str(tmp_path))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids, mask, pv, grid = image_batch(seed=4)
    with torch.no_grad():
        out = model(ids, mask, pv, grid)
    assert_logits_match(out, hf_forward(hf, ids, mask, pv, grid), mask)


def test_image_token_count_mismatch_is_a_clear_error(ours):
    ids, mask, pv, grid = image_batch()
    ids[1, -1] = IMG  # one <|image_pad|> too many
    with pytest.raises(ValueError, match=r"<\|image_pad\|> tokens does not match the next image_grid_thw"):
        ours(ids, mask, pv, grid)  # caught first where the M-RoPE positions are laid out
    with pytest.raises(ValueError, match=r"37 <\|image_pad\|> tokens"):
        ours.embed(ids, pv, grid)  # and by the count check where image features replace the pads


def test_config_reads_flat_hub_layout_with_rope_scaling():
    d = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
         "num_attention_heads": 16, "num_key_value_heads": 2, "rope_theta": 1000000.0,
         "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
         "vision_config": {"out_hidden_size": 2048, "in_chans": 3}}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg == preset("qwen2.5-vl-3b")


def test_token_logps_equal_log_softmax_gather_values_and_gradients(ours):
    ids, mask, pv, grid = image_batch()
    k, temp = 5, 0.7
    ours.zero_grad()
    logps = ours.token_logps(ids, mask, pv, grid, logits_to_keep=k, temperature=temp, chunk_size=3)
    logps.sum().backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    logits = ours(ids, mask, pv, grid)[:, -k - 1:-1] / temp  # [B, k, V]
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, -k:, None]).squeeze(-1)
    ref.sum().backward()
    assert logps.shape == (2, k)
    assert (logps - ref).abs().max().item() <= 1e-5
    for g, p in zip(grads, ours.parameters()):
        assert (g - p.grad).abs().max().item() <= 1e-5
    ours.zero_grad()


def test_gradient_checkpointing_gives_the_same_gradients(ours):
    ids, mask, pv, grid = image_batch()
    grads = []
    for flag in (False, True):
        ours.train()
        ours.gradient_checkpointing = flag
        ours.zero_grad()
        ours(ids, mask, pv, grid)[mask.bool()].square().mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    ours.gradient_checkpointing = False
    ours.eval().zero_grad()
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-6


def test_kv_cache_prefill_and_decode_match_full_forward(ours):
    ids, mask, pv, grid = image_batch()
    completion = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])  # [B, C]
    full_ids = torch.cat([ids, completion], 1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    P, C = ids.shape[1], completion.shape[1]
    with torch.no_grad():
        full = ours(full_ids, full_mask, pv, grid)  # [B, P + C, V]
        cache = KVCache.for_model(ours, rows=2, max_len=P + C)
        _, deltas = ours.rope_index(ids, mask, grid)
        steps = [ours(ids, mask, pv, grid, kv_cache=cache, logits_to_keep=1)]
        for j in range(C - 1):  # feed completion token j, predict token j + 1
            steps.append(ours(completion[:, j:j + 1], full_mask[:, :P + j + 1], kv_cache=cache,
                              position_ids=decode_position_ids(deltas, cache.length, 1)))
    assert cache.length == P + C - 1
    assert (torch.cat(steps, 1) - full[:, P - 1:P + C - 1]).abs().max().item() <= 1e-4


def test_kv_cache_repeat_rows_serves_g_samples_per_prompt(ours):
    ids, mask, pv, grid = image_batch()
    G, P = 3, ids.shape[1]
    nxt = torch.tensor([[1], [2], [3], [4], [5], [6]])  # a different next token for each of B*G rows
    with torch.no_grad():
        cache = KVCache.for_model(ours, rows=2, max_len=P + 1)
        _, deltas = ours.rope_index(ids, mask, grid)
        ours(ids, mask, pv, grid, kv_cache=cache, logits_to_keep=1)
        cache = cache.repeat_rows(G)
        rep = lambda t: t.repeat_interleave(G, 0)
        step = ours(nxt, torch.cat([rep(mask), torch.ones_like(nxt)], 1), kv_cache=cache,
                    position_ids=decode_position_ids(rep(deltas), cache.length, 1))
        # reference: full forwards of each row (images repeated per row in prompt order)
        pv_rows = [pv[:24], pv[24:]]
        ref = []
        for r in range(2 * G):
            b = r // G
            row_ids = torch.cat([ids[b:b + 1], nxt[r:r + 1]], 1)
            row_mask = torch.cat([mask[b:b + 1], torch.ones(1, 1, dtype=torch.long)], 1)
            ref.append(ours(row_ids, row_mask, pv_rows[b], grid[b:b + 1])[:, -1:])
    assert (step - torch.cat(ref)).abs().max().item() <= 1e-4


def test_bfloat16_forward_stays_close_to_float32(untied):
    _, path = untied
    ids, mask, pv, grid = image_batch()
    with torch.no_grad():
        ref = Qwen2_5_VL.from_pretrained(path)(ids, mask, pv, grid)
        bf16 = Qwen2_5_VL.from_pretrained(path, dtype=torch.bfloat16)
        assert bf16.lm_head.weight.dtype == torch.bfloat16
        out = bf16(ids, mask, pv.bfloat16(), grid).float()
    m = mask.bool()
    assert torch.isfinite(out).all()
    assert (out[m] - ref[m]).abs().max().item() <= 0.05 * ref[m].abs().max().item()


def test_token_logps_with_frozen_lm_head_still_gives_hidden_gradients(ours):
    ids, mask, pv, grid = image_batch()
    ours.lm_head.weight.requires_grad_(False)
    try:
        ours.zero_grad()
        ours.token_logps(ids, mask, pv, grid, logits_to_keep=4).sum().backward()
        assert ours.lm_head.weight.grad is None
        assert ours.model.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    finally:
        ours.lm_head.weight.requires_grad_(True)
        ours.zero_grad()


# ---------------------------------------------------------------- vision attention by segments

def test_segment_attention_equals_block_diagonal_masked_sdpa():
    from mrgr1.vision import segment_attention, segments_by_length

    g = torch.Generator().manual_seed(0)
    lengths = [16, 8, 16, 4, 1, 16, 8, 12]  # repeated lengths share one batched call; a singleton too
    N, H, hd = sum(lengths), 2, 8
    q, k, v = (torch.randn(N, H, hd, generator=g, requires_grad=True) for _ in range(3))
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [N]
    mask = segment[:, None] == segment[None, :]  # [N, N] block-diagonal: the reference, built here only
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask).transpose(0, 1)  # [N, H, hd]
    segments = segments_by_length(lengths)
    assert [tuple(i.shape) for i in segments.groups] == [(1, 1), (1, 4), (2, 8), (1, 12), (3, 16)]
    out = segment_attention(q, k, v, segments)
    assert (out - ref).abs().max().item() <= 1e-6
    w = torch.randn(N, H, hd, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() <= 1e-5


class LargestTensor(TorchFunctionMode):
    """Records the element count of the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_vision_tower_on_many_images_builds_no_patches_by_patches_tensor(ours):
    visual = ours.model.visual
    # 160 images of 4x4 patches (one window each) + two larger ones with edge windows.
    grid = torch.tensor([[1, 4, 4]] * 160 + [[1, 10, 12], [1, 8, 6]])
    N = int(grid.prod(-1).sum())  # 2728 patches
    pv = torch.randn(N, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LargestTensor() as largest:
        out = visual(pv, grid)
    assert largest.numel >= N * visual.cfg.hidden_size  # it saw the per-patch activations
    # The largest tensor is per patch (the input pixels); a mask over the batch would be N x N.
    assert largest.numel <= N * pv.shape[1] < N * N
    # Attention never crosses images: each image alone gives the same tokens.
    starts = [0] + grid.prod(-1).cumsum(0).tolist()  # patch offset of each image
    with torch.no_grad():
        for i in (0, 159, 160, 161):
            one = visual(pv[starts[i]:starts[i + 1]], grid[i:i + 1])  # [n_i / 4, D]
            assert (one - out[starts[i] // 4:starts[i + 1] // 4]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- precomputed image features

def test_token_logps_with_image_features_equal_pixel_values_exactly(ours):
    ids, mask, pv, grid = image_batch()
    k = 4
    ours.zero_grad()
    ref = ours.token_logps(ids, mask, pv, grid, logits_to_keep=k)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if not n.startswith("model.visual.")}
    ours.zero_grad()
    with torch.no_grad():
        features = ours.image_features(pv, grid)  # [36, 64]: computed once, no graph
    out = ours.token_logps(ids, mask, None, grid, image_features=features, logits_to_keep=k)
    out.sum().backward()
    assert features.shape == (36, 64)
    assert torch.equal(out, ref)
    assert not features.requires_grad and features.grad is None
    assert all(p.grad is None for p in ours.model.visual.parameters())  # nothing flows into the tower
    for n, p in ours.named_parameters():
        if not n.startswith("model.visual."):
            assert torch.equal(p.grad, ref_grads[n]), n  # the decoder gets the same gradients
    assert ours.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    ours.zero_grad()


def test_features_once_per_prompt_repeated_for_g_rows_match_repeated_images(ours):
    ids, mask, pv, grid = image_batch()
    G, k = 3, 4
    rep = lambda t: t.repeat_interleave(G, 0)  # prompt b -> rows b*G .. b*G+G-1  # noqa: E731
    counts = (ids == IMG).sum(1).tolist()  # image tokens per prompt: [6, 30]
    with torch.no_grad():
        features = ours.image_features(pv, grid)  # [36, D], one pass over the B prompts' images
        row_features = torch.cat([f.repeat(G, 1) for f in features.split(counts)])  # [G*36, D]
        pv_rows = torch.cat([p.repeat(G, 1) for p in pv.split(grid.prod(-1).tolist())])  # each image G times
        ref = ours.token_logps(rep(ids), rep(mask), pv_rows, rep(grid), logits_to_keep=k)
        out = ours.token_logps(rep(ids), rep(mask), None, rep(grid), image_features=row_features,
                               logits_to_keep=k)
    assert out.shape == (2 * G, k)
    assert (out - ref).abs().max().item() <= 1e-5


def test_image_features_misuse_is_a_clear_error(ours):
    ids, mask, pv, grid = image_batch()
    with torch.no_grad():
        features = ours.image_features(pv, grid)
        with pytest.raises(ValueError, match="not both"):
            ours(ids, mask, pv, grid, image_features=features)
        with pytest.raises(ValueError, match="without image_grid_thw"):
            ours.embed(ids, image_features=features)
        with pytest.raises(ValueError, match=r"36 <\|image_pad\|> tokens .* give 35 features"):
            ours(ids, mask, None, grid, image_features=features[:-1])


def test_vision_tower_matches_transformers_on_mixed_sizes_and_two_frames(untied, ours):
    hf, _ = untied
    grid = torch.tensor([[1, 4, 6], [2, 8, 6], [1, 10, 12], [1, 4, 6]])  # repeated size, t = 2, edge windows
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
        out = ours.model.visual(pv, grid)
    assert out.shape == ref.shape == (6 + 24 + 30 + 6, 64)
    assert (out - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- attention kernels

class SdpaCalls(TorchFunctionMode):
    """Records the attn_mask / is_causal of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return func(*args, **kwargs)


def test_rows_padded_on_the_right_only_attend_causally_without_a_mask(ours):
    """No left padding: SDPA gets no mask (is_causal: the fast kernels take it), and every real
    position's output equals the one under the explicit padding mask."""
    from mrgr1.language import attention_mask_4d
    ids = torch.randint(0, VOCAB - 10, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # row 1 right padded (a finished completion)
    decoder, embeds = ours.model.language_model, ours.embed(ids)
    positions = ours.rope_index(ids, mask)[0]
    with torch.no_grad(), SdpaCalls() as spy:
        got = decoder(embeds, positions, mask)
    assert len(spy.calls) == 2 and all(m is None and causal for m, causal in spy.calls)
    with torch.no_grad(), SdpaCalls() as spy:
        expected = decoder(embeds, positions, attention_mask_4d(mask, 7))  # a ready mask is used as given
    assert all(m is not None for m, _ in spy.calls)
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_left_padded_rows_keep_their_mask(ours):
    ids, mask, pv, grid = image_batch()
    with torch.no_grad(), SdpaCalls() as spy:
        ours(ids, mask, pv, grid)
    decoder_calls = spy.calls[-ours.cfg.text.num_hidden_layers:]
    assert all(m is not None and m.shape == (2, 1, ids.shape[1], ids.shape[1]) for m, _ in decoder_calls)


class HostReads(TorchFunctionMode):
    """Counts the tensor -> Python reads (bool(), item(), tolist()) that would sync a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__bool__", "item", "tolist", "__int__", "__float__"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_decode_step_reads_nothing_back_from_the_device(ours):
    from mrgr1.generate import decode_one_token
    ids, mask, pv, grid = image_batch()
    position_ids, deltas = ours.rope_index(ids, mask, grid)
    cache = KVCache.for_model(ours, 2, ids.shape[1] + 4)
    with torch.no_grad():
        ours(ids, mask, pv, grid, position_ids=position_ids, kv_cache=cache, logits_to_keep=1)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        positions = decode_position_ids(deltas, cache.length, 1)[0, :, 0]
        with HostReads() as spy:
            decode_one_token(ours, torch.tensor([3, 4]), step_mask, positions, cache)
    assert spy.reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's kernel choice")
def test_on_cuda_masked_gqa_attention_runs_on_the_memory_efficient_kernel_and_causal_on_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mrgr1.language import attend, attention_mask_4d
    q = torch.randn(2, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = attention_mask_4d(torch.tensor([[0, 0] + [1] * 14, [1] * 16], device="cuda"), 16)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # raises if it cannot serve the call
        masked = attend(q, k, v, mask)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        causal = attend(q, k, v, None)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert (masked.float() - expected)[1].abs().max() < 2e-2 and causal.shape == masked.shape
