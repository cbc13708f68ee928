"""sentence-transformers' CachedMultipleNegativesRankingLoss against fused_losses' drop-in of the
same name: one training step (loss forward and backward, gradient caching included) of the same
tiny model, time and peak resident memory, on the CPU (or a GPU: --device cuda, time and
torch.cuda peak memory instead of the resident size).

    python -m benchmarks.sentence_transformers_benchmark                       # batch 16384 and 65536
    python -m benchmarks.sentence_transformers_benchmark --batches 1024 --repeats 1   # quick check

The model is examples/train_sentence_transformers.py's HashedWordEncoder (hashed word embeddings,
mean pool, MLP); the batch is (anchor, positive) pairs of random token ids with 1 to 16 words.
Each (loss, batch) runs in a fresh process (benchmarks/fresh_process.py), after a warm-up step on
two mini-batches. Prints the figures and
appends the records to benchmarks/results/sentence_transformers_<date>.jsonl.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from benchmarks.fresh_process import child_main, measure_in_child, measure_step, positive_int
from fused_losses.benchmarking import environment, time_ms, write_records

RESULTS = pathlib.Path(__file__).parent / "results"
MODULE = "benchmarks.sentence_transformers_benchmark"
PROVIDERS = ("theirs", "fused")


def pairs(batch: int, vocab_size: int, max_words: int, device: str):
    """Two input columns of ``batch`` rows of token ids, each row 1 to ``max_words`` words."""
    columns = []
    for _ in range(2):
        lengths = torch.randint(1, max_words + 1, (batch,))
        mask = (torch.arange(max_words)[None] < lengths[:, None]).long()
        ids = torch.randint(1, vocab_size, (batch, max_words)) * mask
        columns.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return columns


def measure(config: dict) -> dict:
    """The child (or, on a GPU, the parent): one training step of ``config["provider"]``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st_losses

    from examples.train_sentence_transformers import HashedWordEncoder
    from fused_losses.integrations import sentence_transformers as fused_st

    torch.set_num_threads(config["threads"])
    encoder = HashedWordEncoder(dim=config["dim"])
    model = SentenceTransformer(modules=[encoder], device=config["device"])
    losses = {"theirs": st_losses, "fused": fused_st}[config["provider"]]
    loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config["mini_batch_size"])
    features = pairs(config["batch"], encoder.vocab_size, encoder.max_words, config["device"])

    def step(rows=None):
        model.zero_grad(set_to_none=True)
        loss([{key: value[:rows] for key, value in f.items()} for f in features], None).backward()

    def warmup():
        step(2 * config["mini_batch_size"])

    if config["device"] == "cpu":
        return measure_step(step, config["repeats"], warmup=warmup)
    device = torch.device(config["device"])
    warmup()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    return dict(peak_extra_bytes=peak, **time_ms(step, device, warmup=0, repeats=config["repeats"]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[16384, 65536])
    parser.add_argument("--mini-batch-size", type=positive_int, default=256)
    parser.add_argument("--dim", type=positive_int, default=32, help="embedding dim of the model")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="timed steps (>= 1); on the CPU the first one's memory is measured")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON lines file (default benchmarks/results/sentence_transformers_<date>.jsonl)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    print(f"{env['device']}, torch {env['torch']}: CachedMultipleNegativesRankingLoss, "
          f"mini_batch_size {args.mini_batch_size}, tiny model (embedding dim {args.dim})",
          flush=True)
    records = []
    for batch in args.batches:
        by_provider = {}
        for provider in PROVIDERS:
            config = dict(provider=provider, batch=batch, mini_batch_size=args.mini_batch_size,
                          dim=args.dim, repeats=args.repeats, device=args.device,
                          threads=args.threads)
            result = (measure_in_child(MODULE, config) if args.device == "cpu"
                      else dict(measure(config), oom=False))
            by_provider[provider] = {**env, "benchmark": "sentence_transformers_cached_mnrl",
                                     **config, **result}
            records.append(by_provider[provider])
            if result["oom"]:
                print(f"batch {batch:>6} {provider:>6}: out of memory", flush=True)
                continue
            rss = (f", process peak {result['peak_rss_bytes'] / 2**20:.0f} MiB"
                   if "peak_rss_bytes" in result else "")
            print(f"batch {batch:>6} {provider:>6}: median {result['median_ms'] / 1e3:7.2f} s "
                  f"(p20 {result['p20_ms'] / 1e3:.2f}, p80 {result['p80_ms'] / 1e3:.2f}), peak "
                  f"extra {result['peak_extra_bytes'] / 2**20:.0f} MiB{rss}", flush=True)
        theirs, fused = by_provider["theirs"], by_provider["fused"]
        if not (theirs["oom"] or fused["oom"]):
            print(f"batch {batch:>6}: fused {theirs['median_ms'] / fused['median_ms']:.2f}x faster, "
                  f"peak extra memory {fused['peak_extra_bytes'] / theirs['peak_extra_bytes']:.1%} "
                  f"of theirs", flush=True)
    out = args.out or RESULTS / f"sentence_transformers_{env['date']}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_records(records, str(out))
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    if not child_main(sys.argv[1:], measure):
        raise SystemExit(main())
