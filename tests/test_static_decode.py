"""Specification of generate's static decode step (decode="static") and its CUDA graph ("graph").

The static step attends over the whole preallocated KV cache through a mask and reads the step's
cache column and positions from device tensors, so its shapes never change (what a CUDA graph
needs). Oracles: the eager step (decode="eager", itself checked against transformers in
test_generate.py) and the model's full, uncached forward over prompt + completion.
The batch is left padded, has one image per prompt and prompts of different lengths.
"""
import pytest
import torch

from mrgr1 import language
from test_generate import IMAGE, VEND, VSTART, batch, models, ours, patch_spans  # noqa: F401 (fixtures)

VISION_IDS = (VSTART, VEND, IMAGE, IMAGE + 1)  # never sampled (as pipeline.special_ids does)


def completion_logps(model, batch, cpu_batch, completions, mask, G: int, temperature: float):
    """model.token_logps of each sampled completion after its prompt (G rows per prompt) -> [N, C]:
    what a sampler that returns log-probs must match. cpu_batch gives the patch spans."""
    rows = lambda x: x.repeat_interleave(G, dim=0)  # noqa: E731
    pixels = torch.cat([batch["pixel_values"][a:b] for a, b in patch_spans(cpu_batch) for _ in range(G)])
    with torch.no_grad():
        return model.token_logps(torch.cat([rows(batch["input_ids"]), completions], 1),
                                 torch.cat([rows(batch["attention_mask"]), mask], 1), pixels,
                                 rows(batch["image_grid_thw"]), logits_to_keep=completions.shape[1],
                                 temperature=temperature)


def eos_ids_hit_at_different_steps(model, batch, new_tokens):
    """Several EOS ids that end the greedy rows at different steps: each row's token at step 2 + row."""
    free, _ = ours(model, batch, new_tokens, temperature=0, decode="eager")
    return tuple(int(free[row, 2 + row]) for row in range(free.shape[0]))


def both_paths(model, batch, new_tokens, seed=None, **kwargs):
    """(eager output, static output) of the same call; each gets a fresh generator with `seed`."""
    gen = lambda: None if seed is None else torch.Generator().manual_seed(seed)  # noqa: E731
    return [ours(model, batch, new_tokens, decode=mode, generator=gen(), return_logps=True, **kwargs)
            for mode in ("eager", "static")]


def test_static_greedy_tokens_equal_eager_with_several_eos_ids(models, batch):
    _, model = models
    eos = eos_ids_hit_at_different_steps(model, batch, 12)
    (tokens, mask, logps), (s_tokens, s_mask, s_logps) = both_paths(
        model, batch, 12, temperature=0, num_samples=2, eos_token_ids=eos, pad_token_id=0)
    assert torch.equal(s_tokens, tokens) and torch.equal(s_mask, mask)
    assert len(set(mask.sum(1).tolist())) > 1  # the rows did stop at different steps
    torch.testing.assert_close(s_logps, logps, atol=1e-5, rtol=1e-5)


def test_static_samples_equal_eager_under_a_seeded_generator(models, batch):
    _, model = models
    eos = tuple(range(40, 60))  # 20 of 300 ids: sampled rows end at scattered steps
    (tokens, mask, logps), (s_tokens, s_mask, s_logps) = both_paths(
        model, batch, 16, seed=5, temperature=1.0, top_p=0.9, top_k=50, num_samples=4,
        eos_token_ids=eos, suppress_token_ids=VISION_IDS)
    assert torch.equal(s_tokens, tokens) and torch.equal(s_mask, mask)
    assert len(set(mask.sum(1).tolist())) > 1 and not torch.isin(tokens, torch.tensor(VISION_IDS)).any()
    torch.testing.assert_close(s_logps, logps, atol=1e-5, rtol=1e-5)


def test_static_step_logits_equal_the_full_uncached_forward(models, batch):
    _, model = models
    calls = []  # the lm_head's output: the prefill's last position, then one [R, V] per static step
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(out))
    try:
        completions, mask = ours(model, batch, 8, temperature=0, decode="static")
    finally:
        handle.remove()
    with torch.no_grad():
        full = model(torch.cat([batch["input_ids"], completions], 1), torch.cat([batch["attention_mask"], mask], 1),
                     batch["pixel_values"], batch["image_grid_thw"])  # [B, P+8, V]
    prompt_len = batch["input_ids"].shape[1]
    assert len(calls) == 8
    for step, logits in enumerate(calls):
        logits = logits[:, -1] if logits.dim() == 3 else logits  # prefill [B, 1, V], steps [B, V]
        torch.testing.assert_close(logits, full[:, prompt_len - 1 + step], atol=1e-4, rtol=1e-4)


