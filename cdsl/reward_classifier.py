"""The default reward model's architecture: a Llama sequence classifier whose score head has a
bias, so the sigmoid of its logit is calibrated.

Importing this module registers `cdsl_reward` with transformers' Auto classes, so
`from_pretrained` loads a saved reward model like any other classifier.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaModel,
)


class RewardConfig(LlamaConfig):
    model_type = "cdsl_reward"


class RewardBody(LlamaModel):
    config_class = RewardConfig


class RewardForSequenceClassification(LlamaForSequenceClassification):
    """`LlamaForSequenceClassification` with a bias on its score head."""

    config_class = RewardConfig

    def __init__(self, config: RewardConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)


AutoConfig.register(RewardConfig.model_type, RewardConfig, exist_ok=True)
AutoModel.register(RewardConfig, RewardBody, exist_ok=True)  # the classifier builds its body through AutoModel
AutoModelForSequenceClassification.register(RewardConfig, RewardForSequenceClassification, exist_ok=True)
