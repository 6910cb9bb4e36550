"""The local judge: a transformers model in this process, read through its next-token probabilities.

The verdict is never parsed from generated text: after the chat template's assistant header, the probability mass
on the label tokens ("A", " A"; "B", " B") is summed per label and renormalised over A and B.
"""

from __future__ import annotations

import time

from selfplay.inputs.models import load_causal_lm, load_tokenizer
from selfplay.judging.calls import JudgeCall, JudgeResult

LABEL_VARIANTS = {"A": ("A", " A"), "B": ("B", " B")}


def label_token_ids(tokenizer) -> dict[str, list[int]]:
    """Single-token encodings of each label's variants; a label with none cannot be judged with this tokenizer."""
    ids: dict[str, list[int]] = {}
    for label, variants in LABEL_VARIANTS.items():
        found = set()
        for v in variants:
            enc = tokenizer.encode(v, add_special_tokens=False)
            if len(enc) == 1:
                found.add(enc[0])
        if not found:
            raise ValueError(f"the judge tokenizer has no single token for label {label!r}")
        ids[label] = sorted(found)
    return ids


class LocalJudge:
    def __init__(self, model_path: str, batch_size: int = 8, max_length: int = 1024):
        self.model = load_causal_lm(model_path)
        self.tokenizer = load_tokenizer(model_path, padding_side="left")
        self.labels = label_token_ids(self.tokenizer)
        self.batch_size = batch_size
        self.max_length = max_length

    def render(self, call: JudgeCall) -> str:
        messages = [{"role": "system", "content": call.system}, {"role": "user", "content": call.user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def judge(self, calls: list[JudgeCall]) -> list[JudgeResult]:
        import torch

        texts = [self.render(c) for c in calls]
        results: list[JudgeResult | None] = [None] * len(calls)
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        todo = []
        for i, n in enumerate(lengths):
            if n > self.max_length:
                results[i] = JudgeResult(None, "logprobs", error=f"judge prompt has {n} tokens > judge.max_length={self.max_length}", tokens_in=n)
            else:
                todo.append(i)
        # Sort by length so each batch pads little.
        todo.sort(key=lambda i: lengths[i])
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            t0 = time.perf_counter()
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)
            mass_a = probs[:, self.labels["A"]].sum(dim=-1)
            mass_b = probs[:, self.labels["B"]].sum(dim=-1)
            latency = (time.perf_counter() - t0) / len(idx)
            for row, i in enumerate(idx):
                a, b = float(mass_a[row]), float(mass_b[row])
                results[i] = JudgeResult(
                    p_a=a / (a + b) if a + b > 0 else 0.5,
                    mode="logprobs",
                    label_mass=a + b,
                    tokens_in=lengths[i],
                    tokens_out=1,
                    latency_s=latency,
                )
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
