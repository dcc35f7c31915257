"""Training: packed data, objectives (next token, MTP, MoE balancing), AdamW and schedules,
checkpoints that resume bit-identically, and the recipe-driven loop behind `nemotron train`."""

from nemotron.train.data import Batch, DataStream, Example, chat_example, chat_examples, collate, pack, text_examples
from nemotron.train.objectives import lm_loss, sequence_aux_loss, update_expert_bias
from nemotron.train.trainer import TrainConfig, load_recipe, train

__all__ = ["Batch", "DataStream", "Example", "TrainConfig", "chat_example", "chat_examples", "collate", "lm_loss",
           "load_recipe", "pack", "sequence_aux_loss", "text_examples", "train", "update_expert_bias"]
