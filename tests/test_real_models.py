"""Models as users call them: transformers' GPT-2, BERT and Llama (built from configs, no
downloads) with padded 2-D attention masks, eager and sdpa attention, the stock
nn.TransformerEncoder with a padding mask, and an LSTM language model. Exact against the oracle
with batch_dim=0 on the first call (where transformers' mask code branches on the mask's values,
which vmap cannot run) and on a later one (the run on the whole batch, where it applies)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from oracle import flat_gramian
from torch import nn
from torch.func import functional_call

import torchgram

transformers.logging.set_verbosity_error()

D = torch.float64
B, T, VOCAB = 4, 6, 40


def _hf(kind: str, attention: str) -> nn.Module:
    small = {"vocab_size": VOCAB, "attn_implementation": attention}
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=T, **small)
        model = transformers.GPT2LMHeadModel(config)  # tied input and output embeddings
    elif kind == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=T, num_labels=3, **small,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32, max_position_embeddings=T, **small,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    return model.double().eval()


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding on two samples
    mask[3, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_transformers_with_padding_masks(kind, attention) -> None:
    model = _hf(kind, attention)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(params, ids, mask):  # one loss per sequence
        out = functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask})
        return out.logits.pow(2).flatten(1).mean(1)

    transform = torchgram.gramian_of(losses, batch_dim=0)
    for _ in range(2):
        ids, mask = _padded()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no call loops over the samples
            G = transform(params, ids, mask)
        expected = flat_gramian(losses, params, ids, mask)
        assert float((G - expected).abs().max() / expected.abs().max()) < 1e-10


def test_stock_transformer_encoder_with_a_padding_mask() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    params = {k: v.detach() for k, v in encoder.named_parameters()}
    x = torch.randn(B, T, 8, dtype=D)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, 4:] = True

    def losses(params, x, padding):
        out = functional_call(encoder, params, (x,), {"src_key_padding_mask": padding})
        return out.pow(2).mean((1, 2))

    for batch_dim in (0, None):
        G = torchgram.gramian(losses, params, x, padding, batch_dim=batch_dim)
        expected = flat_gramian(losses, params, x, padding)
        assert float((G - expected).abs().max() / expected.abs().max()) < 1e-10


def test_lstm_language_model() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.lstm = nn.LSTM(8, 8, num_layers=2, batch_first=True)
            self.head = nn.Linear(8, VOCAB)

        def forward(self, ids):
            return self.head(self.lstm(self.embed(ids))[0])

    model = LM().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, VOCAB, (B, T))

    def losses(params, ids):
        logits = functional_call(model, params, (ids,))
        return nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        ).mean(1)

    for batch_dim in (0, None):
        G = torchgram.gramian(losses, params, ids, batch_dim=batch_dim)
        expected = flat_gramian(losses, params, ids)
        assert float((G - expected).abs().max() / expected.abs().max()) < 1e-10


def test_transformers_in_training_mode_with_dropout() -> None:
    """vmap cannot run BERT's mask code, and fn run on each sample in turn draws its dropout
    masks in another order than on the batch: the runs compared on the first call run without
    dropout, and the Gramian returned is that of fn with the masks one plain call draws."""
    model = _hf("bert", "eager").train()
    assert model.config.hidden_dropout_prob > 0
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(params, ids, mask):
        out = functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask})
        return out.logits.pow(2).sum(-1)

    transform = torchgram.gramian_of(losses, batch_dim=0)
    for seed in (0, 1):
        ids, mask = _padded()
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            G = transform(params, ids, mask)
        after = torch.rand(())
        torch.manual_seed(seed)
        J = torch.func.jacrev(losses)(params, ids, mask)
        J = torch.cat([j.reshape(B, -1) for j in J.values()], dim=1)
        assert torch.equal(after, torch.rand(()))  # the generator moved as by one call of fn
        expected = J @ J.T
        assert float((G - expected).abs().max() / expected.abs().max()) < 1e-10