def test_static_step_has_the_same_attention_shapes_every_step(models, batch, monkeypatch):
    _, model = models
    shapes = []  # (keys, mask) shapes of every decode step's attention, all layers
    one_query = language.grouped_query_step

    def recording(q, k, v, mask):
        shapes.append((tuple(k.shape), tuple(mask.shape)))
        return one_query(q, k, v, mask)

    monkeypatch.setattr(language, "grouped_query_step", recording)
    ours(model, batch, 6, temperature=0, decode="static")
    total_len = batch["input_ids"].shape[1] + 6
    assert len(shapes) == 5 * model.cfg.text.num_hidden_layers  # 5 decode steps after the prefill
    (k_shape, mask_shape), = set(shapes)
    assert k_shape[2] == total_len and mask_shape == (3, 1, 1, total_len)  # the whole cache, every step


def test_static_generation_stops_once_every_row_is_done(models, batch):
    _, model = models
    eos = eos_ids_hit_at_different_steps(model, batch, 10)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(1))
    try:
        _, mask = ours(model, batch, 10, temperature=0, eos_token_ids=eos, decode="static")
    finally:
        handle.remove()
    last = int(mask.sum(1).max()) - 1  # the step at which the last row took its EOS
    assert last < 9 and len(calls) == last + 1  # the prefill, then one static step per later token, then stop
    assert not mask[:, last + 1:].any()


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_logps_are_over_the_whole_vocabulary_when_tokens_are_suppressed(models, batch, decode):
    """The contract of return_logps: the model's log-prob of the token (what model.token_logps gives),
    not the log-prob under the renormalised distribution without the suppressed ids."""
    _, model = models
    suppressed = tuple(range(0, 290, 3)) + VISION_IDS  # a third of the vocabulary
    completions, mask, logps = ours(model, batch, 5, num_samples=2, temperature=0.8, return_logps=True,
                                    suppress_token_ids=suppressed, generator=torch.Generator().manual_seed(2),
                                    decode=decode)
    assert not torch.isin(completions, torch.tensor(suppressed)).any()
    expected = completion_logps(model, batch, batch, completions, mask, G=2, temperature=0.8)
    torch.testing.assert_close(logps, expected * mask, atol=1e-4, rtol=1e-4)


def test_unknown_decode_mode_and_graph_off_cuda_are_rejected(models, batch):
    _, model = models
    with pytest.raises(ValueError, match="choose one of"):
        ours(model, batch, 2, temperature=0, decode="fast")
    with pytest.raises(ValueError, match="CUDA graph"):
        ours(model, batch, 2, temperature=0, decode="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a CUDA device")
def test_graph_tokens_and_samples_equal_eager_on_cuda(models, batch):
    """fp32 without TF32, so both paths do the same maths; the graph is recorded after 2 warm-up steps
    and replayed for the other 13."""
    _, model = models
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda_model = type(model).from_config(model.cfg).cuda().eval()
    cuda_model.load_state_dict(model.state_dict())
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    eos = eos_ids_hit_at_different_steps(cuda_model, cuda_batch, 16)
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, top_k=50, suppress_token_ids=VISION_IDS)):
        out = {mode: ours(cuda_model, cuda_batch, 16, num_samples=4, eos_token_ids=eos, decode=mode,
                          generator=torch.Generator(device="cuda").manual_seed(7), **kwargs)
               for mode in ("eager", "static", "graph")}
        for mode in ("static", "graph"):
            assert torch.equal(out[mode][0], out["eager"][0]), (mode, kwargs)
            assert torch.equal(out[mode][1], out["eager"][1]), (mode, kwargs)


def on_cuda(model, batch, dtype):
    """A CUDA copy of `model` in `dtype` (its own weights, the CPU model untouched) and of `batch`."""
    cuda_model = type(model).from_config(model.cfg).eval()
    cuda_model.load_state_dict(model.state_dict())
    cuda_model = cuda_model.to("cuda", dtype)
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    cuda_batch["pixel_values"] = cuda_batch["pixel_values"].to(dtype)
    return cuda_model, cuda_batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a CUDA device")
