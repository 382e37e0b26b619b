"""Hugging Face models with tied weights, built from small configs (nothing is downloaded).

GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight``, BERT its MLM decoder to the word
embeddings, T5 one Parameter between ``shared``, both ``embed_tokens`` and ``lm_head``. Each is
constrained with one ordinary rule, trained, run, checked, round-tripped and baked. A tied
Llama is trained with activation checkpointing (both kinds) to the bits of the plain path.
"""

import tempfile

import pytest
import torch
from torch import nn

from torchconstrain import Clamp, FixedMask, LearnableMask, bake, check, constrain, penalty, set_fast_path

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 100


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


def t5():
    config = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                                   vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


# (build, rule, the names of the tied Parameter)
MODELS = {
    "gpt2": (gpt2, {nn.Linear: Clamp(-0.05, 0.05)}, ["transformer.wte.weight", "lm_head.weight"]),
    "bert": (bert, {nn.Linear: FixedMask.magnitude(sparsity=0.5)},
             ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"]),
    "t5": (t5, {nn.Linear: LearnableMask(per="channel", hard=True, init=0.6)},
           ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]),
}


def build(name: str):
    make, rules, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    return model, constrain(model, rules)


def tied_weights(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """What each name reads: the effective tensor while constrained, the Parameter once baked."""
    return [getattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in names]


def outputs(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and what the model generates (BERT: its masked-token predictions)."""
    with torch.no_grad():
        logits = model(input_ids=tokens, labels=tokens).logits
        if hasattr(model, "generate"):
            return logits, model.generate(input_ids=tokens, max_new_tokens=3, do_sample=False)
        return logits, logits.argmax(-1)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_tied_language_model_trains_generates_checks_round_trips_and_bakes(name):
    make, rules, tied = MODELS[name]
    model, report = build(name)
    assert set(tied) <= set(report.names())  # a rule on one name constrains them all
    stored = model.get_input_embeddings().parametrizations.weight.original
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    tokens = torch.randint(2, VOCAB, (2, 8))
    for _ in range(3):
        optimizer.zero_grad()
        (model(input_ids=tokens, labels=tokens).loss + penalty(model)).backward()
        optimizer.step()
    check(model)
    first, *others = tied_weights(model, tied)
    assert all(torch.equal(first, other) for other in others)  # every use reads the constrained tensor
    model.eval()
    expected = outputs(model, tokens)

    twin, _ = build(name)  # a state_dict before bake, into a model constrained with the same rules
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.eval()
    assert all(torch.equal(a, b) for a, b in zip(outputs(twin, tokens), expected))

    bake(model)
    weights = tied_weights(model, tied)
    assert all(weight is stored for weight in weights)  # the tie restored: one Parameter, the original one
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, tokens), expected))
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = type(model).from_pretrained(directory).eval()
    assert all(weight is tied_weights(reloaded, tied)[0] for weight in tied_weights(reloaded, tied))
    assert all(torch.equal(a, b) for a, b in zip(outputs(reloaded, tokens), expected))


def test_a_clamp_on_gpt2s_output_layer_holds_for_its_embedding_lookups():
    model, _ = build("gpt2")
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    tokens = torch.randint(0, VOCAB, (2, 8))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    assert model.transformer.wte.parametrizations.weight.original.abs().max() > 0.05
    assert model.transformer.wte(torch.arange(VOCAB)).abs().max() <= 0.05


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def checkpointed_training(reentrant: bool) -> list[torch.Tensor]:
    """Losses, gradients and eval logits of three AdamW steps of a tied Llama with gradient checkpointing."""
    torch.manual_seed(0)
    model = llama()
    constrain(model, {nn.Linear: [Clamp(-0.05, 0.05), FixedMask.magnitude(sparsity=0.5)],
                      "*.mlp.up_proj.weight": LearnableMask(per="channel", init=0.6)}, existing="stack")
    options = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (gradient_... is deprecated there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        assert model.is_gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    tokens = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    record = []
    for _ in range(3):
        model.train()
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss + penalty(model)
        loss.backward()
        record += [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        optimizer.step()
        model.eval()
        with torch.no_grad():
            record.append(model(input_ids=tokens).logits)
    check(model)
    return record


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_a_llama_to_the_bits_of_the_plain_path(reentrant):
    fast = checkpointed_training(reentrant)
    with set_fast_path(False):
        plain = checkpointed_training(reentrant)
    assert len(fast) == len(plain) > 3
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
