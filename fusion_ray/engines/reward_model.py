"""A reward model scoring (prompt, response) chats: any HF sequence-classification model with one
output (num_labels = 1) and a chat template (ArmoRM-Llama3-8B, Skywork-Reward, our demo's tiny one).

The chat (the prompt's turns plus the response as the assistant's turn) is rendered with the reward
model's own chat template, tokenized (cut at `max_length` tokens, the end kept: the response is what
is judged), batched by length and scored; the score is the model's single logit at the last token
(or its `score` output where the model's own code returns one, as ArmoRM's does). A chat's score does
not depend on the batch it was scored in (tested).
"""

from __future__ import annotations

from collections.abc import Sequence


class RewardScorer:
    """One reward model on CPU or one GPU.

    Args:
        path: HF model dir.
        dtype: "auto", "float32", "bfloat16" or "float16".
        max_length: tokens per chat (longer chats keep their last `max_length` tokens).
        batch_size: chats per forward.
    """

    def __init__(self, path: str, *, dtype: str = "auto", trust_remote_code: bool = False, max_length: int = 4096,
                 batch_size: int = 8, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from fusion_ray.tokenizer import from_dir

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = from_dir(path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"reward model {path}: its tokenizer has no chat template")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype="auto" if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True).to(self.device).eval()
        if self.model.config.num_labels != 1 and not trust_remote_code:
            raise ValueError(f"reward model {path}: expected one output (num_labels 1), "
                             f"it has {self.model.config.num_labels}")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad = pad
        self.max_length, self.batch_size = max_length, batch_size

    def encode(self, chat: Sequence[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(chat), tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length:]

    def score(self, chats: Sequence[Sequence[dict]]) -> list[float]:
        """One score per chat (a list of {role, content}, the response last, as the assistant)."""
        from fusion_ray.engines.scoring import length_batches

        torch = self.torch
        seqs = [self.encode(c) for c in chats]
        out: list[float] = [0.0] * len(seqs)
        for batch in length_batches([len(s) for s in seqs], self.batch_size, self.batch_size * self.max_length):
            width = len(seqs[batch[0]])
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i])] = torch.as_tensor(seqs[i])
                attn[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                res = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device))
            scores = getattr(res, "score", None)
            if scores is None:
                scores = self._last_token_scores(res.logits, attn)
            for row, i in enumerate(batch):
                out[i] = float(scores[row].reshape(-1)[0])
        return out

    def _last_token_scores(self, logits, attn):
        """HF picks the last token by the pad id, which a chat may itself end with (eos = pad):
        where the model returns per-position logits we take each row's last attended one."""
        if logits.dim() == 3:  # [B, L, 1]
            last = attn.sum(-1) - 1
            return logits[self.torch.arange(len(last)), last.to(logits.device)].float().cpu()
        return logits.float().cpu()
