"""Any Hugging Face masked LM (BERT, RoBERTa, ModernBERT, DistilBERT, ...) or published
diffusion LM (MDLM, LLaDA, Dream) behind the denoiser seam, as an absorbing-state denoiser.

The seam needs the final hidden states *before* the output head, and the head itself, so that
an adaptor can act in between. For each architecture we name the head: a small table, since
every family calls it something else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel


def _bert_head(model) -> nn.Module:
    return model.cls


def _roberta_head(model) -> nn.Module:
    return model.lm_head


def _modernbert_head(model) -> nn.Module:
    return nn.Sequential(model.head, model.decoder)


def _distilbert_head(model) -> nn.Module:
    return nn.Sequential(
        model.vocab_transform, model.activation, model.vocab_layer_norm, model.vocab_projector
    )


#: model_type -> function returning the module that maps final hidden states to logits.
HEADS: dict[str, Callable[[PreTrainedModel], nn.Module]] = {
    "bert": _bert_head,
    "roberta": _roberta_head,
    "xlm-roberta": _roberta_head,
    "camembert": _roberta_head,
    "esm": _roberta_head,
    "modernbert": _modernbert_head,
    "distilbert": _distilbert_head,
}


class HFMaskedLMDenoiser(nn.Module):
    """Wraps a `transformers` masked LM as a time-agnostic absorbing-state denoiser.

    Args:
        model: the masked LM (e.g. from `AutoModelForMaskedLM.from_pretrained`).
        mask_token_id: the tokenizer's mask token.
        head: module mapping (..., d) hidden states to (..., V) logits; looked up by
            `model.config.model_type` in `HEADS` when omitted.
    """

    time_conditioned = False

    def __init__(self, model: PreTrainedModel, mask_token_id: int, head: nn.Module | None = None):
        super().__init__()
        model_type = model.config.model_type
        if head is None:
            if model_type not in HEADS:
                raise ValueError(
                    f"no output head known for model_type {model_type!r}; pass `head=` "
                    f"explicitly (known: {', '.join(sorted(HEADS))})"
                )
            head = HEADS[model_type](model)
        self.model = model
        self.head = head
        self.mask_token_id = mask_token_id
        self.config = model.config

    @property
    def trunk(self) -> nn.Module:
        return self.model.base_model

    def hidden_states(self, input_ids, attention_mask=None, t=None, condition_mask=None):
        """(B, L) -> final hidden states (B, L, d) of the encoder, before the head."""
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def layer_states(self, input_ids, attention_mask=None, t=None) -> tuple[torch.Tensor, ...]:
        """The encoder's states (each (B, L, d)): embeddings, every layer's output, and the final
        hidden states once more, so index -1 is always `hidden_states`' output."""
        out = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return (*out.hidden_states, out.last_hidden_state)

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)


def load_hf_masked_lm(
    name_or_path: str, trust_remote_code: bool = False, **kwargs
) -> tuple[HFMaskedLMDenoiser, object]:
    """Load a hub or local masked LM and its tokenizer as a denoiser.

    Published diffusion LMs ship their own modelling code (`kuleshov-group/mdlm-owt`,
    `GSAI-ML/LLaDA-8B-Base`, `Dream-org/Dream-v0-Base-7B`): they load only with
    `trust_remote_code=True`, which the user must ask for explicitly, and need `head=` given.
    """
    from ..tokenizer import load_tokenizer

    model = AutoModelForMaskedLM.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    return HFMaskedLMDenoiser(model, tokenizer.mask_token_id), tokenizer
