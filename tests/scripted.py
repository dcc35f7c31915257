"""A tiny checkpoint trained (overfitted, a few seconds on CPU) to answer a handful of conversations
exactly, so that server and chat tests can check reasoning, tool calls and thinking-off behaviour
on real model output, through the real loading and generation code."""

from __future__ import annotations

from pathlib import Path

import torch

import nemotron
from nemotron.chat.template import prepare_chat
from nemotron.inference.steps import greedy_generate
from nemotron.io.random_checkpoint import init_checkpoint

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
HI = [{"role": "user", "content": "Say hi"}]

# (messages, tools, enable_thinking, the assistant's output)
EXAMPLES = [
    (ASK, TOOLS, True, "I should call the tool.\n</think>\n<tool_call>\n<function=get_weather>\n"
                       "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n<|im_end|>"),
    (ASK + [CALL, RESULT], TOOLS, True, "The tool says sunny.\n</think>\nIt is sunny in Paris.<|im_end|>"),
    (HI, None, False, "Hello there!<|im_end|>"),
    (HI, None, True, "A greeting.\n</think>\nHi!<|im_end|>"),
]


def make_scripted_checkpoint(out: Path, max_steps: int = 400) -> Path:
    """Write a tiny Nemotron 3 checkpoint whose greedy answers to EXAMPLES are exactly their outputs."""
    torch.manual_seed(0)
    path = init_checkpoint(out, seed=0)
    m = nemotron.load(path)
    tok = m.tokenizer
    seqs = [(prepare_chat(tok, msgs, tools, think).ids, tok.encode(target, add_special_tokens=False))
            for msgs, tools, think, target in EXAMPLES]
    model = m.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(max_steps):
        loss = sum(torch.nn.functional.cross_entropy(model(torch.tensor([p + t]))[0, len(p) - 1:-1].float(),
                                                     torch.tensor(t)) for p, t in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 and loss.item() < 0.05:
            model.eval()
            with torch.inference_mode():
                exact = all(greedy_generate(model, torch.tensor([p]), len(t))[0].tolist() == t for p, t in seqs)
            model.train()
            if exact:
                break
    else:
        raise AssertionError("the scripted model did not learn its conversations")
    m.model.eval()
    m.save(path)
    return path