def test_graph_records_once_and_replays_every_later_token_on_cuda(models, batch, monkeypatch):
    """16 greedy tokens, no EOS (so no compaction): token 0 comes from the prefill, tokens 1-2 from
    the warm-up steps, token 3 from the first replay of the recording, and 4-15 from replays: the
    model's Python forward runs 1 + 2 + 1 (the recording) times, the graph replays 13 times, and
    the tokens are the eager step's."""
    from mrgr1 import fast_decode

    _, model = models
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda_model, cuda_batch = on_cuda(model, batch, torch.float32)
    replays, forwards = [], []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    handle = cuda_model.lm_head.register_forward_hook(lambda mod, args, out: forwards.append(1))
    try:
        graph_tokens, graph_mask = ours(cuda_model, cuda_batch, 16, temperature=0, decode="graph")
    finally:
        handle.remove()
    eager_tokens, eager_mask = ours(cuda_model, cuda_batch, 16, temperature=0, decode="eager")
    assert len(forwards) == 1 + fast_decode.GRAPH_WARMUP_STEPS + 1
    assert len(replays) == 16 - 1 - fast_decode.GRAPH_WARMUP_STEPS
    assert torch.equal(graph_tokens, eager_tokens) and bool(graph_mask.all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a CUDA device")
def test_graph_in_bf16_on_cuda_replays_the_static_step_bit_for_bit_log_probs_included(models, batch):
    """bf16, sampled (temperature, top-k, top-p, suppressed ids), EOS ids that end rows at scattered
    steps (so the batch is compacted and a second graph recorded), log-probs taken inside the graph:
    the graph replays the static step's kernels, so tokens, mask and log-probs equal decode="static"
    bit for bit; the log-probs are the model's own (model.token_logps of the finished sequences, in
    bf16: within 0.1 nats, where a wrong or unrecorded one is off by about 1 or more)."""
    _, model = models
    cuda_model, cuda_batch = on_cuda(model, batch, torch.bfloat16)
    kwargs = dict(num_samples=4, temperature=1.0, top_p=0.9, top_k=50, eos_token_ids=tuple(range(40, 60)),
                  suppress_token_ids=VISION_IDS, return_logps=True)
    out = {mode: ours(cuda_model, cuda_batch, 16, decode=mode, generator=torch.Generator(device="cuda").manual_seed(7),
                      **kwargs) for mode in ("static", "graph")}
    for got, expected in zip(out["graph"], out["static"]):
        assert torch.equal(got, expected)
    completions, mask, logps = out["graph"]
    assert len(set(mask.sum(1).tolist())) > 1 and int(mask.sum(1).max()) > 3  # scattered ends, replays happened
    expected = completion_logps(cuda_model, cuda_batch, batch, completions, mask, G=4, temperature=1.0)
    torch.testing.assert_close(logps, (expected * mask).float(), atol=0.1, rtol=0)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_compacting_finished_rows_changes_no_greedy_token(models, batch, monkeypatch, decode):
    """Once at most half of the rows run, generate goes on with those rows only; the lm_head then sees
    fewer rows, and every row's tokens are those of the uncompacted run."""
    from mrgr1 import generate as generate_module

    _, model = models
    eos = eos_ids_hit_at_different_steps(model, batch, 10)  # prompt r: its greedy token at step 2 + r
    runs = {}
    for compact_at in (0.0, 0.5):
        monkeypatch.setattr(generate_module, "COMPACT_AT", compact_at)
        rows_seen = []
        handle = model.lm_head.register_forward_hook(lambda mod, args, out: rows_seen.append(out.shape[0]))
        try:
            runs[compact_at] = ours(model, batch, 10, temperature=0, num_samples=2, eos_token_ids=eos, decode=decode)
        finally:
            handle.remove()
        runs[compact_at, "rows"] = rows_seen
    assert max(runs[0.0, "rows"][1:]) == 6 and min(runs[0.5, "rows"][1:]) < 6  # compaction happened
    assert torch.equal(runs[0.5][0], runs[0.0][0]) and torch.equal(runs[0.5][1], runs[0.0][1])
