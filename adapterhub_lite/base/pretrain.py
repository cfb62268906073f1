"""Build and pretrain the embedded base model from scratch on the synthetic source corpus.

`scripts/pretrain_base.py` drives this to reproduce the committed weights; the transfer study reuses
`build_model` for its random-init control (same shape, no pretraining).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapterhub_lite.base.world import source_documents

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class PretrainConfig:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    n_docs: int = 60_000
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1200
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0
    eval_docs: int = 2_000


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (tokenizers package) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: PretrainConfig, tokenizer, seed: int | None = None):
    """A randomly initialised Llama of the embedded shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed if seed is None else seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def _pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(d, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss over packed held-out blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i : i + batch_size]
        out = model(input_ids=b, labels=b)
        total += out.loss.item() * len(b)
        count += len(b)
    return total / max(count, 1)


def source_heldout_blocks(tokenizer, seq_len: int = 128, n_docs: int = 2_000, seed: int = 10_000):
    """Packed blocks of source-corpus documents never seen in pretraining (other seed)."""
    return _pack(list(source_documents(n_docs, seed=seed)), tokenizer, seq_len)


def pretrain(out_dir: Path, cfg: PretrainConfig, log=print) -> dict:
    """Train tokenizer and model from scratch, save both to `out_dir`, return the report."""
    from tqdm import tqdm

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    docs = list(source_documents(cfg.n_docs, seed=cfg.seed))
    tokenizer = train_tokenizer(docs, cfg.vocab_size)
    data = _pack(docs, tokenizer, cfg.seq_len)
    heldout = source_heldout_blocks(tokenizer, cfg.seq_len, cfg.eval_docs)
    model = build_model(cfg, tokenizer)
    random_init_loss = heldout_loss(model, heldout)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; corpus: {data.numel():,} tokens; "
        f"random-init held-out loss {random_init_loss:.3f}")

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup)
        * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretraining", unit="step")
    for _ in bar:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    final = heldout_loss(model, heldout)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    report = {
        "config": asdict(cfg),
        "parameters": n_params,
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "heldout_loss": final,
        "heldout_perplexity": math.exp(final),
        "random_init_heldout_loss": random_init_loss,
        "random_init_heldout_perplexity": math.exp(random_init_loss),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "wall_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "corpus": "adapterhub_lite.base.world.source_documents (generated by this project, seed "
        f"{cfg.seed}); held-out: seed 10000",
    }
    (out_dir / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
