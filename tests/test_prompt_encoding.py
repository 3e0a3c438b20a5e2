"""Prompt encoding vs the references on the same tiny random weights: clip_skip vs diffusers' ``clip_skip``, long
prompts vs compel, weighted prompts vs a hand-computed WebUI reference; plain prompts bit for bit as before.

The tiny text encoder goes diffusers folder -> our converter -> our cells; the references run the exported folder's
transformers ``CLIPTextModel`` and tokenizer. Contexts must agree to 1e-5 relative (max |diff| / max |ref|): both
sides are float32 with the same operations, only summation order and the softmax/GELU kernels differ (the tolerance
of ``tests/test_text_encoders.py``).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
from ldm.io.model_io import load_pretrained
from ldm.models.diffusion import build_model_from_config
from ldm.pipeline import Text2ImagePipeline
from ldm.prompt_encoding import encode_prompts, prompt_chunks
from ldm.prompt_syntax import PromptSyntaxError, parse_prompt_weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tiny_diffusers import save_folder  # noqa: E402

RTOL = 1e-5
SHORT = ["a photo of an astronaut riding a horse", "a watercolor painting of a fox"]
# 175 tokens: three 75-token chunks (the weighted prompt below has 207).
LONG = ", ".join(["a red fox in the snow under a pale winter sky with tall pine trees"] * 11)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    """(diffusers pipeline, our model) on the same tiny random weights."""
    family = request.param
    src = tmp_path_factory.mktemp("src")
    save_folder(src, family=family)
    state, config = read_diffusers_folder(src)
    with pytest.warns(UserWarning) if family == "sd2" else _no_warning():
        export = write_diffusers_folder(state, config, tmp_path_factory.mktemp("exp") / "pipe")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    model = build_model_from_config(config)
    load_pretrained(model, src)
    return ref, model


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _hf_chunks(tokenizer, fragments) -> tuple[np.ndarray, np.ndarray]:
    """Reference ids and weights: each fragment tokenized by transformers, 75-token pieces between BOS/EOS, padded
    with the tokenizer's pad id."""
    ids, weights = [], []
    for text, weight in fragments:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    rows, row_weights = [], []
    for i in range(0, max(len(ids), 1), 75):
        piece, w = ids[i : i + 75], weights[i : i + 75]
        pad = 75 - len(piece)
        rows.append([tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        row_weights.append([1.0, *w, 1.0] + [1.0] * pad)
    return np.array(rows), np.array(row_weights, np.float32)


def test_parse_weights_webui_examples():
    """The WebUI's own examples (its ``parse_prompt_attention`` docstring), weights computed by hand."""
    assert parse_prompt_weights("normal text") == [("normal text", 1.0)]
    assert parse_prompt_weights("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_weights(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_weights("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_prompt_weights("a ((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1), ("house", 1.3 * 1.1), (" ", 1), ("on", 1 / 1.1), (" a ", 1), ("hill", 0.5), (", sun, ", 1)]
    want += [("sky", 1.1**3), (".", 1)]
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)
    assert parse_prompt_weights("ratio 16:9 (a: b)") == [("ratio 16:9 ", 1.0), ("a: b", 1.1)]
    assert parse_prompt_weights("") == [("", 1.0)]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a (red fox", "'(' at character 3 is never closed"),
        ("a red) fox", "')' at character 6 closes no bracket"),
        ("a [red:1.2) fox", "')' at character 11 closes '[' opened at character 3"),
        ("((a) [b)]", "')' at character 8 closes '[' opened at character 6"),
    ],
)
def test_unbalanced_brackets_name_the_position(prompt, message):
    with pytest.raises(PromptSyntaxError, match=re.escape(message)):
        parse_prompt_weights(prompt)


def test_plain_prompts_bit_for_bit(pair):
    """Prompts that fit 77 tokens: the same contexts, bit for bit, as tokenize + encoder gave before: without
    weights, and with weighting off (the default) for brackets too (captions such as the tiny SD's hold tags)."""
    _, model = pair
    import mindspore as ms

    captions = ["a clip art drawing of a red apple (fruit, food)", "a [draft] of (a) house:1.2)"]
    for prompts, weighting in ((SHORT + [""], True), (captions, False)):
        before = model.get_learned_conditioning(ms.Tensor(model.tokenize(prompts))).asnumpy()
        after = Text2ImagePipeline(model, prompt_weighting=weighting).encode_prompts(prompts).asnumpy()
        assert after.shape == before.shape and np.array_equal(after, before)
    weighted = Text2ImagePipeline(model, prompt_weighting=True).encode_prompts(captions[:1]).asnumpy()
    assert not np.array_equal(weighted, before[:1])


def test_clip_skip_matches_diffusers(pair):
    """clip_skip 1 = the penultimate layer through the final LayerNorm, as diffusers' ``encode_prompt(clip_skip=1)``
    (for SD2 that is one more layer off the 23 of the converted encoder, as diffusers does on an SD2 folder)."""
    ref, model = pair
    embedder = model.cond_stage_model
    if not hasattr(ref.text_encoder, "text_model"):
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5 flattened into
        # text_encoder.final_layer_norm: point the old name at the same module (a plain attribute, not a submodule).
        object.__setattr__(
            ref.text_encoder, "text_model", SimpleNamespace(final_layer_norm=ref.text_encoder.final_layer_norm)
        )
    for clip_skip in (0, 1):
        ours = encode_prompts(embedder, SHORT, clip_skip).asnumpy()
        with torch.no_grad():
            theirs, _ = ref.encode_prompt(SHORT, "cpu", 1, False, clip_skip=clip_skip or None)
        err = _rel_err(ours, theirs.numpy())
        print(f"{embedder.family} clip_skip {clip_skip}: rel err {err:.2e}")
        assert err < RTOL
    assert _rel_err(encode_prompts(embedder, SHORT, 1).asnumpy(), encode_prompts(embedder, SHORT).asnumpy()) > 1e-2
    with pytest.raises(ValueError, match=r"clip_skip 2 must be in \[0, 1\] for this 2-layer text encoder"):
        encode_prompts(embedder, SHORT, 2)


def test_long_prompts_match_compel(pair):
    """A 3-chunk prompt and a 1-chunk negative prompt vs compel (no truncation, BRUTAL 75-token split), the negative
    padded with the empty text's chunks by both."""
    compel = pytest.importorskip("compel")
    ref, model = pair
    pipe = Text2ImagePipeline(model)
    ours = pipe.encode_prompts([LONG, SHORT[0]]).asnumpy()
    assert ours.shape[1] == 3 * 77 and len(model.tokenize([LONG])) == 1
    negative = pipe.encode_prompts(["blurry"])
    from ldm.prompt_encoding import same_length

    negative, _ = same_length(negative, pipe.encode_prompts([LONG]), pipe.empty_chunk)
    proc = compel.Compel(
        tokenizer=ref.tokenizer,
        text_encoder=ref.text_encoder,
        truncate_long_prompts=False,
        split_long_text_mode=compel.embeddings_provider.SplitLongTextMode.BRUTAL,
    )
    with torch.no_grad():
        theirs = proc([LONG, SHORT[0]]).numpy()
        long_ref, neg_ref = proc.pad_conditioning_tensors_to_same_length([proc(LONG), proc("blurry")])
    err, neg_err = _rel_err(ours, theirs), _rel_err(negative.asnumpy(), neg_ref.numpy())
    print(f"{model.cond_stage_model.family} long prompt vs compel: rel err {err:.2e}, padded negative {neg_err:.2e}")
    assert err < RTOL and neg_err < RTOL and long_ref.shape == theirs[:1].shape


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_weighted_long_prompt_matches_hand_reference(pair, clip_skip):
    """The WebUI rule computed by hand with transformers: each 77-token chunk's last (or clip-skipped) hidden state
    times its tokens' weights, rescaled to the chunk's unweighted mean; fragments written out by hand."""
    ref, model = pair
    prompt = f"a (red fox:1.3) [[in the snow]], ((under a pale sky)), {LONG}, (pine trees:0.7)"
    fragments = [("a ", 1.0), ("red fox", 1.3), (" ", 1.0), ("in the snow", 1 / 1.21), (", ", 1.0)]
    fragments += [("under a pale sky", 1.21), (f", {LONG}, ", 1.0), ("pine trees", 0.7)]
    ids, weights = _hf_chunks(ref.tokenizer, fragments)
    our_ids, our_weights = prompt_chunks(model.cond_stage_model.tokenizer, prompt)
    np.testing.assert_array_equal(our_ids, ids)
    np.testing.assert_allclose(our_weights, weights, rtol=1e-6)
    with torch.no_grad():
        out = ref.text_encoder(torch.from_numpy(ids), output_hidden_states=True)
        z = (
            out.last_hidden_state
            if clip_skip == 0
            else ref.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        )
        w = torch.from_numpy(weights)[..., None]
        original = z.mean(dim=(1, 2), keepdim=True)
        weighted = z * w
        want = (weighted * (original / weighted.mean(dim=(1, 2), keepdim=True))).reshape(1, -1, z.shape[-1])
    ours = encode_prompts(model.cond_stage_model, [prompt], clip_skip, weighting=True).asnumpy()
    err = _rel_err(ours, want.numpy())
    unweighted = _rel_err(ours, z.reshape(1, -1, z.shape[-1]).numpy())
    print(f"{model.cond_stage_model.family} weighted, clip_skip {clip_skip}: rel err {err:.2e}")
    assert ours.shape == (1, 3 * 77, 32) and err < RTOL and unweighted > 1e-2
