"""A transformers causal LM whose next-token logits are a fixed function of the last two input ids.

Used to run ``transformers``' own ``generate(num_beams=...)`` and the engine's beam search on the
same logits: both call :func:`logits_of` on the same (rows, length) token tensors, so the two
searches see bit-identical logits and must make identical choices.
"""
import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutput

VOCAB = 40
EOS = 7


def tables(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, VOCAB, generator=g) * 2, torch.randn(VOCAB, VOCAB, generator=g)


def logits_of(ids: torch.Tensor, eos_bias: float, last, before) -> torch.Tensor:
    """(rows, VOCAB) logits after ``ids`` (rows, length >= 2); ``eos_bias`` raises the EOS logit."""
    x = last[ids[:, -1]] + 0.5 * before[ids[:, -2]]
    x[:, EOS] += eos_bias
    return x


class StubConfig(PretrainedConfig):
    model_type = "xllm_sampling_stub"


class StubLM(PreTrainedModel, GenerationMixin):
    config_class = StubConfig

    def __init__(self, eos_bias: float):
        super().__init__(StubConfig(vocab_size=VOCAB))
        self.eos_bias = eos_bias
        self.last, self.before = tables()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # transformers reads the device and dtype from parameters

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=logits_of(input_ids, self.eos_bias, self.last, self.before)[:, None, :])

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}


def beam_search_with_one_beam(monkeypatch) -> None:
    """Make ``generate(num_beams=1)`` run transformers' beam search (it otherwise switches to greedy search)."""
    real = GenerationConfig.get_generation_mode

    def mode(self, *args, **kwargs):
        found = real(self, *args, **kwargs)
        return GenerationMode.BEAM_SEARCH if found == GenerationMode.GREEDY_SEARCH else found

    monkeypatch.setattr(GenerationConfig, "get_generation_mode", mode)
