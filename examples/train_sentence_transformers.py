"""Training a small sentence-transformers model with SentenceTransformerTrainer: fused loss vs theirs.

The data is made here: each example is a "concept" (a few words drawn from a vocabulary of
made-up words); its anchor and positive are two different noisy samples of the concept's words,
and the in-batch negatives are the other concepts. Two copies of one tiny model (hashed word
embeddings, mean-pooled, then a small MLP with dropout) start from the same weights and are
trained by the same trainer on the same batches, one with sentence-transformers'
CachedMultipleNegativesRankingLoss, one with fused_losses' drop-in of the same name (one import
changes). The training losses agree step by step (up to float32 rounding amplified by training),
and both models learn to retrieve a held-out concept's positive among many.

    python examples/train_sentence_transformers.py                 # ~30 s to a minute on 2 cores
    python examples/train_sentence_transformers.py --steps 3      # smoke test

(from a source checkout without installing: PYTHONPATH=. python examples/...). Needs
sentence-transformers, datasets and accelerate (pip install -e ".[test]").
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import random
import tempfile
import time
import zlib

import torch
from torch import nn
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.input_module import InputModule
from sentence_transformers.sentence_transformer import losses as st_losses

from fused_losses.integrations import sentence_transformers as fused_st


class HashedWordEncoder(InputModule):
    """Words hashed into ``vocab_size`` buckets, embedded, mean-pooled over the attention mask,
    then Linear -> GELU -> Dropout -> Linear to ``dim``. Text in, "sentence_embedding" out; no
    tokenizer files, nothing downloaded."""

    config_keys = ["vocab_size", "width", "hidden", "dim", "dropout", "max_words"]

    def __init__(self, vocab_size: int = 4096, width: int = 64, hidden: int = 128, dim: int = 32,
                 dropout: float = 0.1, max_words: int = 16):
        super().__init__()
        self.vocab_size, self.width, self.hidden, self.dim = vocab_size, width, hidden, dim
        self.dropout, self.max_words = dropout, max_words
        self.embedding = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))

    def preprocess(self, inputs, prompt=None, **kwargs):
        """{"input_ids": (n, L), "attention_mask": (n, L)}, L the longest text (in words)."""
        ids = [[1 + zlib.crc32(word.encode()) % (self.vocab_size - 1)
                for word in ((prompt or "") + text).split()[: self.max_words]] or [0]
               for text in inputs]
        length = max(len(row) for row in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), length, dtype=torch.long)
        for row, words in enumerate(ids):
            input_ids[row, : len(words)] = torch.tensor(words)
            attention_mask[row, : len(words)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, features, **kwargs):
        mask = features["attention_mask"].unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(features["input_ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1)
        features["sentence_embedding"] = self.mlp(pooled)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)


def make_concepts(count: int, rng: random.Random, words_per_concept: int = 8):
    """``count`` concepts, each a list of made-up words."""
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]
    return [["".join(rng.choice(syllables) for _ in range(3)) for _ in range(words_per_concept)]
            for _ in range(count)]


def sample(concept, rng: random.Random, words: int = 5) -> str:
    """A noisy view of a concept: some of its words, shuffled."""
    return " ".join(rng.sample(concept, words))


def make_pairs(concepts, rng: random.Random):
    """{"anchor": [...], "positive": [...]}: two views of each concept."""
    return {"anchor": [sample(c, rng) for c in concepts],
            "positive": [sample(c, rng) for c in concepts]}


def retrieval_accuracy(model: SentenceTransformer, pairs) -> float:
    """Share of anchors whose nearest positive (cosine) is their own."""
    anchors = model.encode(pairs["anchor"], convert_to_tensor=True, normalize_embeddings=True)
    positives = model.encode(pairs["positive"], convert_to_tensor=True, normalize_embeddings=True)
    hits = (anchors @ positives.T).argmax(dim=1) == torch.arange(len(anchors))
    return hits.float().mean().item()


LOSSES = {"theirs": st_losses.CachedMultipleNegativesRankingLoss,
          "fused": fused_st.CachedMultipleNegativesRankingLoss}


def train(model: SentenceTransformer, loss_class, train_pairs, args, output_dir: str):
    """Train ``model`` in place; returns (per-step training losses, seconds)."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    loss = loss_class(model, scale=args.scale, mini_batch_size=args.mini_batch_size)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, data_seed=args.seed, use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, loss=loss,
                                         train_dataset=Dataset.from_dict(train_pairs))
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, seconds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--mini-batch-size", type=int, default=128)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--concepts", type=int, default=8192, help="training concepts")
    parser.add_argument("--test-concepts", type=int, default=1024,
                        help="held-out concepts to retrieve among")
    parser.add_argument("--plot", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "sentence_transformers_loss_curves.png",
                        help="where to save the loss curves (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def plot(curves, path: pathlib.Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        axes.plot(range(1, len(losses) + 1), losses, label=name,
                  linestyle="--" if name == "fused" else "-")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("CachedMultipleNegativesRankingLoss\nsentence-transformers (theirs) vs fused_losses (fused)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    print(f"curves saved to {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    train_pairs = make_pairs(make_concepts(args.concepts, rng), rng)
    test_pairs = make_pairs(make_concepts(args.test_concepts, rng), rng)
    torch.manual_seed(args.seed)
    initial = SentenceTransformer(modules=[HashedWordEncoder()], device="cpu")
    print(f"{args.steps} steps of {args.batch_size} pairs, mini-batches of "
          f"{args.mini_batch_size}; retrieval among {len(test_pairs['anchor'])} held-out concepts "
          f"before training: {retrieval_accuracy(initial, test_pairs):.1%}")
    curves = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name, loss_class in LOSSES.items():
            model = copy.deepcopy(initial)
            curves[name], seconds = train(model, loss_class, train_pairs, args, output_dir)
            print(f"{name:>6}: final training loss {curves[name][-1]:.4f}, retrieval "
                  f"{retrieval_accuracy(model, test_pairs):.1%}, {seconds:.1f} s")
    gap = max(abs(a - b) for a, b in zip(curves["theirs"], curves["fused"]))
    print(f"largest |fused - theirs| training loss over {len(curves['fused'])} steps: {gap:.2e}")
    plot(curves, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
